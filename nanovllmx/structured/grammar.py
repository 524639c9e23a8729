"""Grammar compilation (xgrammar), an LRU cache of compiled grammars, and the matcher state of
one constrained request. Lives on the scheduler side (the engine core's process); the workers only
ever see packed int32 bitmasks (bitmask.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from nanovllmx.structured.spec import GrammarSpec, StructuredError

if TYPE_CHECKING:
    import xgrammar as xgr

logger = logging.getLogger(__name__)

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:line: "; the rest is the reason
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def _reason(e: Exception) -> str:
    return _CPP_PREFIX.sub("", str(e).strip()).strip() or type(e).__name__


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a packed bitmask (xgrammar's format: bit j of word i = token 32*i+j)."""
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer and keeps the newest `cache_size` compiled grammars
    (keyed by the spec's text: a repeated schema compiles once). Thread-safe."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int], cache_size: int = 256):
        import xgrammar as xgr
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self.vocab_size = vocab_size
        self.stop_token_ids = list(info.stop_token_ids)
        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(info, max_threads=max(1, min(8, os.cpu_count() or 1)))
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiled_total = 0  # cache misses

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`; StructuredError (naming spec.field) if the library refuses it."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        try:
            cg = self._compile(spec)
        except StructuredError:
            raise
        except Exception as e:  # the library's RuntimeError/ValueError: an invalid or unsupported grammar
            raise StructuredError(f"{spec.field}: {_reason(e)}", spec.field) from None
        with self._lock:
            self._cache[spec.key] = cg
            self.compiled_total += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return cg

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        c = self._compiler
        if spec.kind == "json":
            try:
                json.loads(spec.value)
            except ValueError as e:
                raise StructuredError(f"{spec.field}: the schema is not valid JSON: {e}", spec.field) from None
            # compact JSON: with free whitespace, random or weak weights can pad forever
            return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.value)
        if spec.kind == "choice":
            options = json.loads(spec.value)
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))
        if spec.kind == "tool_calls":
            return c.compile_grammar(self._tool_calls(json.loads(spec.value)))
        return c.compile_grammar(spec.value)  # "grammar": EBNF

    def _tool_calls(self, v: dict[str, Any]) -> xgr.Grammar:
        """1..max_calls Hermes blocks, each `<tool_call>\n` + a call matching the schema + `\n</tool_call>`."""
        G = self._xgr.Grammar
        call = G.from_json_schema(json.dumps(v["schema"]), any_whitespace=False, strict_mode=True)
        block = G.concat(G.from_ebnf('root ::= "<tool_call>\\n"'), call, G.from_ebnf('root ::= "\\n</tool_call>"'))
        sep = G.from_ebnf('root ::= "\\n"')
        options, seq = [], [block]
        for _ in range(max(1, int(v["max_calls"]))):
            options.append(G.concat(*seq) if len(seq) > 1 else block)
            seq += [sep, block]
        return G.union(*options) if len(options) > 1 else options[0]

    def is_cached(self, spec: GrammarSpec) -> bool:
        with self._lock:
            return spec.key in self._cache

    def matcher(self, spec: GrammarSpec) -> GrammarState:
        return GrammarState(self._xgr.GrammarMatcher(self.compile(spec)))

    def cache_info(self) -> dict[str, int]:
        return {"cached": len(self._cache), "compiled_total": self.compiled_total}


class GrammarState:
    """The grammar matcher of one request: advanced by each token the request samples (Scheduler.update),
    asked for the allowed next tokens when the request is scheduled to sample."""

    __slots__ = ("matcher", "num_accepted", "rejected")

    def __init__(self, matcher: Any):
        self.matcher = matcher
        self.num_accepted = 0
        self.rejected = False  # a token the grammar did not allow reached it (should not happen)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and took its stop token: only stop tokens may follow."""
        return bool(self.matcher.is_terminated())

    def accept(self, token: int) -> bool:
        if self.rejected or self.terminated:
            return False
        ok = bool(self.matcher.accept_token(token))
        if ok:
            self.num_accepted += 1
        else:
            self.rejected = True
        return ok


_compilers: dict[tuple[str, int, tuple[int, ...]], GrammarCompiler] = {}
_compilers_lock = threading.Lock()


def get_compiler(tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> GrammarCompiler:
    """One compiler (and cache) per tokenizer per process: the LLM client's validation and an
    in-process engine core share it, so a schema compiles once."""
    key = (tokenizer_path, vocab_size, tuple(stop_token_ids))
    with _compilers_lock:
        comp = _compilers.get(key)
        if comp is None:
            comp = _compilers[key] = GrammarCompiler(tokenizer_path, vocab_size, stop_token_ids)
        return comp


def compiler_exists(tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> bool:
    """Whether get_compiler would return at once (the tokenizer's tables are built)."""
    with _compilers_lock:
        return (tokenizer_path, vocab_size, tuple(stop_token_ids)) in _compilers


def fill_bitmasks(states: list[GrammarState], vocab_size: int, stop_token_ids: list[int]) -> np.ndarray:
    """The packed int32 bitmask [len(states), words] of the tokens each state allows next: the
    library's batched (multi-threaded) fill; a finished grammar allows only the stop tokens."""
    bm = np.zeros((len(states), bitmask_width(vocab_size)), dtype=np.int32)
    live = [i for i, s in enumerate(states) if not (s.terminated or s.rejected)]
    if live:
        _batch_matcher().batch_fill_next_token_bitmask([states[i].matcher for i in live], bm, live)
    if len(live) < len(states):
        stop_row = np.zeros(bm.shape[1], dtype=np.uint32)
        for t in stop_token_ids:
            stop_row[t >> 5] |= np.uint32(1 << (t & 31))
        alive = set(live)
        bm[[i for i in range(len(states)) if i not in alive]] = stop_row.view(np.int32)
    return bm


_batch: Any = None


def _batch_matcher() -> Any:
    global _batch
    if _batch is None:
        import xgrammar as xgr

        _batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, os.cpu_count() or 1)))
    return _batch
