"""One choice's output parsing: reasoning first (Qwen3's think block), then tool calls in the
content. Streaming (`feed` per delta, `finish` at the end) and whole responses (`parse`) share the
code, so a stream's deltas add up to the whole response's message."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    block open (then the output starts inside it); `piece_of`: the text of one token id (to count
    reasoning tokens: those inside the block before and after them, so not the tags themselves,
    whether the model wrote a tag as its one token or in pieces)."""

    def __init__(
        self,
        cfg: ParserConfig,
        tools: bool,
        start_in_reasoning: bool = False,
        piece_of: Callable[[int], str] | None = None,
    ):
        self.cfg = cfg
        self.reasoning = ReasoningParser(start_in_reasoning) if cfg.reasoning == "qwen3" else None
        self.tools = ToolCallParser() if tools and cfg.tools == "hermes" else None
        self.reasoning_tokens = 0
        self._counter = ReasoningParser(start_in_reasoning) if self.reasoning is not None else None
        self._piece_of = piece_of

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def _count(self, text: str, token_ids: list[int]) -> None:
        """Reasoning tokens: inside the think block before and after them. A one-token delta's text is
        its token's; a longer delta's tokens are decoded one by one (`piece_of`), and only until the
        block has ended: past it nothing is counted, so an answer's tokens cost nothing here."""
        c = self._counter
        if c is None or c.state == "content" or not token_ids:
            return
        piece_of = self._piece_of
        steps: Iterable[tuple[str, int]]
        if len(token_ids) == 1 or piece_of is None:
            steps = [(text, len(token_ids))]  # without piece_of: by delta
        else:
            steps = ((piece_of(t), 1) for t in token_ids)  # decoded lazily: stops with the block
        for piece, n in steps:
            before = c.in_reasoning
            c.feed(piece)
            if before and c.in_reasoning:
                self.reasoning_tokens += n
            if c.state == "content":
                return

    def feed(self, text: str, token_ids: list[int] | None = None) -> dict[str, Any]:
        """An OpenAI chat `delta` (without role) of the new text: reasoning_content / content /
        tool_calls, each only when there is some."""
        self._count(text, token_ids or [])
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
