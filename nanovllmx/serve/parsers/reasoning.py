"""Qwen3's reasoning parser: the text of a `<think>...</think>` block is reasoning, the rest content.

Qwen3 opens its answer with `<think>\n` when it thinks; with `enable_thinking: false` the chat
template pre-fills an empty block (`<think>\n\n</think>\n\n`) in the prompt and the output is all
content. A block cut by max_tokens (no `</think>`) is all reasoning. Newlines just inside the tags
and right after `</think>` are layout, not text (dropped, as the chat template writes them back).
Incremental: `feed` takes text in any pieces and returns what is known so far; `finish` the rest."""

from __future__ import annotations

from nanovllmx.serve.parsers.text import partial_tag_len

THINK_START, THINK_END = "<think>", "</think>"


class ReasoningParser:
    def __init__(self, start_in_reasoning: bool = False):
        # "start": nothing but whitespace yet (it may still open a think block); "reasoning"; "content"
        self.state = "reasoning" if start_in_reasoning else "start"
        self.buf = ""  # text held back: a possible partial tag, or newlines that may be layout
        self.fresh = True  # at the start of a section: its leading newlines are layout

    def feed(self, text: str) -> tuple[str, str]:
        """-> (reasoning, content) of the text that can be told apart now."""
        self.buf += text
        reasoning, content = [], []
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(THINK_START):
                    self.buf, self.state, self.fresh = s[len(THINK_START) :], "reasoning", True
                    continue
                if s and not THINK_START.startswith(s):  # not a think block: all content, as written
                    self.state, self.fresh = "content", False
                    continue
                break  # only whitespace or a partial "<think>" so far
            if self.state == "reasoning":
                i = self.buf.find(THINK_END)
                if i >= 0:
                    reasoning.append(self._section(self.buf[:i], final=True))
                    self.buf, self.state, self.fresh = self.buf[i + len(THINK_END) :], "content", True
                    continue
                keep = partial_tag_len(self.buf, THINK_END)
                body = self.buf[: len(self.buf) - keep]
                tail = len(body) - len(body.rstrip("\n"))  # trailing newlines: layout if </think> follows
                emit = body[: len(body) - tail]
                self.buf = self.buf[len(emit) :]
                reasoning.append(self._section(emit, final=False))
                break
            # content: everything, less the newlines right after </think>
            if self.fresh:
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    break
                self.fresh = False
            content.append(self.buf)
            self.buf = ""
            break
        return "".join(reasoning), "".join(content)

    def _section(self, text: str, final: bool) -> str:
        if self.fresh:
            text = text.lstrip("\n")
            if text:
                self.fresh = False
        return text.rstrip("\n") if final else text

    def finish(self) -> tuple[str, str]:
        """What is held back, at the end of the output."""
        buf, self.buf = self.buf, ""
        if self.state == "reasoning":  # cut inside the block (max_tokens): reasoning
            return self._section(buf, final=True), ""
        if self.state == "start":
            return "", buf
        return "", buf.lstrip("\n") if self.fresh else buf

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"
