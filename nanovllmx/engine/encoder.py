"""Prompt -> token ids for the engine: text through the tokenizer (refusing, cheaply, a text that
cannot fit the context), token-id lists checked for type. Used by `LLM.encode` and by the Serve
ingress that tokenizes for the request router (serve/ingress.py)."""

from __future__ import annotations

from typing import Any

from nanovllmx.engine.protocol import Prompt

# oversized text prompts (PromptEncoder._refuse_oversized): texts longer than _BOUND_CHARS characters
# per context token (a Qwen3 token averages ~4 characters of English) are counted in pieces of
# _PIECE_CHARS
_BOUND_CHARS = 8
_PIECE_CHARS = 65536
_BOUNDARY_TOKENS = 2


class PromptEncoder:
    def __init__(self, tokenizer: Any, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            self._refuse_oversized(prompt)
            ids: list[int] = self.tokenizer.encode(prompt)
            return ids
        # the type set first: C speed for the usual plain-int list (the per-item check took ~25 ms
        # for the standard workload's 143k prompt tokens, before the engine's first step)
        if isinstance(prompt, (list, tuple)) and (
            set(map(type, prompt)) <= {int} or all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return list(prompt)
        raise TypeError("a prompt is a string or a list of token ids")

    def _refuse_oversized(self, text: str) -> None:
        """Raise ValueError for a text that cannot fit the context, without tokenizing all of it: a
        text over _BOUND_CHARS characters a context token is counted piece by piece, stopping as
        soon as the count proves it too long (a 7.9 MB prompt cost seconds of CPU before its 400).
        A piece ends at white space, where the tokenizer's pre-tokenizer splits anyway; each piece
        boundary may cost at most a few tokens of merging, which the count gives back."""
        limit = self.max_len
        if len(text) <= _BOUND_CHARS * limit:  # a prompt of ordinary density: tokenized once, as usual
            return
        count, pos = 0, 0
        while pos < len(text):
            end = len(text) if len(text) - pos <= _PIECE_CHARS else pos + _PIECE_CHARS
            while end < len(text) and end < pos + _PIECE_CHARS + 256 and not text[end].isspace():
                end += 1
            count += len(self.tokenizer.encode(text[pos:end], add_special_tokens=False)) - _BOUNDARY_TOKENS
            if count >= limit:
                raise ValueError(
                    f"prompt has more than {limit} tokens (counted on its first {end} of {len(text)} characters), "
                    f"but this model's context is {limit} tokens"
                )
            pos = end
