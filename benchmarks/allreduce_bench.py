"""The TP all-reduce's cost per decode step on two GPUs: NCCL (eager and captured in a CUDA graph, as
the engine's decode graphs run it) against the one-shot all-reduce over peer memory
(nanovllmx/distributed/one_shot_allreduce.py), for the message sizes of a decode step and of a
prefill chunk. One process per GPU; `--visible own`: each process sees only its own GPU (as Ray
sets CUDA_VISIBLE_DEVICES for an actor), `--visible all`: both see both GPUs and each uses its rank's
(what the engine's workers do on one node, since peer memory needs the peer GPU visible).

    python -m benchmarks.allreduce_bench [--hidden 4096 --layers 36] [--tokens 1,64,128,256,512,2048]
        [--visible own|all]

Per step: a Qwen3 layer does two all-reduces of [tokens, hidden] (after attention and after the MLP),
so a step costs 2 * layers all-reduces; `ms/step` is that at each size. Run by
`benchmarks/gpu_run.sh multi`; the last line is JSON."""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def _worker(rank: int, world: int, init_file: str, a: argparse.Namespace, q) -> None:
    # before CUDA starts: one GPU per process, or both visible and this rank's in use
    os.environ["CUDA_VISIBLE_DEVICES"] = str(rank) if a.visible == "own" else ",".join(str(r) for r in range(world))
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import logging

    logging.basicConfig(level=logging.INFO, format=f"rank {rank} %(name)s %(levelname)s: %(message)s")
    import torch
    import torch.distributed as dist

    from nanovllmx.distributed import parallel_state as ps
    from nanovllmx.utils.profiling import cuda_time, graph_time

    local = 0 if a.visible == "own" else rank
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    ps.init_parallel(world, 1, rank, "nccl", f"file://{init_file}")
    info = ps.get_parallel_info()
    dist.all_reduce(torch.ones(1, device=dev), group=info.tp_group)  # NCCL up before any capture
    one_shot = ps.init_one_shot_allreduce(dev, torch.bfloat16)
    rows = []
    for t in [int(x) for x in a.tokens.split(",")]:
        x = torch.randn((t, a.hidden), device=dev, dtype=torch.bfloat16)

        def nccl(x=x) -> None:
            dist.all_reduce(x, group=info.tp_group)

        row = {"tokens": t, "bytes": x.numel() * 2}
        row["nccl_eager_us"] = cuda_time(nccl) * 1e6
        row["nccl_graph_us"] = graph_time(nccl) * 1e6
        if one_shot and ps._ONE_SHOT is not None and ps._ONE_SHOT.applies(x):
            row["one_shot_graph_us"] = graph_time(lambda x=x: ps.tp_all_reduce(x)) * 1e6
        rows.append(row)
    if rank == 0:
        q.put({"one_shot_enabled": one_shot, "rows": rows})
    ps.destroy_parallel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096, help="Qwen3-8B: 4096; Qwen3-0.6B: 1024")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--tokens", default="1,16,64,128,256,512,2048,16384")
    ap.add_argument("--visible", choices=("own", "all"), default="all", help="GPUs each process sees")
    a = ap.parse_args()
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        procs = [ctx.Process(target=_worker, args=(r, 2, init_file, a, q)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
    res = q.get()
    n = 2 * a.layers
    enabled = res["one_shot_enabled"]
    print(f"visible: {a.visible}   one-shot enabled: {enabled}   per step: {n} all-reduces (hidden {a.hidden})")
    head = ("tokens", "KB", "nccl us", "nccl graph", "one-shot", "ms/step nccl", "one-shot")
    print(" ".join(f"{h:>{w}s}" for h, w in zip(head, (7, 8, 9, 10, 9, 12, 9))))
    for r in res["rows"]:
        os_us = r.get("one_shot_graph_us")
        r["ms_per_step_nccl_graph"] = round(n * r["nccl_graph_us"] / 1e3, 3)
        r["ms_per_step_one_shot"] = None if os_us is None else round(n * os_us / 1e3, 3)
        print(
            f"{r['tokens']:7d} {r['bytes'] / 1024:8.0f} {r['nccl_eager_us']:9.1f} {r['nccl_graph_us']:10.1f} "
            f"{'-' if os_us is None else f'{os_us:9.1f}':>9s} {r['ms_per_step_nccl_graph']:12.3f} "
            f"{'-' if os_us is None else r['ms_per_step_one_shot']:>9}"
        )
    print(json.dumps({"hidden": a.hidden, "layers": a.layers, "visible": a.visible, **res}))


if __name__ == "__main__":
    main()
