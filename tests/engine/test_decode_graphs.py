"""The decode graph's step logic (worker/cuda_graph.py) on the CPU: the step a CUDA graph captures
(packed inputs, placeholders resolved on the device, req_to_token writes, in-step sampling and its
record) replayed eagerly, against the eager engine. Same tokens, or the graph path is wrong."""

from __future__ import annotations

from random import randint, seed

import pytest
import torch

from nanovllmx import LLM, SamplingParams

pytest.importorskip("triton")


def _torch_gumbel(logits: torch.Tensor, inv_temperature: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """kernels.sampling.gumbel_sample's contract in PyTorch (its kernel has its own tests): greedy
    rows (inverse temperature 0) take the argmax."""
    x = logits.float() * inv_temperature.unsqueeze(1)
    g = -torch.log(-torch.log(torch.rand_like(x).clamp_min(1e-20)))
    x = torch.where(inv_temperature.unsqueeze(1) > 0, x + g, logits.float())
    return x.argmax(-1).to(torch.int32)


def _generate(
    model: str, graphs: bool, prompts: list[list[int]], params: SamplingParams, **engine_kw
) -> list[list[int]]:
    llm = LLM(model, device="cpu", max_bs=8, context_len=256, overlap_scheduling=True, **engine_kw)
    try:
        if graphs:
            from nanovllmx.worker.cuda_graph import DecodeGraphs

            runner = llm.core.executor.worker.runner
            runner.graphs = DecodeGraphs(runner)  # replayed eagerly off the GPU
        out = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        # the first prompt again plus one token: its cached prefix makes a one-token step that must
        # also write the prefix slots into the table (a radix hit inside a graph step)
        out += [o.token_ids for o in llm.generate([prompts[0] + [7]], params, use_tqdm=False)]
        return out
    finally:
        llm.shutdown()


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize(
    "params,engine_kw",
    [
        (GREEDY, {}),  # sampled inside the step
        (SamplingParams(temperature=0.8, top_k=5, seed=11, max_tokens=10, ignore_eos=True), {}),  # eager sampler
        # a 3-token budget: one-token steps that hold prompt chunks which sample nothing
        (GREEDY, {"max_num_batched_tokens": 3}),
    ],
    ids=["greedy-in-step", "seeded-topk-eager", "one-token-prompt-chunks"],
)
def test_graph_step_matches_eager_engine(tiny_model_dir, monkeypatch, params, engine_kw):
    from nanovllmx.kernels import sampling

    monkeypatch.setattr(sampling, "gumbel_sample", _torch_gumbel)
    seed(3)
    prompts = [[randint(0, 10000) for _ in range(randint(3, 30))] for _ in range(6)]  # padded to 8 rows
    eager = _generate(str(tiny_model_dir), False, prompts, params, **engine_kw)
    graph = _generate(str(tiny_model_dir), True, prompts, params, **engine_kw)
    assert all(len(t) == 10 for t in graph)
    assert graph == eager
