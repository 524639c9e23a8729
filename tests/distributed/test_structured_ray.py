"""Structured outputs on the Ray engine (CPU, gloo): on a 1x1 grid with overlap the grammar masks of
a step reach the worker after it (a GRAMMAR frame on the control socket); without the socket
(ray_step_mode "ray") and on a pipeline (pp 2, lanes) the engine applies the steps in flight
first; all give the local engine's tokens. And the masks travel with their rows when a batch is
split into pipeline micro-batches."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

pytest.importorskip("ray")

from nanovllmx import LLM, SamplingParams  # noqa: E402
from nanovllmx.structured import GrammarSpec  # noqa: E402
from tests.helpers import random_prompt  # noqa: E402

CTX = 512
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["x", "y"]}},
    "required": ["id", "tag"],
}
PROMPTS = [random_prompt(10 + 7 * i, 40 + i) for i in range(4)]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=60, structured=GrammarSpec.json_schema(SCHEMA, "s")) for _ in range(3)
] + [SamplingParams(temperature=0.0, max_tokens=16, logprobs=2)]  # issue 23's logprobs beside the grammar rows


def _result(outs) -> tuple[list, list[float]]:
    """(tokens and the top ids of the request that asks for logprobs, its logprob values)."""
    lps = [lp for o in outs for lp in o.logprobs or []]
    return [o.token_ids for o in outs] + [[t for t, _ in lp.top] for lp in lps], [lp.logprob for lp in lps]


@pytest.fixture(scope="module")
def local_tokens(tiny_model_dir) -> tuple[list, list[float]]:
    llm = LLM(str(tiny_model_dir), context_len=CTX, executor="local", max_bs=8)
    try:
        outs = llm.generate(PROMPTS, PARAMS)
    finally:
        llm.shutdown()
    for o in outs[:3]:
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert outs[3].logprobs is not None and len(outs[3].logprobs) == 16
    return _result(outs)


@pytest.mark.parametrize("mode,pp", [("socket", 1), ("ray", 1), ("socket", 2)], ids=["socket", "ray-calls", "pp2"])
def test_ray_engine_matches_local(local_ray, tiny_model_dir, local_tokens, mode, pp) -> None:
    # pp2: pipeline lanes with overlap; the steps in flight are applied before a constrained request
    # is scheduled, so its masks travel in the batch (split across micro-batches)
    llm = LLM(
        str(tiny_model_dir),
        context_len=CTX,
        executor="ray",
        max_bs=8,
        overlap_scheduling=True,
        ray_step_mode=mode,
        pp_size=pp,
    )
    try:
        ids, values = _result(llm.generate(PROMPTS, PARAMS))
        assert ids == local_tokens[0]
        np.testing.assert_allclose(values, local_tokens[1], atol=1e-4)
    finally:
        llm.shutdown()


def test_split_batch_carries_masks() -> None:
    from nanovllmx.distributed.microbatch import split_batch
    from nanovllmx.scheduler.messages import SamplingArrays, ScheduledBatch

    q = np.array([5, 1, 1, 4, 1, 1], np.int32)
    B, T = len(q), int(q.sum())
    sample_rows = np.array([1, 2, 3, 4, 5], np.int32)
    S = len(sample_rows)
    z = np.zeros(S, np.float32)
    sa = SamplingArrays(
        z, z + 1, np.zeros(S, np.int32), z, np.full(S, -1, np.int64), np.zeros(S, np.int32), False, True
    )
    grammar_rows = np.array([0, 2, 4], np.int32)  # sampled rows 0, 2, 4 = batch rows 1, 3, 5
    bitmask = np.array([[10, 11], [30, 31], [50, 51]], np.int32)
    b = ScheduledBatch(
        step=3,
        req_indices=np.arange(B, dtype=np.int32),
        start_pos=np.zeros(B, np.int32),
        q_lens=q,
        input_ids=np.arange(T, dtype=np.int32),
        out_slots=np.arange(T, dtype=np.int32),
        table_rows=np.zeros(0, np.int32),
        table_cols=np.zeros(0, np.int32),
        table_slots=np.zeros(0, np.int32),
        sample_rows=sample_rows,
        sampling=sa,
        grammar_rows=grammar_rows,
        bitmask=bitmask,
    )
    for m in (2, 3):
        got: dict[int, list[int]] = {}
        lo = 0
        for p in split_batch(b, m):
            if p.grammar_rows is not None:
                assert p.bitmask is not None and len(p.bitmask) == len(p.grammar_rows)
                for g, row in zip(p.grammar_rows.tolist(), p.bitmask.tolist()):
                    got[int(p.sample_rows[g]) + lo] = row  # back to the whole batch's row
            lo += p.num_reqs
        assert got == {1: [10, 11], 3: [30, 31], 5: [50, 51]}, m
