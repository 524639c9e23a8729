"""Qwen3 clients over HTTP (issue 22), on the real Serve app with the demo checkpoint (random weights,
the real Qwen3 tokenizer and chat template), through the `openai` SDK and raw HTTP:
response_format / structured_outputs / guided_* outputs that parse and validate whatever the
weights; tool_choice required / named that always yields a valid call of the right tool (whole and
streamed, reassembled from OpenAI-shaped deltas); reasoning_content and reasoning_tokens (a regex
makes the random model write a think block); tool history rendered by the chat template; a 400
naming the field for every constraint the server cannot honour, with the replica still serving.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from nanovllmx.utils.demo import DEMO_MODEL_NAME
from tests.helpers import free_port

pytestmark = pytest.mark.timeout(300)

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"enum": ["c", "f"]},
    },
    "required": ["city", "days", "units"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["UTC", "CET"]}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
THINK_RE = r"<think>\n[a-z]{2,8}( [a-z]{2,8}){0,3}\n</think>\n\n[A-Z][a-z]{1,8}\."


@pytest.fixture(scope="module")
def url():
    import ray
    from ray import serve

    from nanovllmx.serve import build_app

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app({"model": DEMO_MODEL_NAME, "context_len": 1024, "max_bs": 8, "device": "cpu"}),
        name="structured",
        route_prefix="/",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": DEMO_MODEL_NAME, **body}, timeout=120)


def _error(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    e = r.json()["error"]
    assert e["param"] == param, e
    return str(e["message"])


# ============================================================================ structured outputs
def test_response_format_json_schema_validates(client) -> None:
    r = client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=MESSAGES,
        max_tokens=80,
        temperature=1.0,
        seed=1,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}},
    )
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_vllm_fields_and_completions(url) -> None:
    for body, check in (
        ({"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict)),
    ):
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": DEMO_MODEL_NAME, "prompt": "Answer:", "max_tokens": 200, "seed": 3, **body},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["finish_reason"] in ("stop", "length"), ch
        if ch["finish_reason"] == "stop":  # json_object's strings are unbounded: a cut one says "length"
            assert check(ch["text"]), (body, ch["text"])
        else:
            assert "json_object" in json.dumps(body), ch


def test_json_object_streamed(client) -> None:
    text, finish = "", None
    for ev in client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=MESSAGES,
        max_tokens=60,
        seed=4,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}},
    ):
        for c in ev.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


# ============================================================================ tool calls
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_call_is_valid(client, choice) -> None:
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = client.chat.completions.create(
            model=DEMO_MODEL_NAME,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            max_tokens=120,
            seed=seed,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.content is None and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        tools = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        if choice == "named":
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])


def test_forced_tool_call_streamed(client) -> None:
    calls: dict[int, dict] = {}
    finish = None
    for ev in client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        seed=7,
        stream=True,
    ):
        for c in ev.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.index not in calls:  # the first delta of a call: id, type, name
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMA)


def test_tool_history_is_rendered(url) -> None:
    # an assistant turn with tool_calls and the tool's answer go through the chat template
    history = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3, "units": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = _chat(url, messages=history, tools=TOOLS, max_tokens=2, return_token_ids=True)
    assert r.status_code == 200, r.text
    from transformers import AutoTokenizer

    from nanovllmx.utils.demo import demo_model_path

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    text = tok.decode(r.json()["prompt_token_ids"])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and "# Tools" in text


# ============================================================================ reasoning
def test_reasoning_content_whole_and_streamed(url) -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 60,
        "seed": 11,
        "structured_outputs": {"regex": THINK_RE},  # makes the random model write a think block
        "return_token_ids": True,
    }
    r = _chat(url, **body)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    msg = ch["message"]
    assert re.fullmatch(r"[a-z]{2,8}( [a-z]{2,8}){0,3}", msg["reasoning_content"]), msg
    assert re.fullmatch(r"[A-Z][a-z]{1,8}\.", msg["content"]), msg
    ids = ch["token_ids"]
    want = ids.index(151668) - ids.index(151667) - 1 if 151667 in ids and 151668 in ids else None
    got = r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert want is None or got == want, (got, ids)
    assert got > 0
    # streamed: the same split, in deltas
    reasoning, content = "", ""
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": DEMO_MODEL_NAME, **body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=120,
    ) as s:
        usage = None
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for c in ev["choices"]:
                reasoning += c["delta"].get("reasoning_content", "")
                content += c["delta"].get("content") or ""
            usage = ev.get("usage") or usage
    assert (reasoning, content) == (msg["reasoning_content"], msg["content"])
    assert usage["completion_tokens_details"]["reasoning_tokens"] == got


def test_thinking_off_has_no_reasoning(url) -> None:
    r = _chat(url, messages=MESSAGES, max_tokens=8, chat_template_kwargs={"enable_thinking": False}, seed=1)
    msg = r.json()["choices"][0]["message"]
    assert "reasoning_content" not in msg and msg["content"]
    assert r.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


# ============================================================================ errors
@pytest.mark.parametrize(
    "body,param,word",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
            "response_format.json_schema.schema",
            "objec",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "required",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"guided_regex": "(?<=a)b"}, "guided_regex", "Lookbehind"),
        ({"guided_json": "{not json"}, "guided_json", "JSON"),
        ({"guided_grammar": "root ::= "}, "guided_grammar", ""),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "not supported"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one of"),
        ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "cannot be combined"),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
        ({"tool_choice": "required"}, "tool_choice", "requires tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "always"),
    ],
)
def test_constraints_refused_with_400(url, body, param, word) -> None:
    assert word in _error(_chat(url, messages=MESSAGES, max_tokens=4, **body), param)


def test_replica_survives_bad_grammars(url) -> None:
    for _ in range(3):
        _error(_chat(url, messages=MESSAGES, max_tokens=4, guided_regex="[a-"), "guided_regex")
    r = _chat(url, messages=MESSAGES, max_tokens=4, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# ============================================================================ with issue 23's fields
@pytest.mark.parametrize(
    "route,extra,param",
    [
        ("chat", {"logprobs": True}, "logprobs"),
        ("chat", {"prompt_logprobs": 1}, "prompt_logprobs"),
        ("completions", {"logprobs": 0}, "logprobs"),
        ("completions", {"echo": True, "logprobs": 1}, "logprobs"),
        ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("completions", {"repetition_penalty": 1.2}, "repetition_penalty"),
        ("completions", {"logit_bias": {"5": 1}}, "logit_bias"),
        ("completions", {"min_tokens": 2}, "min_tokens"),
    ],
)
def test_grammar_with_logprobs_or_penalties_is_refused(url, route, extra, param) -> None:
    # the constrained resample uses the raw logits: these cannot apply to a grammar's rows (yet)
    body = {"guided_choice": ["yes", "no"], "max_tokens": 4, **extra}
    if route == "chat":
        r = _chat(url, messages=MESSAGES, **body)
    else:
        r = httpx.post(f"{url}/v1/completions", json={"model": DEMO_MODEL_NAME, "prompt": "Q:", **body}, timeout=120)
    assert "structured outputs" in _error(r, param)


def test_several_prompts_x_n_all_follow_the_grammar(url) -> None:
    body = {"model": DEMO_MODEL_NAME, "prompt": ["Q: a", "Q: bb"], "n": 2, "max_tokens": 12, "seed": 5}
    body["structured_outputs"] = {"regex": r"[a-c]{2,4}!"}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "stop" and re.fullmatch(r"[a-c]{2,4}!", c["text"]) for c in choices), choices
    texts: dict[int, str] = {}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {c["index"]: c["text"] for c in choices}  # seeded: the stream gives the same choices


def test_reasoning_parser_with_logprobs(url) -> None:
    # chat's output parser on (it may hold text back, e.g. a tag's start): every token's logprobs, whole and streamed
    body = {"messages": MESSAGES, "max_tokens": 8, "seed": 2, "temperature": 1.0, "logprobs": True, "top_logprobs": 2}
    r = _chat(url, **body)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    lps = ch["logprobs"]["content"]
    assert len(lps) == r.json()["usage"]["completion_tokens"] == 8
    assert all(len(t["top_logprobs"]) == 2 for t in lps)
    streamed: list = []
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={"model": DEMO_MODEL_NAME, **body, "stream": True}, timeout=120
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    streamed += (c.get("logprobs") or {}).get("content") or []
    assert [t["token"] for t in streamed] == [t["token"] for t in lps]
