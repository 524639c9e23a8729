#!/usr/bin/env python
"""Write a random-weight Qwen3 (or Qwen3-MoE) checkpoint with the real Qwen3 tokenizer: bf16/fp32,
FP8 (Qwen3-*-FP8's block-wise e4m3 format), YaRN rope scaling.

Needs nanovllmx importable: installed (`pip install -e .`), or run as a module from the checkout's
root (`python -m scripts.make_tiny_model /tmp/tiny`).

Examples:
    python scripts/make_tiny_model.py /tmp/tiny
    python scripts/make_tiny_model.py /tmp/qwen3-8b --preset qwen3-8b --dtype bfloat16 --device cuda
    python scripts/make_tiny_model.py /tmp/wide --layers 2 --hidden 256 --heads 8 --kv-heads 4
    python scripts/make_tiny_model.py /tmp/moe --preset tiny-moe
    python scripts/make_tiny_model.py /tmp/qa3b --preset qwen3-30b-a3b --dtype bfloat16 --device cuda
    python scripts/make_tiny_model.py /tmp/q8b-fp8 --preset qwen3-8b --dtype bfloat16 --fp8
    python scripts/make_tiny_model.py /tmp/yarn --yarn-factor 4 --yarn-original 1024
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nanovllmx.utils.make_model import PRESETS, make_model

# CLI flag -> Qwen3Config field
_OVERRIDES = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--fp8", action="store_true", help="projections in FP8 e4m3 with 128 x 128 block scales")
    ap.add_argument("--yarn-factor", type=float, help="YaRN rope_scaling factor (with --yarn-original)")
    ap.add_argument("--yarn-original", type=int, help="YaRN original_max_position_embeddings")
    args = ap.parse_args(argv)

    overrides = {field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag) is not None}
    if (args.yarn_factor is None) != (args.yarn_original is None):
        ap.error("--yarn-factor and --yarn-original go together")
    if args.yarn_factor is not None:
        overrides["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": args.yarn_factor,
            "original_max_position_embeddings": args.yarn_original,
        }
    t0 = time.perf_counter()
    out = make_model(
        args.out_dir,
        preset=args.preset,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        fp8=args.fp8,
        **overrides,
    )
    print(f"wrote {args.preset} ({args.dtype}, seed {args.seed}) to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
