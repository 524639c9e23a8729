"""Incremental detokenization with stop strings, on the client side of the engine (never on the
scheduler's critical path)."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Turns token ids into text a piece at a time. Multi-byte characters split across tokens are
    held back until complete (decoding an incomplete UTF-8 sequence yields U+FFFD). With stop
    strings, the last len(longest stop)-1 characters are held back until they cannot start one."""

    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.stop = stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Feed tokens; returns the newly visible text. Sets `stopped` when a stop string appears
        (the text is cut before it)."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            grown = full[len(prefix):]
            # keep a short window of context: some tokenizers change spacing at a token boundary
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            search_from = max(0, len(self.text) - self.hold)
            self.text += grown
            if self.stop:
                cut = min((i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.stopped = True
                    final = True
        visible = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:visible]
        self.emitted = visible
        return delta

    def flush(self) -> str:
        """At the end of a request: release whatever was held back."""
        return self.add([], final=True)
