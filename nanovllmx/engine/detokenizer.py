"""Incremental detokenization with stop strings, on the client side of the engine (never on the
scheduler's critical path)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol, cast

try:  # the Rust incremental decoder of `tokenizers` (fast tokenizers)
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - tokenizers is a dependency of transformers
    # absent: _stream_backend checks _DecodeStream for None before using either
    _RustTokenizer = _DecodeStream = None  # type: ignore[misc,assignment]


class TokenDecoder(Protocol):
    """What detokenizing needs of a tokenizer: a transformers tokenizer or a `tokenizers.Tokenizer`."""

    def decode(self, ids: list[int], /, skip_special_tokens: bool = ...) -> str | list[str]: ...


_COMPACT_EVERY = 256  # join the text pieces once this many have accumulated (bounded memory, no O(n^2))


@functools.cache
def _plain_hf_decode(cls: type) -> bool:
    """Whether cls.decode is transformers' own fast-tokenizer decode: decode -> _decode ->
    self._tokenizer.decode (+ clean_up_tokenization_spaces), i.e. nothing else touches the text."""
    owner: dict[str, type] = {}
    for c in cls.__mro__:
        for name in ("decode", "_decode"):
            if name in vars(c):
                owner.setdefault(name, c)
    dec, _dec = owner.get("decode"), owner.get("_decode")
    return (
        dec is not None
        and _dec is not None
        and dec.__name__ == "PreTrainedTokenizerBase"
        and _dec.__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
        and dec.__module__.startswith("transformers.")
        and _dec.__module__.startswith("transformers.")
    )


def _stream_backend(tokenizer: TokenDecoder) -> _RustTokenizer | None:
    """The `tokenizers.Tokenizer` whose `decode` is exactly `tokenizer.decode`, or None when the
    Rust incremental decoder cannot be used: a slow (pure Python) tokenizer, a tokenizer whose decode
    post-processes the text (clean_up_tokenization_spaces) or is overridden."""
    if _DecodeStream is None:
        return None
    if isinstance(tokenizer, _RustTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        not isinstance(backend, _RustTokenizer)
        or getattr(tokenizer, "clean_up_tokenization_spaces", False)
        or "decode" in vars(tokenizer)
        or "_decode" in vars(tokenizer)  # patched on the instance
        or not _plain_hf_decode(type(tokenizer))
    ):
        return None
    return backend


@functools.cache
def _step_takes_lists() -> bool:
    """DecodeStream.step accepts a list of ids (newer tokenizers) besides one id."""
    from tokenizers.models import BPE

    try:
        _DecodeStream().step(_RustTokenizer(BPE()), [0, 1])
    except TypeError:
        return False
    return True


class IncrementalDetokenizer:
    """Turns token ids into text a piece at a time. Multi-byte characters split across tokens are
    held back until complete (decoding an incomplete UTF-8 sequence yields U+FFFD). With stop
    strings, the last len(longest stop)-1 characters are held back until they cannot start one.

    Fast tokenizers use the Rust `tokenizers.decoders.DecodeStream`: one `step` per add() instead of two
    Python-level `tokenizer.decode` calls. It runs the same prefix-offset algorithm as `_decode_window`
    (decode the last window of ids with and without the new ones, emit the growth unless it ends in
    U+FFFD), so `prefix_offset` / `read_offset` are mirrored here and `_decode_window` can take over
    from the same state: always for slow tokenizers, for `final` (a trailing partial character or "�"
    token is released as U+FFFD, which DecodeStream never emits), and for good if DecodeStream raises
    (its InvalidPrefix check, odd ids). The text is kept as pieces, so a long output costs O(1) per
    token, not a copy of the whole text."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        stop: Sequence[str] | None = None,
        skip_special_tokens: bool = True,
        include_stop: bool = False,
        min_tokens: int = 0,
    ):
        self.tok = tokenizer
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.skip = skip_special_tokens
        self.include_stop = include_stop  # the text keeps the stop string that ended it
        self.min_tokens = min_tokens  # stop strings count from this many tokens on (vLLM's min_tokens)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.emitted = 0  # characters of the text already handed out
        self.stopped = False
        # the text is _pieces joined + _recent; _recent = text[_recent_start:] holds everything not yet
        # handed out and the last `hold` characters (where a stop string may still begin)
        self._pieces: list[str] = []
        self._recent = ""
        self._recent_start = 0
        self._len = 0
        self._backend = _stream_backend(tokenizer)
        self._stream: _DecodeStream | None = (
            _DecodeStream(skip_special_tokens=skip_special_tokens) if self._backend is not None else None
        )

    @property
    def text(self) -> str:
        """All text so far (cut before a stop string), held-back characters included."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return (self._pieces[0] if self._pieces else "") + self._recent

    def _decode(self, ids: list[int]) -> str:
        return cast(str, self.tok.decode(ids, skip_special_tokens=self.skip))  # a flat list of ids: one str

    def _decode_window(self, final: bool) -> str | None:
        """Prefix-offset method: the text the ids after read_offset add, decoded with the context of
        ids[prefix_offset:read_offset] (some tokenizers change spacing at a token boundary); None while
        it ends in a partial character (unless final) or adds nothing."""
        if final and self.read_offset == len(self.ids):
            return None
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return None

    def _step_each(self, new_ids: list[int]) -> str | None:
        """One DecodeStream.step per id (older tokenizers take one id at a time)."""
        stream, backend = self._stream, self._backend
        assert stream is not None and backend is not None  # add() calls this only while the Rust stream is in use
        out = []
        end = len(self.ids) - len(new_ids)
        for t in new_ids:
            end += 1
            try:
                grown = stream.step(backend, t)
            except Exception:  # noqa: BLE001 - as in add(): the Python method takes over
                self._stream = None
                grown = self._decode_window(False)  # decodes all pending ids, this one's successors included
                if grown is not None:
                    out.append(grown)
                break
            if grown is not None:
                self.prefix_offset, self.read_offset = self.read_offset, end
                out.append(grown)
        return "".join(out) if out else None

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Feed tokens; returns the newly visible text. Sets `stopped` when a stop string appears
        (the text is cut before it)."""
        ids = self.ids
        ids.extend(new_ids)
        if self._stream is not None and self._backend is not None and not final:  # (one is None iff the other is)
            if not len(new_ids):
                return ""  # nothing new, and not final: nothing becomes visible
            if len(new_ids) == 1 or _step_takes_lists():
                try:
                    grown = self._stream.step(self._backend, new_ids[0] if len(new_ids) == 1 else list(new_ids))
                except Exception:  # noqa: BLE001 - InvalidPrefix, odd ids: the Python method decides
                    self._stream = None
                    grown = self._decode_window(False)
                else:
                    if grown is None:
                        return ""
                    self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            else:
                grown = self._step_each(new_ids)
        else:
            self._stream = None  # after a final decode the Rust state is stale
            grown = self._decode_window(final)
        if grown is not None and not self.stop:  # fast path: nothing is held back, _recent stays ""
            self._len += len(grown)
            self.emitted = self._recent_start = self._len
            self._append(grown)
            return grown
        return self._update_text(grown, final)

    def _append(self, piece: str) -> None:
        pieces = self._pieces
        pieces.append(piece)
        if len(pieces) >= _COMPACT_EVERY:
            self._pieces = ["".join(pieces)]

    def _update_text(self, grown: str | None, final: bool) -> str:
        rs, recent, n, hold = self._recent_start, self._recent, self._len, self.hold
        if grown:
            # a stop string may begin in the last `hold` characters: search from max(0, n - hold), which
            # is _recent_start itself until a stop string has cut the text
            search_from = n - hold if n > hold else 0
            off = search_from - rs
            recent += grown
            n += len(grown)
            cut = first = -1
            for s in self.stop if len(self.ids) >= self.min_tokens else ():
                i = recent.find(s, off)
                if i >= 0 and (first < 0 or i < first):
                    first, cut = i, i + len(s) if self.include_stop else i
            if cut >= 0:
                recent = recent[:cut]
                n = rs + cut
                self.stopped = True
                final = True
            self._recent, self._len = recent, n
        emitted = self.emitted
        if final or self.stopped:
            visible = n
        else:
            visible = n - hold if n - hold > emitted else emitted
        delta = recent[emitted - rs : visible - rs] if visible > emitted else ""
        self.emitted = visible
        keep_from = n - hold if n > hold else 0  # text[keep_from:] stays in _recent (<= visible)
        if keep_from > rs:
            self._append(recent[: keep_from - rs])
            self._recent = recent[keep_from - rs :]
            self._recent_start = keep_from
        return delta

    def flush(self) -> str:
        """At the end of a request: release whatever was held back."""
        return self.add([], final=True)
