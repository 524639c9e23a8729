"""GPU correctness check: FlashInfer + CUDA graphs against the torch reference backend (bf16),
greedy tokens for a batch of mixed prompts including a shared prefix. Prints a short table.

    python -m benchmarks.gpu_check --model /tmp/q4s [--with-ray] [--no-hf] [--grids 2x1,1x2,2x1-nccl,1x2-l1]

Run by `benchmarks/gpu_run.sh check` (and `multi` for the grids); what the numbers mean on a
random-weight checkpoint: docs/benchmarks.md, "Correctness on the GPU"."""

from __future__ import annotations

import argparse
import sys


def _grid(spec: str) -> tuple[str, dict]:
    """A row of the Ray engine on a TPxPP grid: "2x1", "1x2"; "-os" the one-shot TP all-reduce (the
    default), "-nccl" NCCL for all ("2x1-nccl"), "-lN" runs N pipeline lanes ("1x2-l1": one batch at
    a time), "-no" without overlap scheduling ("1x2-no": pp_size + 1 lanes, no ids sent from the
    last stage to the first)."""
    grid, *opts = spec.split("-")
    tp, pp = (int(v) for v in grid.split("x"))
    kw: dict = dict(attention_backend="flashinfer", executor="ray", tp_size=tp, pp_size=pp)
    for o in opts:
        if o in ("os", "nccl"):
            kw["tp_allreduce"] = "one_shot" if o == "os" else "nccl"
        elif o == "no":
            kw["overlap_scheduling"] = False
        elif o.startswith("l"):
            kw["pp_inflight_batches"] = int(o[1:])
        else:
            raise SystemExit(f"unknown grid option {o!r} in {spec!r}")
    return f"ray-tp{tp}-pp{pp}" + "".join(f"-{o}" for o in opts), kw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--with-ray", action="store_true", help="also the Ray engine (scheduler + worker actors)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' reference")
    ap.add_argument(
        "--grids",
        default="",
        help="also the Ray engine on these TPxPP grids, e.g. 2x1,1x2,2x1-nccl (NCCL all-reduce),1x2-l1 (one lane)",
    )
    a = ap.parse_args()
    from random import randint, seed

    from nanovllmx import LLM, SamplingParams

    seed(1)
    shared = [randint(0, 10000) for _ in range(300)]
    prompts = [[randint(0, 10000) for _ in range(randint(5, 700))] for _ in range(12)]
    prompts += [shared + [randint(0, 10000) for _ in range(randint(1, 50))] for _ in range(4)]
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    results = {}
    for name, kw in (
        [
            ("torch-eager", dict(attention_backend="torch", enforce_eager=True)),
            ("flashinfer-eager", dict(attention_backend="flashinfer", enforce_eager=True)),
            ("flashinfer-graphs", dict(attention_backend="flashinfer", enforce_eager=False)),
            # near-greedy sampling: in the graph (no filters), then the eager sampler on the
            # graph's logits (top_k). Not exact against greedy: bf16 logits tie often on this
            # sharp model, and greedy breaks ties by index where a draw picks either
            ("fi-graphs-T1e-3", dict(attention_backend="flashinfer", temperature=1e-3)),
            ("fi-graphs-T1e-3-topk5", dict(attention_backend="flashinfer", temperature=1e-3, top_k=5)),
        ]
        + ([("ray-flashinfer-graphs", dict(attention_backend="flashinfer", executor="ray"))] if a.with_ray else [])
        + [_grid(g) for g in a.grids.split(",") if g]
    ):
        sampling = {k: kw.pop(k) for k in ("temperature", "top_k") if k in kw}
        p = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True, **sampling) if sampling else sp
        llm = LLM(a.model, context_len=2048, max_bs=64, **kw)
        outs = llm.generate(prompts[:13], p)  # cold (one of them carries the shared prefix)
        outs += llm.generate(prompts[13:], p)  # shared prefix: radix hits
        results[name] = outs
        if kw.get("tp_size", 1) * kw.get("pp_size", 1) > 1:  # what the grid ran with
            st = llm.stats()
            print(
                f"{name}: one-shot all-reduce {st.get('tp_one_shot_allreduce')}, lanes {st.get('pipeline_lanes')}, "
                f"most steps in flight {st.get('max_inflight_steps')}, stage busy share {st.get('stage_busy_share')}"
            )
        llm.shutdown()
        del llm
    # transformers' own implementation (bf16, one request at a time) as a third opinion
    import torch
    from transformers import AutoModelForCausalLM

    hf_outs = []
    hf = None if a.no_hf else AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).cuda().eval()
    from nanovllmx.outputs import RequestOutput

    for p in prompts if hf is not None else []:
        g = hf.generate(
            torch.tensor([p], device="cuda"),
            max_new_tokens=a.max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        hf_outs.append(RequestOutput("hf", p, g[0, len(p) :].tolist(), "", "length"))
    if hf_outs:
        results["transformers"] = hf_outs
    ref = results["torch-eager"]
    fi = results["flashinfer-graphs"]  # same kernels: a grid or the Ray path should match it exactly
    print(
        f"{'backend':22s} {'exact':>6s} {'tok-match':>9s} {'first-div(min)':>14s} {'cached':>7s} "
        f"{'exact vs fi-graphs':>18s}"
    )
    ok = True
    for name, outs in results.items():
        exact = sum(o.token_ids == r.token_ids for o, r in zip(outs, ref))
        match = sum(x == y for o, r in zip(outs, ref) for x, y in zip(o.token_ids, r.token_ids))
        total = sum(len(r.token_ids) for r in ref)
        divs = [
            next((i for i, (x, y) in enumerate(zip(o.token_ids, r.token_ids)) if x != y), None)
            for o, r in zip(outs, ref)
        ]
        d = [x for x in divs if x is not None]
        cached = sum(o.num_cached_tokens for o in outs)
        same_fi = sum(o.token_ids == r.token_ids for o, r in zip(outs, fi))
        print(
            f"{name:22s} {exact:>3d}/{len(ref):<2d} {match / total:9.3f} {str(min(d)) if d else '-':>14s} {cached:>7d} "
            f"{same_fi:>15d}/{len(fi)}"
        )
        ok &= match / total > 0.9
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
