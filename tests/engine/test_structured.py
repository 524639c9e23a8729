"""Structured outputs in the engine (tiny random-weight checkpoint, real Qwen3 tokenizer): whatever
the weights, every constrained output parses and validates against its schema (jsonschema), or is
reported as cut by max_tokens; constrained rows leave their unconstrained batch-mates' tokens
unchanged; the masks of a step scheduled ahead (overlap) give the same tokens as masks computed
before the step; a grammar that does not compile fails its request alone."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import numpy as np
import pytest

from nanovllmx import LLM, SamplingParams
from nanovllmx.scheduler.request import EngineRequest
from nanovllmx.structured import GrammarSpec, StructuredError
from tests.helpers import CONTEXT_LEN, random_prompt

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "ok", "n", "tags"],
    "additionalProperties": False,
}
PROMPTS = [random_prompt(12 + 5 * i, 100 + i) for i in range(6)]


def json_params(seed: int | None, temperature: float = 1.0, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, max_tokens=120, seed=seed, structured=GrammarSpec.json_schema(SCHEMA, "s"), **kw
    )


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # overlap scheduling (the GPU default): the masks of most steps are deferred (they follow the step)
    engine = LLM(str(tiny_model_dir), context_len=CONTEXT_LEN, max_bs=8, overlap_scheduling=True)
    yield engine
    engine.shutdown()


def test_json_schema_outputs_validate(llm) -> None:
    # unseeded (seeded rows draw their noise row by row: slow on CPU); seeds in the overlap test
    outs = llm.generate(PROMPTS, json_params(seed=None))
    for o in outs:
        assert o.finish_reason == "stop", (o.finish_reason, o.text)  # the grammar leads to EOS
        jsonschema.validate(json.loads(o.text), SCHEMA)
    # greedy too (argmax over the allowed tokens)
    for o in llm.generate(PROMPTS[:2], json_params(seed=None, temperature=0.0)):
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_regex_choice_and_truncation(llm) -> None:
    regex = SamplingParams(temperature=1.0, max_tokens=40, structured=GrammarSpec("regex", r"[a-c]{2,5}-\d"))
    choice = SamplingParams(
        temperature=1.0, max_tokens=20, structured=GrammarSpec.choice(["yes", "no", "maybe so"], "c")
    )
    # an unbounded string cut by max_tokens: reported as "length", never as a complete answer
    cut = SamplingParams(temperature=1.0, max_tokens=4, structured=GrammarSpec.json_schema({"type": "string"}, "s"))
    r, c, t = llm.generate(PROMPTS[:3], [regex, choice, cut])
    assert r.finish_reason == "stop" and re.fullmatch(r"[a-c]{2,5}-\d", r.text), r.text
    assert c.finish_reason == "stop" and c.text in ("yes", "no", "maybe so"), c.text
    assert t.text.startswith('"')
    assert t.finish_reason == "length" or json.loads(t.text) is not None


def test_constrained_rows_leave_others_unchanged(llm) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(PROMPTS[:3], plain)]
    mixed = llm.generate(PROMPTS[:3] + PROMPTS[3:], [plain] * 3 + [json_params(seed=None)] * 3)
    assert [o.token_ids for o in mixed[:3]] == alone
    for o in mixed[3:]:
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_constrained_rows_beside_logprobs_and_penalties(llm) -> None:
    # issue 23's per-row work (logprobs, penalties, logit_bias) in the batches of constrained rows,
    # whose masks mostly follow their step (overlap): the other rows' tokens and logprobs are those
    # they get alone
    special = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, presence_penalty=1.5, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias={7: 5.0}, prompt_logprobs=1),
    ]
    alone = llm.generate(PROMPTS[:3], special)
    mixed = llm.generate(PROMPTS[:3] + PROMPTS[3:], special + [json_params(seed=None)] * 3)
    for a, m in zip(alone, mixed[:3]):
        assert m.token_ids == a.token_ids
        if a.logprobs is not None:
            assert m.logprobs is not None and len(m.logprobs) == len(m.token_ids)
            np.testing.assert_allclose(
                [lp.logprob for lp in m.logprobs], [lp.logprob for lp in a.logprobs], rtol=1e-4, atol=1e-4
            )
            assert [[t for t, _ in lp.top] for lp in m.logprobs] == [[t for t, _ in lp.top] for lp in a.logprobs]
    assert mixed[2].prompt_logprobs is not None and len(mixed[2].prompt_logprobs) == len(PROMPTS[2])
    for o in mixed[3:]:
        assert o.logprobs is None
        jsonschema.validate(json.loads(o.text), SCHEMA)


@pytest.mark.parametrize(
    "field,value",
    [
        ("logprobs", 0),
        ("prompt_logprobs", 1),
        ("min_tokens", 2),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -0.5),
        ("repetition_penalty", 1.1),
        ("logit_bias", {5: 1.0}),
    ],
)
def test_grammar_refuses_what_its_resample_ignores(field, value) -> None:
    # the constrained resample uses the raw logits: these would silently not apply, so they are refused
    with pytest.raises(ValueError, match=f"^{field} cannot be combined with structured outputs"):
        json_params(seed=None, **{field: value})
    json_params(seed=None, logit_bias={})  # neutral values pass


def test_overlap_gives_the_same_tokens(tiny_model_dir, llm) -> None:
    # seeded sampling is keyed by (seed, output index): the same tokens with and without overlap,
    # so deferred masks (overlap) match masks computed at schedule time (no overlap)
    params = [json_params(seed=10 + i) for i in range(3)] + [SamplingParams(temperature=0.0, max_tokens=20)]
    here = [o.token_ids for o in llm.generate(PROMPTS[:4], params)]
    other = LLM(str(tiny_model_dir), context_len=CONTEXT_LEN, max_bs=8, overlap_scheduling=False)
    try:
        outs = other.generate(PROMPTS[:4], params)
        assert [o.token_ids for o in outs] == here
        for o in outs[:3]:
            jsonschema.validate(json.loads(o.text), SCHEMA)
    finally:
        other.shutdown()


def test_ignore_eos_runs_to_max_tokens_with_stop_tokens_after_the_grammar(llm) -> None:
    o = llm.generate(PROMPTS[:1], json_params(seed=None, ignore_eos=True))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 120
    eos = set(llm.config.eos_token_ids)
    k = next(i for i, t in enumerate(o.token_ids) if t in eos)  # the grammar's end
    assert all(t in eos for t in o.token_ids[k:])
    jsonschema.validate(json.loads(llm.tokenizer.decode(o.token_ids[:k])), SCHEMA)


def test_bad_grammars_fail_alone(llm) -> None:
    for spec, word in (
        (GrammarSpec.json_schema({"type": "objec"}, "response_format.json_schema.schema"), "objec"),
        (GrammarSpec("regex", "(?<=a)b", "guided_regex"), "Lookbehind"),
        (GrammarSpec("grammar", "root ::= ", "guided_grammar"), ""),
    ):
        with pytest.raises(StructuredError) as e:
            llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, structured=spec))
        assert str(e.value).startswith(spec.field + ": ") and word in str(e.value)
        assert e.value.param == spec.field
    # past the client's check (straight into the core): that request ends with an error, the engine goes on
    outs: list = []
    bad = EngineRequest("bad-1", PROMPTS[0], SamplingParams(max_tokens=4, structured=GrammarSpec("regex", "[")))
    core = llm.core
    core.sink, sink = (lambda o: outs.extend(o)), core.sink
    try:
        core.add_request(bad)
        deadline = time.monotonic() + 10
        while not outs and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        core.sink = sink
    assert outs and outs[0].finish_reason == "error" and outs[0].error, outs
    assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3))[0].finish_reason == "length"


def test_bitmask_unpacking_matches_xgrammar() -> None:
    import torch
    import xgrammar as xgr

    from nanovllmx.structured.bitmask import apply_bitmask

    rng = np.random.default_rng(0)
    V = 1000
    bm = rng.integers(-(2**31), 2**31 - 1, size=(3, (V + 31) // 32), dtype=np.int64).astype(np.int32)
    logits = torch.randn(3, V)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, torch.from_numpy(bm))
    assert torch.equal(apply_bitmask(logits, torch.from_numpy(bm)), want)


def test_core_compiles_new_grammars_off_the_loop(llm) -> None:
    # straight into the core (the Ray scheduler actor's path: no client compile before it): a grammar
    # not in the cache compiles in a thread, then the request runs; one aborted meanwhile never runs
    core = llm.core
    outs: list = []
    core.sink, sink = (lambda o: outs.extend(o)), core.sink
    try:
        for i, abort in ((0, True), (1, False)):
            spec = GrammarSpec.json_schema(
                {"type": "object", "properties": {f"k{i}": {"enum": [i]}}, "required": [f"k{i}"]}, "s"
            )
            core.add_request(
                EngineRequest(f"new-{i}", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=30, structured=spec))
            )
            if abort:
                core.abort(f"new-{i}")
        deadline = time.monotonic() + 20
        while not any(o.request_id == "new-1" and o.finish_reason for o in outs) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        core.sink = sink
    # the aborted one never runs: one final "abort" output and no tokens (its route in the Ray
    # scheduler actor ends with it)
    aborted = [o for o in outs if o.request_id == "new-0"]
    assert [(o.finish_reason, o.new_token_ids) for o in aborted] == [("abort", [])]
    text = llm.tokenizer.decode(
        [t for o in outs if o.request_id == "new-1" for t in o.new_token_ids], skip_special_tokens=True
    )
    assert json.loads(text) == {"k1": 1}
