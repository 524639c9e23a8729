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


def _pipeline_tokens(
    model: str, graphs: bool, prompts: list[list[int]], params: list[SamplingParams]
) -> list[list[int]]:
    """Two pipeline stages in this process (no process group: stage 0's hidden states and residual
    are handed to stage 1 directly), driven by a scheduler; stage graphs replayed eagerly."""
    from nanovllmx.attention.metadata import KVPool
    from nanovllmx.config import EngineConfig
    from nanovllmx.distributed.parallel_state import ParallelInfo, set_parallel_info
    from nanovllmx.models.loader import load_weights
    from nanovllmx.models.qwen3 import Qwen3ForCausalLM, stage_layer_range
    from nanovllmx.scheduler.request import EngineRequest
    from nanovllmx.scheduler.scheduler import Scheduler
    from nanovllmx.worker.cuda_graph import DecodeGraphs
    from nanovllmx.worker.model_runner import ModelRunner

    cfg = EngineConfig(model, device="cpu", max_bs=8, context_len=256, pp_size=2)
    runners = []
    for rank in range(2):
        set_parallel_info(ParallelInfo(pp_rank=rank, pp_size=2))
        try:
            m = Qwen3ForCausalLM(cfg.hf_config, stage_layer_range(cfg.hf_config.num_hidden_layers, rank, 2))
            load_weights(m, model)
            attn = next(iter(m.layers.values())).self_attn
            kv = KVPool(m.num_local_layers, 2048, attn.num_kv_heads, attn.head_dim, torch.float32, torch.device("cpu"))
            runner = ModelRunner(cfg, m.eval(), kv, torch.device("cpu"))
            if graphs:
                runner.graphs = DecodeGraphs(runner)
            runners.append(runner)
        finally:
            set_parallel_info(ParallelInfo())
    assert not runners[0].model.is_last and not runners[1].model.is_first
    s = Scheduler(2048, 8, 256, 64, cfg.eos_token_ids, vocab_size=cfg.vocab_size)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        s.add_request(EngineRequest(str(i), p, sp))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    decode_steps = 0
    while s.has_work():
        b = s.schedule()
        if b is None:
            continue
        decode_steps += b.is_decode
        hidden, residual = runners[0].execute(b)
        for o in s.update(runners[1].execute(b, hidden, residual).result()):
            tokens[o.request_id] += o.new_token_ids
    assert decode_steps > 5
    return [tokens[str(i)] for i in range(len(prompts))]


def test_stage_graphs_match_eager_pipeline(tiny_model_dir, monkeypatch):
    """Each pipeline stage's decode graph (first stage: ids to hidden states; last stage: received
    hidden states to sampled ids), greedy in the graph and a seeded top-k row through the eager
    sampler over the graph's logits, against the eager stages."""
    from nanovllmx.kernels import sampling

    monkeypatch.setattr(sampling, "gumbel_sample", _torch_gumbel)
    seed(5)
    prompts = [[randint(0, 10000) for _ in range(randint(3, 90))] for _ in range(6)]  # 90: chunked prefill
    params = [GREEDY] * 5 + [SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=10, ignore_eos=True)]
    eager = _pipeline_tokens(str(tiny_model_dir), False, prompts, params)
    graph = _pipeline_tokens(str(tiny_model_dir), True, prompts, params)
    assert all(len(t) == 10 for t in graph)
    assert graph == eager
