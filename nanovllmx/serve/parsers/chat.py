"""One choice's output parsing: reasoning first (Qwen3's think block), then tool calls in the
content. Streaming (`feed` per delta, `finish` at the end) and whole responses (`parse`) share the
code, so a stream's deltas add up to the whole response's message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from nanovllmx.serve.parsers.reasoning import ReasoningParser
from nanovllmx.serve.parsers.tools import ToolCallParser, merge_tool_deltas

ReasoningParserName = Literal["qwen3", "none"]
ToolParserName = Literal["hermes", "none"]


@dataclass(frozen=True)
class ParserConfig:
    """What a replica parses (build_app's `reasoning_parser` / `tool_call_parser`), with the ids
    of the think tags (reasoning tokens are counted on ids)."""

    reasoning: ReasoningParserName = "qwen3"
    tools: ToolParserName = "hermes"
    think_start_id: int | None = None
    think_end_id: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, reasoning: str = "auto", tools: str = "auto") -> ParserConfig:
        """ "auto": the Qwen3 parsers when the tokenizer has their tags as tokens, else none."""
        vocab = tokenizer.get_vocab()
        ts, te = vocab.get("<think>"), vocab.get("</think>")
        if reasoning == "auto":
            reasoning = "qwen3" if ts is not None and te is not None else "none"
        if tools == "auto":
            tools = "hermes" if "<tool_call>" in vocab and "</tool_call>" in vocab else "none"
        if reasoning not in ("qwen3", "none"):
            raise ValueError(f"reasoning_parser must be qwen3, none or auto, got {reasoning!r}")
        if tools not in ("hermes", "none"):
            raise ValueError(f"tool_call_parser must be hermes, none or auto, got {tools!r}")
        return cls(reasoning, tools, ts, te)  # type: ignore[arg-type]


class ChatOutputParser:
    """`reasoning`: split off the think block; `tools`: parse tool calls out of the content (the
    request has tools and tool_choice is not "none"); `start_in_reasoning`: the prompt left a think
    block open (then the output starts inside it)."""

    def __init__(self, cfg: ParserConfig, tools: bool, start_in_reasoning: bool = False):
        self.cfg = cfg
        self.reasoning = ReasoningParser(start_in_reasoning) if cfg.reasoning == "qwen3" else None
        self.tools = ToolCallParser() if tools and cfg.tools == "hermes" else None
        self.reasoning_tokens = 0
        self._ids_in_think = start_in_reasoning
        self._ids_seen = 0

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def _count(self, token_ids: list[int]) -> None:
        """Reasoning tokens: those strictly inside the think block."""
        if self.reasoning is None:
            return
        for t in token_ids:
            if self._ids_seen == 0 and t == self.cfg.think_start_id:
                self._ids_in_think = True
            elif t == self.cfg.think_end_id:
                self._ids_in_think = False
            elif self._ids_in_think:
                self.reasoning_tokens += 1
            self._ids_seen += 1

    def feed(self, text: str, token_ids: list[int] | None = None) -> dict[str, Any]:
        """An OpenAI chat `delta` (without role) of the new text: reasoning_content / content /
        tool_calls, each only when there is some."""
        self._count(token_ids or [])
        if self.reasoning is not None:
            r, c = self.reasoning.feed(text)
        else:
            r, c = "", text
        return self._delta(r, c, final=False)

    def finish(self) -> dict[str, Any]:
        r, c = self.reasoning.finish() if self.reasoning is not None else ("", "")
        return self._delta(r, c, final=True)

    def _delta(self, reasoning: str, content: str, final: bool) -> dict[str, Any]:
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                c2, calls2 = self.tools.finish()
                content, calls = content + c2, calls + calls2
        d: dict[str, Any] = {}
        if reasoning:
            d["reasoning_content"] = reasoning
        if content:
            d["content"] = content
        if calls:
            d["tool_calls"] = calls
        return d

    @property
    def num_tool_calls(self) -> int:
        return self.tools.num_calls if self.tools is not None else 0

    def parse(self, text: str, token_ids: list[int]) -> dict[str, Any]:
        """A whole output -> the message's reasoning_content, content and tool_calls (None when absent)."""
        parts = [self.feed(text, token_ids), self.finish()]
        reasoning = "".join(p.get("reasoning_content", "") for p in parts)
        content = "".join(p.get("content", "") for p in parts)
        calls = merge_tool_deltas([d for p in parts for d in p.get("tool_calls", [])])
        return {
            "reasoning_content": reasoning or None,
            "content": content or None,
            "tool_calls": calls or None,
        }
