"""Qwen3-MoE on Ray grids (CPU, gloo): experts sharded over their intermediate dimension (TP=2)
and the layers split into stages (PP=2) give transformers' greedy tokens on the tiny MoE
checkpoint (its dense mlp_only layer included)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ray")

from nanovllmx import LLM, SamplingParams  # noqa: E402
from tests.helpers import random_prompt  # noqa: E402

PROMPTS = [random_prompt(n, seed) for n, seed in [(4, 1), (37, 2), (70, 3)]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from nanovllmx.utils.make_model import make_model

    return make_model(tmp_path_factory.mktemp("moe-grid"), preset="tiny-moe", seed=1, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def expected(moe_dir) -> list[list[int]]:
    from transformers import Qwen3MoeForCausalLM

    hf = Qwen3MoeForCausalLM.from_pretrained(moe_dir, dtype=torch.float32, attn_implementation="eager").eval()
    n = GREEDY.max_tokens
    with torch.inference_mode():
        return [
            hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p) :].tolist()
            for p in PROMPTS
        ]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_moe_grid_matches_transformers(local_ray, moe_dir, expected, tp, pp):
    llm = LLM(str(moe_dir), context_len=256, tp_size=tp, pp_size=pp, executor="ray", pp_microbatch_min_tokens=1)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    finally:
        llm.shutdown()
