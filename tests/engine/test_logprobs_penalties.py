"""Logprobs, penalties, logit_bias and min_tokens through the offline `LLM`, against `transformers`'
float32 logits: logprobs equal its log-softmax at every prompt and output position (chunked prefill,
radix-cache hits, a batch), and greedy continuations under penalties equal a straightforward
per-request Python reference, with overlap scheduling on and off."""

from __future__ import annotations

import pytest
import torch

from nanovllmx import LLM, SamplingParams
from tests.helpers import CONTEXT_LEN, EOS_IDS, random_prompt

TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def llm(request, tiny_model_dir):
    # a small token budget: prompts are prefilled in several chunks
    engine = LLM(
        str(tiny_model_dir), context_len=CONTEXT_LEN, max_num_batched_tokens=24, overlap_scheduling=request.param
    )
    yield engine
    engine.shutdown()


def _check_lp(lp, logits_row: torch.Tensor, token: int, k: int) -> None:
    ref = torch.log_softmax(logits_row.double(), dim=-1)
    assert lp.token_id == token
    assert abs(lp.logprob - float(ref[token])) < TOL
    v = ref[token]
    assert int((ref > v + TOL).sum()) + 1 <= lp.rank <= int((ref > v - TOL).sum()) + 1  # near-ties may swap
    assert len(lp.top) == k
    top_v, top_i = ref.topk(k)
    for (tid, v), rv, ri in zip(lp.top, top_v.tolist(), top_i.tolist()):
        assert abs(v - rv) < TOL
        assert tid == ri or abs(float(ref[tid]) - rv) < TOL  # ties may order differently


def test_logprobs_match_hf_log_softmax(llm, hf_ref):
    shared = random_prompt(40, seed=71)
    prompts = [shared + random_prompt(9, seed=72), random_prompt(30, seed=73), shared + random_prompt(5, seed=74)]
    llm.generate([shared + [1, 2]], SamplingParams(temperature=0, max_tokens=2))  # the shared prefix is cached
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3),
        SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0),
    ]
    outs = llm.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        full = p + o.token_ids
        logits = hf_ref.logits(full)
        if sp.logprobs is None:
            assert o.logprobs is None
        else:
            assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids)
            for i, lp in enumerate(o.logprobs):
                _check_lp(lp, logits[len(p) - 1 + i], o.token_ids[i], sp.logprobs)
        if sp.prompt_logprobs is None:
            assert o.prompt_logprobs is None
        else:
            assert o.prompt_logprobs is not None and len(o.prompt_logprobs) == len(p)
            assert o.prompt_logprobs[0] is None
            for i in range(1, len(p)):
                _check_lp(o.prompt_logprobs[i], logits[i - 1], p[i], sp.prompt_logprobs)
    assert outs[2].num_cached_tokens == 0  # prompt logprobs recompute a cached prefix


async def _stream_logprobs(llm: LLM, prompt: list[int], sp: SamplingParams):
    ids, lps, plps = [], [], None
    async for d in llm.stream(prompt, sp):
        ids += d.token_ids
        lps += d.logprobs or []
        plps = plps or d.prompt_logprobs
    return ids, lps, plps


def test_streamed_logprobs(llm):
    import asyncio

    prompt = random_prompt(20, seed=75)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    (full,) = llm.generate([prompt], sp)
    ids, lps, plps = asyncio.run(_stream_logprobs(llm, prompt, sp))
    assert ids == full.token_ids and [lp.token_id for lp in lps] == ids
    assert [lp.logprob for lp in lps] == pytest.approx([lp.logprob for lp in full.logprobs], abs=TOL)
    assert plps is not None and len(plps) == len(prompt)


# ------------------------------------------------------------------ penalties: a per-request reference
def reference_greedy(hf_ref, prompt: list[int], sp: SamplingParams, stop_ids: set[int]) -> list[int]:
    """Greedy decoding with vLLM's logits processing, one request, plain Python over HF logits."""
    out: list[int] = []
    while len(out) < sp.max_tokens:
        logits = hf_ref.logits(prompt + out)[-1].double().clone()
        if len(out) < sp.min_tokens:
            for t in stop_ids:
                logits[t] = float("-inf")
        for t, b in (sp.logit_bias or {}).items():
            logits[t] += b
        for t in set(prompt + out):
            if sp.repetition_penalty != 1:
                v = logits[t]
                logits[t] = v / sp.repetition_penalty if v > 0 else v * sp.repetition_penalty
        for t in set(out):
            logits[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty
        tok = int(logits.argmax())
        out.append(tok)
        if tok in stop_ids:
            break
    return out


def test_penalties_bias_min_tokens_match_reference(llm, hf_ref):
    # the first prompt is prefilled in two chunks, the first of which samples nothing
    prompts = [random_prompt(n, seed=80 + n) for n in (40, 12, 5, 9, 6, 11)]
    plain = llm.generate(prompts[2:3], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    first = plain[0].token_ids[0]
    # random weights seldom repeat a token: biases make a few tokens (one of them in the first
    # prompt's first chunk) the likeliest, so that penalties decide between them
    bias = {11: 30.0, 42: 29.0, 7: 28.0, prompts[0][3]: 31.0}
    params = [
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logit_bias=bias, repetition_penalty=1.8),
        SamplingParams(
            temperature=0, max_tokens=14, ignore_eos=True, logit_bias=bias, presence_penalty=1.5, frequency_penalty=0.7
        ),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=-0.5, repetition_penalty=0.7),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={11: 100.0, 42: 60.0, 7: -100.0}),
        # the first token would stop it: masked until 4 tokens are out
        SamplingParams(temperature=0, max_tokens=10, min_tokens=4, stop_token_ids=[first], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),  # a plain row in the same batch
    ]
    prompts[4] = prompts[2]
    outs = llm.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(EOS_IDS))
        assert o.token_ids == reference_greedy(hf_ref, p, sp, stop_ids), sp
    assert first not in outs[4].token_ids[:4]
    biased = llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logit_bias=bias))
    for b, o in zip(biased, outs):  # the penalties did change something
        assert b.token_ids != o.token_ids
    assert biased[0].token_ids[0] == prompts[0][3] != outs[0].token_ids[0]  # the prompt token is penalised
