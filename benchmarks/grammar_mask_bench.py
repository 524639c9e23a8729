"""CPU time per engine step to compute the next-token bitmask of 256 requests under one JSON schema,
for the grammar libraries nanovllmx could use (xgrammar, llguidance). Each step: fill the masks of
every row (the library's batched/parallel call), then each row accepts a random allowed token (what
random weights do: the hardest case, it walks the whole grammar). Compile time (cold, then cached)
is reported separately.

  python -m benchmarks.grammar_mask_bench [--model DIR] [--batch 256] [--steps 64] [--threads 2]

llguidance is not a dependency of nanovllmx: `pip install llguidance==1.9.1` to compare (else
`--libs xgrammar`). Numbers and the choice: docs/benchmarks.md, "Structured outputs".
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}


def _allowed(mask_row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.nonzero(bits)[0]


def bench_xgrammar(tok, vocab: int, batch: int, steps: int, threads: int, rng: np.random.Generator) -> dict:
    import xgrammar as xgr

    tz = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, max_threads=threads)
    t1 = time.perf_counter()
    cg = compiler.compile_json_schema(json.dumps(SCHEMA))
    t2 = time.perf_counter()
    compiler.compile_json_schema(json.dumps(SCHEMA))
    t3 = time.perf_counter()
    matchers = [xgr.GrammarMatcher(cg) for _ in range(batch)]
    bm = xgr.allocate_token_bitmask(batch, vocab).numpy()
    bgm = xgr.BatchGrammarMatcher(max_threads=threads)
    fill, accept = [], []
    for _ in range(steps):
        a = time.perf_counter()
        bgm.batch_fill_next_token_bitmask(matchers, bm)
        b = time.perf_counter()
        toks = []
        for i, m in enumerate(matchers):
            if m.is_terminated():
                m.reset()
                bgm.batch_fill_next_token_bitmask([m], bm[i : i + 1])
            ids = _allowed(bm[i], vocab)
            toks.append(int(rng.choice(ids)))
        c = time.perf_counter()
        for m, t in zip(matchers, toks):
            if not m.accept_token(t):
                m.reset()
        d = time.perf_counter()
        fill.append(b - a)
        accept.append(d - c)
    return dict(
        lib="xgrammar",
        tokenizer_info_ms=(t0 - tz) * 1e3,
        compiler_ms=(t1 - t0) * 1e3,
        compile_ms=(t2 - t1) * 1e3,
        compile_cached_ms=(t3 - t2) * 1e3,
        fill_ms=float(np.median(fill) * 1e3),
        fill_p90_ms=float(np.percentile(fill, 90) * 1e3),
        accept_ms=float(np.median(accept) * 1e3),
    )


def bench_llguidance(tok, vocab: int, batch: int, steps: int, threads: int, rng: np.random.Generator) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp

    t0 = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t1 = time.perf_counter()
    grm = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matchers = [llguidance.LLMatcher(lt, grm) for _ in range(batch)]
    t2 = time.perf_counter()
    ex = llguidance.LLExecutor(num_threads=threads)
    bm = lnp.allocate_token_bitmask(batch, vocab)
    fill, accept = [], []
    for _ in range(steps):
        a = time.perf_counter()
        lnp.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(matchers)], bm)
        b = time.perf_counter()
        toks = []
        for i, m in enumerate(matchers):
            if m.is_stopped() or m.is_error():
                m.reset()
                lnp.fill_next_token_bitmask(m, bm, i)
            ids = _allowed(bm[i], vocab)
            toks.append(int(rng.choice(ids)))
        c = time.perf_counter()
        for m, t in zip(matchers, toks):
            if not m.consume_token(t):
                m.reset()
        d = time.perf_counter()
        fill.append(b - a)
        accept.append(d - c)
    return dict(
        lib="llguidance",
        tokenizer_info_ms=(t1 - t0) * 1e3,
        compile_ms=(t2 - t1) * 1e3,
        fill_ms=float(np.median(fill) * 1e3),
        fill_p90_ms=float(np.percentile(fill, 90) * 1e3),
        accept_ms=float(np.median(accept) * 1e3),
    )


def main() -> None:
    from transformers import AutoTokenizer

    from nanovllmx.utils.make_model import demo_model_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint with the tokenizer (default: the demo model)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--libs", default="xgrammar,llguidance")
    args = ap.parse_args()
    path = args.model or str(demo_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    vocab = json.load(open(f"{path}/config.json"))["vocab_size"]
    for lib in args.libs.split(","):
        fn = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance}[lib]
        r = fn(tok, vocab, args.batch, args.steps, args.threads, np.random.default_rng(0))
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
