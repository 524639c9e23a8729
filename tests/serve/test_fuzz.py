"""Fuzzing the OpenAI app (issue 7): no input may produce a 5xx.

- `schemathesis` generates requests from the app's own `/openapi.json` (schema-valid and, where
  the schema allows it, schema-violating ones) for every route;
- a hypothesis fuzzer of raw JSON bodies goes where the schema does not: any JSON value for any
  field, NaN / Infinity, huge integers, lone UTF-16 surrogates, deep nesting.

Every answer is < 500, and every 4xx carries OpenAI's error JSON. A bounded number of examples per
route (NANOVLLMX_FUZZ_EXAMPLES, default 30), derandomized so CI is reproducible (set
NANOVLLMX_FUZZ_RANDOM=1 for fresh examples), loopback only. SamplingParams validation itself is
property-tested in tests/unit/test_sampling.py.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllmx.utils.demo import DEMO_MODEL_NAME
from tests.helpers import free_port

schemathesis = pytest.importorskip("schemathesis")
ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(300)

EXAMPLES = int(os.environ.get("NANOVLLMX_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("NANOVLLMX_FUZZ_RANDOM"),
    suppress_health_check=list(HealthCheck),
    database=None,
)
CONTEXT_LEN = 32  # a valid request generates at most ~25 tokens: the fuzzer stays fast


def _operations() -> list[tuple[str, str]]:
    from nanovllmx.serve.app import app

    return [(method, path) for path, ops in app.openapi()["paths"].items() for method in ops]


@pytest.fixture(scope="module")
def url():
    from ray import serve

    from nanovllmx.serve import build_app

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app({"model": DEMO_MODEL_NAME, "device": "cpu", "context_len": CONTEXT_LEN, "max_bs": 8}),
            name="fuzz",
            route_prefix="/",
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _check(status: int, text: str, what) -> None:
    assert status < 500, f"{what} -> {status}: {text[:500]}"
    if status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, (what, body)


@pytest.mark.parametrize("method,path", _operations(), ids=lambda x: x)
def test_openapi_schema_fuzz_never_5xx(url, method, path):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    op = schema[path][method]
    strategy = op.as_strategy(schemathesis.GenerationMode.POSITIVE)
    if op.body or op.path_parameters or op.query:  # something to break: schema-violating requests too
        strategy = st.one_of(strategy, op.as_strategy(schemathesis.GenerationMode.NEGATIVE))

    @FUZZ
    @given(case=strategy)
    def run(case):
        r = case.call(base_url=url, timeout=60)
        _check(r.status_code, r.text, case)

    run()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


# ---------------------------------------------------------------------------- raw JSON bodies
_bad_text = (
    st.text(st.characters() | st.characters(categories=["Cs"]), min_size=1, max_size=12)  # lone surrogates
    | st.sampled_from(["\ud800", "a\udfffb"])
)
_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | _bad_text
)
_json = st.recursive(
    _scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_bad_text, inner, max_size=4), max_leaves=12
)


def _mostly(valid, invalid=_json):
    """Valid values nine times out of ten, so that many requests get through to the engine."""
    return st.integers(0, 9).flatmap(lambda i: invalid if i == 0 else valid)


_text = _mostly(st.text(max_size=12), _bad_text)
_message = st.fixed_dictionaries(
    {"role": _mostly(st.sampled_from(["system", "user", "assistant", "developer"]))},
    optional={"content": _mostly(_text), "name": _mostly(_text), "tool_calls": _mostly(st.none())},
)
_fields = {
    "model": _mostly(st.just(DEMO_MODEL_NAME)),
    "max_tokens": _mostly(st.integers(1, 8), st.integers(-(2**70), 2**70) | _json),
    "temperature": _mostly(st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True) | _json),
    "top_p": _mostly(st.floats(0.01, 1), st.floats(allow_nan=True, allow_infinity=True) | _json),
    "top_k": _mostly(st.integers(-1, 200_000), st.integers(-(2**70), 2**70) | _json),
    "min_p": _mostly(st.floats(0, 1), st.floats(allow_nan=True) | _json),
    "stop": _mostly(_text | st.lists(_text, max_size=3)),
    "stop_token_ids": _mostly(st.lists(st.integers(0, 200_000), max_size=3)),
    "seed": _mostly(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**70), 2**70) | _json),
    "n": _mostly(st.just(1)),
    "stream": _mostly(st.booleans()),
    "stream_options": _mostly(
        st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()})
    ),
    "ignore_eos": _mostly(st.booleans()),
    "presence_penalty": _mostly(st.just(0)),
    "logit_bias": _mostly(st.none() | st.just({})),
    "return_token_ids": _mostly(st.booleans()),
    # structured outputs (issue 22): random regexes and schemas compile or give a 400, never a 5xx
    "guided_regex": _mostly(_text),
    "guided_choice": _mostly(st.lists(_text, max_size=3)),
    "structured_outputs": _mostly(
        st.fixed_dictionaries({}, optional={"regex": _text, "json": _json, "choice": st.lists(_text, max_size=2)})
    ),
}
_chat = st.fixed_dictionaries(
    {"messages": _mostly(st.lists(_message, min_size=1, max_size=3))},
    optional={
        **_fields,
        "max_completion_tokens": _mostly(st.integers(1, 8)),
        "logprobs": _mostly(st.just(False)),
        "tools": _mostly(st.none() | st.just([{"type": "function", "function": {"name": "f"}}])),
        "tool_choice": _mostly(
            st.sampled_from(["auto", "none", "required"]) | st.just({"type": "function", "function": {"name": "f"}})
        ),
        "chat_template_kwargs": _mostly(st.just({"enable_thinking": False})),
        "continue_final_message": _mostly(st.booleans()),
        "response_format": _mostly(
            st.sampled_from([{"type": "text"}, {"type": "json_object"}])
            | st.fixed_dictionaries(
                {
                    "type": st.just("json_schema"),
                    "json_schema": st.fixed_dictionaries({"name": _text}, optional={"schema": _json}),
                }
            )
        ),
    },
)
_prompt = _mostly(
    _text | st.lists(st.integers(0, 150_000), max_size=8),
    st.lists(st.integers(-5, 200_000), max_size=8) | st.lists(_text, max_size=2) | _json,
)
_completion = st.fixed_dictionaries(
    {"prompt": _prompt},
    optional={
        **_fields,
        "logprobs": _mostly(st.none()),
        "echo": _mostly(st.just(False)),
        "suffix": _mostly(st.none()),
        "best_of": _mostly(st.just(1)),
    },
)


def _post(url: str, path: str, body) -> None:
    # ensure_ascii: lone surrogates travel as \\udXXX escapes, the way a JSON client would send them
    r = httpx.post(
        f"{url}{path}",
        content=json.dumps(body, ensure_ascii=True, allow_nan=True).encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    _check(r.status_code, r.text, (path, body))


@pytest.mark.parametrize(
    "path,bodies", [("/v1/chat/completions", _chat), ("/v1/completions", _completion)], ids=["chat", "completion"]
)
def test_raw_bodies_never_5xx(url, path, bodies):
    @FUZZ
    @given(body=_mostly(bodies))
    def run(body):
        _post(url, path, body)

    run()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
