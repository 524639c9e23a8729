"""Logprobs as the OpenAI API writes them: chat's `logprobs.content[{token, logprob, bytes,
top_logprobs}]`, completions' `logprobs{tokens, token_logprobs, top_logprobs, text_offset}`, and
vLLM's `prompt_logprobs`. A token's text is its own bytes (byte-level BPE), decoded as UTF-8 with
replacement characters where a character is split across tokens (`bytes` keeps them exact)."""

from __future__ import annotations

import functools
from typing import Any

from nanovllmx.outputs import TokenLogprob

# JSON has no -inf: a token the model cannot produce (or that min_tokens masks) reads as vLLM's floor
_FLOOR = -9999.0


def _finite(x: float) -> float:
    return x if x > _FLOOR else _FLOOR


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token uses -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Each token id's bytes and text, memoised (one per tokenizer)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        got = self._cache.get(token_id)
        if got is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            dec = _byte_decoder()
            if isinstance(piece, str) and piece and all(c in dec for c in piece):
                raw = bytes(dec[c] for c in piece)
            else:  # a special or added token: its text as written
                raw = str(self.tokenizer.decode([token_id])).encode("utf-8")
            got = (raw.decode("utf-8", errors="replace"), list(raw))
            if len(self._cache) < 1 << 20:
                self._cache[token_id] = got
        return got

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


def chat_logprobs(texts: TokenTexts, lps: list[TokenLogprob], top: int) -> dict[str, Any]:
    """Chat's `logprobs` object of some tokens."""
    content = []
    for lp in lps:
        tok, raw = texts.get(lp.token_id)
        tops = []
        for tid, v in lp.top[:top]:
            t, b = texts.get(tid)
            tops.append({"token": t, "logprob": _finite(v), "bytes": b})
        content.append({"token": tok, "logprob": _finite(lp.logprob), "bytes": raw, "top_logprobs": tops})
    return {"content": content, "refusal": None}


class CompletionLogprobsBuilder:
    """Completions' `logprobs` object, chunk by chunk (text_offset runs on across a stream's chunks)."""

    def __init__(self, texts: TokenTexts, top: int):
        self.texts, self.top, self.offset = texts, top, 0

    def build(self, lps: list[TokenLogprob | int]) -> dict[str, Any]:
        """A bare token id is a position without a logprob (the first prompt token, with echo)."""
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for lp in lps:
            if isinstance(lp, int):
                tok = self.texts.text(lp)
                tokens.append(tok)
                token_lps.append(None)
                tops.append(None)
                offsets.append(self.offset)
                self.offset += len(tok)
                continue
            tok = self.texts.text(lp.token_id)
            top = {self.texts.text(tid): _finite(v) for tid, v in lp.top[: self.top]}
            top.setdefault(tok, _finite(lp.logprob))  # OpenAI's: the chosen token is always among them
            tokens.append(tok)
            token_lps.append(_finite(lp.logprob))
            tops.append(top)
            offsets.append(self.offset)
            self.offset += len(tok)
        return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}

    def echoed(self, prompt_ids: list[int], prompt_lps: list[TokenLogprob | None] | None) -> list[TokenLogprob | int]:
        """The prompt's positions: their logprobs, or the bare id where there is none."""
        lps = prompt_lps or [None] * len(prompt_ids)
        return [t if lp is None else lp for t, lp in zip(prompt_ids, lps)]


def prompt_logprobs_json(
    texts: TokenTexts, prompt_ids: list[int], lps: list[TokenLogprob | None] | None
) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob,
    rank, decoded_token}} for the prompt token and the most likely ones."""
    if lps is None:
        return None
    out: list[dict[str, Any] | None] = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        d: dict[str, Any] = {
            str(tid): {"logprob": _finite(v), "rank": r + 1, "decoded_token": texts.text(tid)}
            for r, (tid, v) in enumerate(lp.top)
        }
        d[str(lp.token_id)] = {
            "logprob": _finite(lp.logprob),
            "rank": lp.rank,
            "decoded_token": texts.text(lp.token_id),
        }
        out.append(d)
    return out
