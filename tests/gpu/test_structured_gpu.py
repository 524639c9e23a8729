"""GPU only (skipped elsewhere): structured outputs on the GPU paths the CPU tests cannot reach: the
fused Triton sampler over masked logits (whole 1024-column blocks at -inf), and the engine with
CUDA-graph decode steps and overlap scheduling (deferred masks resampled from the graph's logits)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fused_sampler_keeps_to_the_mask() -> None:
    from nanovllmx.scheduler.messages import SamplingArrays
    from nanovllmx.worker.sampler import Sampler

    B, V = 8, 151936
    rng = np.random.default_rng(0)
    allowed = [rng.choice(V, size=int(rng.integers(1, 50)), replace=False) for _ in range(B)]
    bm = np.zeros((B, (V + 31) // 32), dtype=np.uint32)
    for i, ids in enumerate(allowed):
        for t in ids:
            bm[i, t >> 5] |= np.uint32(1 << (t & 31))
    dev = torch.device("cuda")
    s = Sampler(dev)
    assert s.fused
    z = np.zeros(B, np.float32)
    for temp in (0.0, 0.7, 1.5):
        sa = SamplingArrays(
            z + temp, z + 1, np.zeros(B, np.int32), z, np.full(B, -1, np.int64), np.zeros(B, np.int32), False, temp == 0
        )
        for _ in range(20):
            logits = torch.randn(B, V, device=dev, dtype=torch.bfloat16) * 5
            got = s.sample_constrained(logits, sa, torch.from_numpy(bm.view(np.int32)).to(dev)).cpu().tolist()
            assert all(t in set(a.tolist()) for t, a in zip(got, allowed)), temp


def test_engine_with_graphs_and_overlap(tmp_path) -> None:
    from nanovllmx import LLM, SamplingParams
    from nanovllmx.structured import GrammarSpec
    from nanovllmx.utils.make_model import make_model

    model = make_model(tmp_path, preset="tiny", dtype="bfloat16", device="cuda", head_dim=128)

    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"enum": ["x", "y"]}},
        "required": ["a", "b"],
    }
    llm = LLM(
        str(model), device="cuda", context_len=512, max_bs=16, overlap_scheduling=True, gpu_memory_utilization=0.3
    )
    try:
        prompts = [[1000 + i, 2000 + i, 3000 + i] for i in range(12)]
        params = [
            SamplingParams(temperature=1.0, max_tokens=60, structured=GrammarSpec.json_schema(schema, "s"))
            if i % 3 == 0
            else SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
            for i in range(12)
        ]
        outs = llm.generate(prompts, params)
        for i, o in enumerate(outs):
            if i % 3 == 0:
                assert o.finish_reason == "stop"
                jsonschema.validate(json.loads(o.text), schema)
            else:
                assert len(o.token_ids) == 30
    finally:
        llm.shutdown()


def test_graphs_and_overlap_beside_logprobs_and_penalties(tmp_path) -> None:
    # issue 23's logprobs / penalties rows in the batches of constrained rows (graph decode, masks
    # deferred): those rows keep the tokens and logprobs they get alone
    from nanovllmx import LLM, SamplingParams
    from nanovllmx.structured import GrammarSpec
    from nanovllmx.utils.make_model import make_model

    # sharp logits: greedy tokens compare in bf16 whatever the batch (as tests/gpu/test_gpu_logprobs.py)
    model = make_model(tmp_path, preset="tiny", dtype="bfloat16", device="cuda", head_dim=128, initializer_range=0.3)
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2, 3]}}, "required": ["a"]}
    llm = LLM(
        str(model), device="cuda", context_len=512, max_bs=16, overlap_scheduling=True, gpu_memory_utilization=0.3
    )
    try:
        prompts = [[1000 + i, 2000 + i, 3000 + i] for i in range(6)]
        special = [
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, frequency_penalty=1.0, logprobs=0),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        ]
        alone = llm.generate(prompts[:3], special)
        grammar = SamplingParams(temperature=1.0, max_tokens=40, structured=GrammarSpec.json_schema(schema, "s"))
        mixed = llm.generate(prompts, special + [grammar] * 3)
        for a, m in zip(alone, mixed[:3]):
            assert m.token_ids == a.token_ids
            if a.logprobs is not None:
                assert m.logprobs is not None and len(m.logprobs) == len(m.token_ids)
                for x, y in zip(m.logprobs, a.logprobs):
                    assert abs(x.logprob - y.logprob) < 0.05 + 0.01 * abs(y.logprob)  # bf16, other batch shapes
        for o in mixed[3:]:
            assert o.finish_reason == "stop"
            jsonschema.validate(json.loads(o.text), schema)
    finally:
        llm.shutdown()
