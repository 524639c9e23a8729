"""The Ray Serve OpenAI app, end to end on CPU: the real app (`serve.run(build_app(...))`) on the demo
checkpoint, driven with the official `openai` client and raw HTTP (httpx).

One app per module (starting Ray + Serve + a replica takes ~15 s); the tests share it.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from nanovllmx.utils.demo import DEMO_MODEL_NAME, demo_model_path
from tests.helpers import free_port, wait_api_server

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_LEN = 512
ALIAS = "demo-alias"
LONG_PROMPT = " ".join(f"Sentence number {i} of a long shared prefix about llamas." for i in range(30))


class Server:
    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=120)
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stats(self) -> dict:
        r = self.http.get("/v1/engine/stats")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """Poll until no request runs or waits and every KV slot is free or only held by the radix cache."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if (
                s["num_running"] == 0
                and s["num_waiting"] == 0
                and s["free_slots"] + s["cached_slots"] == s["num_slots"]
            ):
                return s
            assert time.monotonic() < deadline, f"engine not idle after {timeout}s: {s}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server():
    import ray
    from ray import serve

    from nanovllmx.serve import build_app

    started_ray = not ray.is_initialized()
    if started_ray:
        # address="local": a fresh instance, never a cluster that another process happens to run
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "model": DEMO_MODEL_NAME,
            "served_model_name": [DEMO_MODEL_NAME, ALIAS],
            "context_len": CONTEXT_LEN,
            "max_bs": 16,
            "device": "cpu",
        }
    )
    serve.run(app, name="test-serve", route_prefix="/")
    srv = Server(f"http://127.0.0.1:{port}")
    try:
        yield srv
    finally:
        srv.http.close()
        serve.shutdown()
        if started_ray:
            ray.shutdown()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path())


def chat_prompt_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


# ============================================================================================ basics
def test_models_health_version(server):
    models = server.client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [DEMO_MODEL_NAME, ALIAS]
    card = models.data[0].model_dump()
    assert card["random_weights"] is True
    assert "noise" in card["description"] and "noise" in card["owned_by"]
    assert card["max_model_len"] == CONTEXT_LEN
    assert server.http.get(f"/v1/models/{ALIAS}").json()["id"] == ALIAS
    r = server.http.get("/health")
    assert r.status_code == 200
    import nanovllmx

    assert server.http.get("/version").json() == {"version": nanovllmx.__version__}
    assert server.http.get("/openapi.json").status_code == 200


def test_chat_non_streaming_usage_and_text(server, tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour 🎨."}]
    before = server.wait_idle()
    r = server.client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=messages,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == DEMO_MODEL_NAME
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason == "length"
    prompt_ids = chat_prompt_ids(tok, messages)
    assert r.prompt_token_ids == prompt_ids
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 12 == len(c.token_ids)
    assert r.usage.total_tokens == len(prompt_ids) + 12
    # the cached tokens reported are the ones the engine took from its radix cache for this request
    after = server.wait_idle()
    cached = after["cached_prompt_tokens_total"] - before["cached_prompt_tokens_total"]
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == len(prompt_ids)
    assert r.usage.prompt_tokens_details.cached_tokens == cached < len(prompt_ids), (cached, after)
    # incremental detokenization (multi-byte characters included) equals a full decode
    assert c.message.content == tok.decode(c.token_ids, skip_special_tokens=True)


def test_chat_streaming_matches_non_streaming(server):
    messages = [{"role": "user", "content": "Count to three."}]
    kw = dict(model=ALIAS, messages=messages, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.model == ALIAS and ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 10 == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_text_and_token_ids(server, tok):
    prompt = "The capital of France is"
    ids = tok.encode(prompt)
    a = server.client.completions.create(
        model=DEMO_MODEL_NAME,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert a.object == "text_completion" and a.id.startswith("cmpl-")
    assert a.usage.prompt_tokens == len(ids) and a.usage.completion_tokens == 8
    assert a.choices[0].prompt_token_ids == ids and len(a.choices[0].token_ids) == 8
    assert a.choices[0].text == tok.decode(a.choices[0].token_ids, skip_special_tokens=True)
    for p in (ids, [ids], [prompt]):  # token ids, a batch of one, a list of one string
        b = server.client.completions.create(
            model=DEMO_MODEL_NAME, prompt=p, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        assert b.choices[0].text == a.choices[0].text
        assert b.usage.prompt_tokens == len(ids)


def test_completions_streaming_raw_sse(server):
    body = {
        "model": DEMO_MODEL_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    objs = [json.loads(e[6:]) for e in events[:-1]]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 6
    text_chunks = objs[:-1]
    assert all(o["object"] == "text_completion" and o["usage"] is None for o in text_chunks)
    assert [o["choices"][0]["finish_reason"] for o in text_chunks][-1] == "length"
    streamed = "".join(o["choices"][0]["text"] for o in text_chunks)
    full = server.http.post("/v1/completions", json={**body, "stream": False}).json()
    assert streamed == full["choices"][0]["text"]


def test_n_choices(server):
    """n > 1: one engine request per choice; with a seed, choice i draws as a single request with
    seed + i would, so streaming and non-streaming agree; usage counts the prompt once."""
    kw = dict(
        model=DEMO_MODEL_NAME,
        prompt="Once upon a time",
        max_tokens=6,
        temperature=1.0,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    full = server.client.completions.create(**kw, n=3)
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert (
        full.usage.completion_tokens == 18
        and full.usage.prompt_tokens == server.client.completions.create(**kw).usage.prompt_tokens
    )
    texts = [c.text for c in full.choices]
    assert len(set(texts)) > 1  # different seeds, different draws
    assert texts[1] == server.client.completions.create(**{**kw, "seed": 12}).choices[0].text
    chunks = list(server.client.completions.create(**kw, n=3, stream=True, stream_options={"include_usage": True}))
    streamed = [
        "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i) for i in range(3)
    ]
    assert streamed == texts
    assert sorted({ch.choices[0].index for ch in chunks if ch.choices}) == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18
    assert sum(1 for ch in chunks if ch.usage is not None) == 1
    # chat: one choice per index, each with its role chunk and one finish reason
    chat = list(
        server.client.chat.completions.create(
            model=DEMO_MODEL_NAME,
            messages=CHAT["messages"],
            max_completion_tokens=5,
            n=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    for i in range(2):
        mine = [ch.choices[0] for ch in chat if ch.choices and ch.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    one = server.client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=CHAT["messages"], n=2, max_completion_tokens=5, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in one.choices] == [0, 1] and one.usage.completion_tokens == 10
    server.wait_idle()  # no choice left running, every slot back


def test_stop_string_seed_and_stop_token_ids(server):
    base = dict(
        model=DEMO_MODEL_NAME,
        prompt="Hello",
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    ref = server.client.completions.create(**base).choices[0]
    text = ref.text
    assert len(text) > 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = server.client.completions.create(**base, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    # a stop token id ends generation at that token (the token itself is not shown)
    sid = ref.token_ids[3]
    st = server.client.completions.create(
        **{**base, "extra_body": {"ignore_eos": False, "return_token_ids": True, "stop_token_ids": [sid]}}
    ).choices[0]
    assert st.finish_reason == "stop" and st.token_ids[-1] == sid and len(st.token_ids) == ref.token_ids.index(sid) + 1
    # seeded sampling is reproducible
    s1 = server.client.completions.create(
        model=DEMO_MODEL_NAME,
        prompt="Hi",
        max_tokens=8,
        temperature=1.0,
        seed=1234,
        top_p=0.9,
        extra_body={"top_k": 50, "min_p": 0.01},
    )
    s2 = server.client.completions.create(
        model=DEMO_MODEL_NAME,
        prompt="Hi",
        max_tokens=8,
        temperature=1.0,
        seed=1234,
        top_p=0.9,
        extra_body={"top_k": 50, "min_p": 0.01},
    )
    assert s1.choices[0].text == s2.choices[0].text


def test_cached_tokens_on_repeated_prefix(server, tok):
    n = len(tok.encode(LONG_PROMPT))
    assert 200 < n < CONTEXT_LEN - 16
    first = server.client.completions.create(model=DEMO_MODEL_NAME, prompt=LONG_PROMPT, max_tokens=2)
    second = server.client.completions.create(
        model=DEMO_MODEL_NAME, prompt=LONG_PROMPT + " And one more.", max_tokens=2
    )
    assert first.usage.prompt_tokens == n
    assert second.usage.prompt_tokens_details.cached_tokens >= n // 2
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    # chat: the same long system prompt twice
    msgs = [{"role": "system", "content": LONG_PROMPT}, {"role": "user", "content": "hi"}]
    server.client.chat.completions.create(model=DEMO_MODEL_NAME, messages=msgs, max_tokens=2)
    again = server.client.chat.completions.create(model=DEMO_MODEL_NAME, messages=msgs, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= n


def test_chat_template_options_and_tools(server, tok):
    msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    plain = server.client.chat.completions.create(model=DEMO_MODEL_NAME, messages=msgs, max_tokens=2)
    assert plain.usage.prompt_tokens == len(chat_prompt_ids(tok, [{**msgs[0], "role": "system"}, msgs[1]]))
    # template variables (Qwen3: enable_thinking=False pre-fills an empty think block)
    no_think = server.client.chat.completions.create(
        model=DEMO_MODEL_NAME,
        messages=msgs,
        max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert no_think.usage.prompt_tokens > plain.usage.prompt_tokens
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with_tools = server.client.chat.completions.create(model=DEMO_MODEL_NAME, messages=msgs, max_tokens=2, tools=tools)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    # content given as a list of text parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]}]
    r = server.client.chat.completions.create(model=DEMO_MODEL_NAME, messages=parts, max_tokens=2)
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tok, [{"role": "user", "content": "Weather\nin Paris?"}]))


def test_tokens_stream_before_the_end(server):
    """Each token is sent when it is sampled: the first text arrives while the request is still
    generating (an ordering, not a wall-clock ratio), and there is about one event per token."""
    server.wait_idle()
    body = {"model": DEMO_MODEL_NAME, "prompt": "Stream me", "max_tokens": 400, "ignore_eos": True, "stream": True}
    events, running_at_first = 0, None
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events += 1
                if events == 1:  # the reader holds the stream here: the engine keeps generating
                    running_at_first = server.stats()["num_running"]
    # 400 tokens take seconds; a server that buffered the stream would send its first event after the end
    assert running_at_first == 1, "the first event came only after the request had finished"
    assert events >= 10  # incremental: many events (fewer than tokens when a lagging stream merges deltas)


def test_concurrent_requests(server):
    def one(i: int) -> int:
        if i % 2:
            r = server.client.completions.create(
                model=DEMO_MODEL_NAME, prompt=f"Request {i}:", max_tokens=16, extra_body={"ignore_eos": True}
            )
            return r.usage.completion_tokens
        chunks = list(
            server.client.chat.completions.create(
                model=DEMO_MODEL_NAME,
                messages=[{"role": "user", "content": f"Request {i}"}],
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        return chunks[-1].usage.completion_tokens

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert results == [16] * 8, results
    assert time.monotonic() - t0 < 120
    server.wait_idle()


# ============================================================================================ errors
def _err(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    assert isinstance(e["message"], str) and e["message"]
    assert isinstance(e["type"], str) and e["type"]
    if param is not ...:
        assert e["param"] == param, e
    if code is not ...:
        assert e["code"] == code, e
    return e


# ============================================================================ logprobs, penalties, batches
def test_chat_logprobs_and_streamed_logprobs(server):
    kw = dict(
        model=DEMO_MODEL_NAME,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    r = server.client.chat.completions.create(**kw)
    c = r.choices[0]
    content = c.logprobs.content
    assert len(content) == len(c.token_ids) == 6
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy: the top token
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
    assert "".join(e.token for e in content) == c.message.content  # plain text tokens here
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completions_prompt_list_n_index_order_echo_logprobs(server, tok):
    prompts = ["One two three", "Alpha beta"]
    kw = dict(model=DEMO_MODEL_NAME, prompt=prompts, n=2, max_tokens=4, seed=7, temperature=1.0)
    body = dict(ignore_eos=True, return_token_ids=True)
    r = server.client.completions.create(**kw, extra_body=body)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    ids = [tok.encode(p) for p in prompts]
    for c in r.choices:  # index = prompt index * n + j
        assert c.prompt_token_ids == ids[c.index // 2]
    by_ids = server.client.completions.create(**{**kw, "prompt": ids}, extra_body=body)  # seeded: the same
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices]
    assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1]) and r.usage.completion_tokens == 16
    chunks = list(server.client.completions.create(**kw, stream=True, extra_body=body))
    texts = {i: "" for i in range(4)}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in r.choices}
    # echo with logprobs: the prompt's text and logprobs first (none for its first token)
    e = server.client.completions.create(
        model=DEMO_MODEL_NAME,
        prompt=prompts[0],
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = e.choices[0].logprobs
    assert e.choices[0].text.startswith(prompts[0])
    assert len(lp.tokens) == len(ids[0]) + 3 and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[: len(ids[0])] == [len(tok.decode(ids[0][:i])) for i in range(len(ids[0]))]
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])  # top 2 plus the chosen token
    s = list(
        server.client.completions.create(
            model=DEMO_MODEL_NAME,
            prompt=prompts[0],
            max_tokens=3,
            temperature=0,
            echo=True,
            logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in s if c.choices) == e.choices[0].text
    streamed = [t for c in s if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_logit_bias_min_tokens_penalties_and_prompt_logprobs(server, tok):
    x = tok.encode(" banana")[0]
    base = dict(model=DEMO_MODEL_NAME, prompt="Fruit:", temperature=0)
    r = server.client.completions.create(
        **base, max_tokens=3, logit_bias={str(x): 100}, extra_body={"ignore_eos": True, "return_token_ids": True}
    )
    assert r.choices[0].token_ids == [x, x, x]
    # x would be drawn at once, but it stops the request: masked until 3 tokens are out
    r = server.client.completions.create(
        **base,
        max_tokens=10,
        logit_bias={str(x): 100},
        extra_body={"min_tokens": 3, "stop_token_ids": [x], "return_token_ids": True},
    )
    assert r.choices[0].finish_reason == "stop" and len(r.choices[0].token_ids) == 4
    assert x not in r.choices[0].token_ids[:3] and r.choices[0].token_ids[3] == x
    # frequency penalty breaks the run of x
    r = server.client.completions.create(
        **base,
        max_tokens=4,
        logit_bias={str(x): 20},
        frequency_penalty=2,
        presence_penalty=2,
        extra_body={"ignore_eos": True, "return_token_ids": True, "repetition_penalty": 1.2},
    )
    assert r.choices[0].token_ids.count(x) < 4
    r = server.http.post("/v1/completions", json={**base, "max_tokens": 1, "prompt_logprobs": 1}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    ids = tok.encode("Fruit:")
    assert plp[0] is None and len(plp) == len(ids)
    assert all(str(t) in d and d[str(t)]["logprob"] <= 0 for t, d in zip(ids[1:], plp[1:]))


def test_tokenize_detokenize(server, tok):
    r = server.http.post(
        "/tokenize", json={"model": DEMO_MODEL_NAME, "prompt": "Hello world", "return_token_strs": True}
    )
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["tokens"] == tok.encode("Hello world") and j["count"] == len(j["tokens"])
    assert j["max_model_len"] == CONTEXT_LEN and "".join(j["token_strs"]) == "Hello world"
    msgs = [{"role": "user", "content": "Hi there"}]
    j = server.http.post("/tokenize", json={"messages": msgs}).json()
    assert j["tokens"] == chat_prompt_ids(tok, msgs) and j["token_strs"] is None
    d = server.http.post("/detokenize", json={"tokens": tok.encode("Hello world")})
    assert d.json() == {"prompt": "Hello world"}
    form = {"content-type": "application/x-www-form-urlencoded"}  # curl -d: still JSON
    d = server.http.post("/detokenize", content=json.dumps({"tokens": tok.encode("Hi")}).encode(), headers=form)
    assert d.json() == {"prompt": "Hi"}
    _err(server.http.post("/detokenize", json={"tokens": [10**7]}), 400, "tokens")
    _err(server.http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model")


CHAT = {"model": DEMO_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CMPL = {"model": DEMO_MODEL_NAME, "prompt": "hi", "max_tokens": 4}
TOO_LONG = "word " * 600

BAD_REQUESTS = [
    # (path, body, param, code)
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, "temperature", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "top_p", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "top_k": -5}, "top_k", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "min_p": 2}, "min_p", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -3}, "max_completion_tokens", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1.5}, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**9}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, "stop", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "stop": 5}, "stop", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [-1]}, "stop_token_ids", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**70}, "seed", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "ignore_eos": "yes"}, "ignore_eos", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"x": 1}}, "logit_bias", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"10000000": 1}}, "logit_bias", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value"),
    ("/v1/chat/completions", {**CHAT, "min_tokens": 5}, "min_tokens", "invalid_value"),
    (
        "/v1/chat/completions",
        {**CHAT, "prompt_logprobs": 1, "stream": True},
        "prompt_logprobs",
        "unsupported_parameter",
    ),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", "invalid_value"),
    (
        "/v1/chat/completions",
        {k: v for k, v in CHAT.items() if k != "messages"},
        "messages",
        "missing_required_parameter",
    ),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages", "invalid_value"),
    (
        "/v1/chat/completions",
        {
            **CHAT,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        },
        "messages",
        "unsupported_content",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": TOO_LONG}]},
        "messages",
        "context_length_exceeded",
    ),
    ("/v1/completions", {**CMPL, "prompt": TOO_LONG}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**CMPL, "prompt": ""}, "prompt", "empty_prompt"),
    ("/v1/completions", {**CMPL, "prompt": []}, "prompt", "empty_prompt"),
    ("/v1/completions", {**CMPL, "prompt": [10**7]}, "prompt", "invalid_value"),
    ("/v1/completions", {**CMPL, "prompt": [1, "a"]}, "prompt", "invalid_value"),
    ("/v1/completions", {**CMPL, "prompt": ["a"] * 33, "n": 2}, "prompt", "invalid_value"),
    ("/v1/completions", {**CMPL, "logprobs": 21}, "logprobs", "invalid_value"),
    ("/v1/completions", {**CMPL, "prompt_logprobs": -1}, "prompt_logprobs", "invalid_value"),
    ("/v1/completions", {**CMPL, "n": 65, "stream": True}, "n", "invalid_value"),
    ("/v1/completions", {**CMPL, "max_tokens": CONTEXT_LEN}, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {**CMPL, "temperature": -0.5, "stream": True}, "temperature", "invalid_value"),
]


@pytest.mark.parametrize(
    "path,body,param,code",
    BAD_REQUESTS,
    ids=[f"{i}-{p.split('/')[-1]}-{param}" for i, (p, _, param, _c) in enumerate(BAD_REQUESTS)],
)
def test_bad_request_400(server, path, body, param, code):
    _err(server.http.post(path, json=body), 400, param, code)


def test_malformed_and_odd_bodies(server):
    for raw in (b"{not json", b'{"model": "x", ', b"", b"\xff\xfe\x00garbage"):
        _err(server.http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), 400)
    _err(server.http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    # curl -d without a JSON content type still works
    r = server.http.post(
        "/v1/completions",
        content=json.dumps(CMPL).encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text


def test_unknown_model_404_and_routes(server):
    e = _err(server.http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model", "model_not_found")
    assert "gpt-4" in e["message"]
    _err(server.http.post("/v1/completions", json={**CMPL, "model": "nope", "stream": True}), 404, "model")
    _err(server.http.get("/v1/models/nope"), 404, "model")
    _err(server.http.get("/v1/nothing-here"), 404)
    _err(server.http.get("/v1/completions"), 405)
    # through the official client: typed exceptions
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-4", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError) as ei:
        server.client.chat.completions.create(model=DEMO_MODEL_NAME, messages=CHAT["messages"], n=100)
    assert ei.value.status_code == 400 and ei.value.param == "n"


# ============================================================================================ aborts
def _abort_case(server, make_request, aborted: int = 1) -> None:
    before = server.wait_idle()["num_aborted_requests"]
    make_request()
    s = server.wait_idle()
    # counted as aborted (a request that ran to its end would finish with "length"): it was stopped
    assert s["num_aborted_requests"] == before + aborted, s


def test_aborted_stream_releases_slots(server):
    body = {
        "model": DEMO_MODEL_NAME,
        "prompt": "Tell me a long story.",
        "max_tokens": 480,
        "ignore_eos": True,
        "stream": True,
    }

    def streamed_then_closed():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                got = 0
                for line in r.iter_lines():
                    got += line.startswith("data: ")
                    if got >= 3:
                        break
            # leaving the blocks closes the connection mid-stream

    _abort_case(server, streamed_then_closed)

    chat = {
        "model": DEMO_MODEL_NAME,
        "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": 480,
        "ignore_eos": True,
        "stream": True,
    }

    def chat_streamed_then_closed():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/v1/chat/completions", json=chat) as r:
                assert r.status_code == 200
                next(r.iter_lines())

    _abort_case(server, chat_streamed_then_closed)

    def three_choices_streamed_then_closed():  # n=3: every choice is aborted
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={**body, "n": 3}) as r:
                assert r.status_code == 200
                next(r.iter_lines())

    _abort_case(server, three_choices_streamed_then_closed, aborted=3)


def test_aborted_non_streaming_request_releases_slots(server):
    body = {"model": DEMO_MODEL_NAME, "prompt": "Write an essay.", "max_tokens": 480, "ignore_eos": True}

    def timed_out():
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=1.5)) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body)

    _abort_case(server, timed_out)

    def two_choices_timed_out():
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=1.5)) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json={**body, "n": 2})

    _abort_case(server, two_choices_timed_out, aborted=2)


def test_still_serving_after_aborts(server):
    r = server.client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=CHAT["messages"], max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 5
    assert server.http.get("/health").status_code == 200
    server.wait_idle()


# ============================================================================================ configs / builder
def _configs():
    return sorted((ROOT / "serve_configs").glob("*.yaml"))


def test_serve_configs_parse_and_build():
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    names = [p.name for p in _configs()]
    assert {"demo.yaml", "qwen3.yaml"} <= set(names)
    assert any(n not in ("demo.yaml", "qwen3.yaml") for n in names), "a multi-GPU example"
    for path in _configs():
        cfg = yaml.safe_load(path.read_text())
        schema = ServeDeploySchema.model_validate(cfg)
        for app_cfg in schema.applications:
            module, attr = app_cfg.import_path.split(":")
            builder = getattr(importlib.import_module(module), attr)
            app = builder(dict(app_cfg.args))
            assert isinstance(app, Application), path
    demo = yaml.safe_load((ROOT / "serve_configs" / "demo.yaml").read_text())["applications"][0]
    assert demo["import_path"] == "nanovllmx.serve:build_app" and demo["args"]["model"] == DEMO_MODEL_NAME
    qwen = yaml.safe_load((ROOT / "serve_configs" / "qwen3.yaml").read_text())["applications"][0]["args"]
    assert qwen["model"] == "Qwen/Qwen3-0.6B" and qwen["tp_size"] * qwen["pp_size"] == 1


def test_build_app_options():
    from nanovllmx.serve import ModelResolutionError, build_app

    def dep(args):
        d = build_app(args)._bound_deployment
        if d.name == "LLMIngress":  # several replicas: the engines sit behind the tokenizing ingress
            d = d.init_args[0]._bound_deployment
        return d

    d = dep({"model": DEMO_MODEL_NAME, "device": "cuda", "num_replicas": 3, "context_len": "512"})
    assert d.num_replicas == 3 and d.name == "LLMServer"
    # on GPU the engine runs in its own actors, off the replica's GIL (which streams the tokens)
    assert d.ray_actor_options["num_gpus"] == 0 and d.init_args[2]["executor"] == "ray"
    assert d.init_args[2]["context_len"] == 512  # `serve run ... context_len=512` strings get their types
    d = dep({"model": DEMO_MODEL_NAME, "device": "cuda", "executor": "local"})
    assert d.ray_actor_options["num_gpus"] == 1  # asked for: the engine runs in the replica
    d = dep({"model": DEMO_MODEL_NAME, "device": "cpu"})
    assert d.ray_actor_options["num_gpus"] == 0 and d.init_args[2]["executor"] == "local"
    d = dep({"model": DEMO_MODEL_NAME, "device": "cuda", "tp_size": 2})
    assert d.ray_actor_options["num_gpus"] == 0  # the engine starts its own GPU actors
    d = dep(
        {
            "model": DEMO_MODEL_NAME,
            "device": "cpu",
            "ray_actor_options": {"num_cpus": 2},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
            "max_ongoing_requests": 7,
        }
    )
    assert d.ray_actor_options == {"num_cpus": 2, "num_gpus": 0}
    assert d._deployment_config.autoscaling_config.max_replicas == 2
    assert d._deployment_config.autoscaling_config.target_ongoing_requests == 128
    assert d.max_ongoing_requests == 7
    assert dep({"model": DEMO_MODEL_NAME, "device": "cpu"}).init_args[1] == [DEMO_MODEL_NAME]
    with pytest.raises(ValueError, match="unknown argument"):
        build_app({"model": DEMO_MODEL_NAME, "max_batch_size": 3})
    with pytest.raises(ValueError, match="model"):
        build_app({"tp_size": 1})
    with pytest.raises(ValueError, match="log_level"):
        build_app({"model": DEMO_MODEL_NAME, "log_level": "chatty"})
    with pytest.raises(ModelResolutionError, match="no such folder"):
        build_app({"model": "/definitely/not/here"})


def test_model_resolver(tmp_path, monkeypatch):
    from nanovllmx.serve import model_resolver as mr

    assert mr.kind_of("Qwen/Qwen3-0.6B") == "hub" and mr.default_served_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert mr.kind_of(DEMO_MODEL_NAME) == "demo"
    assert mr.resolve_model(DEMO_MODEL_NAME) == str(demo_model_path())
    assert mr.default_served_name(str(tmp_path / "my-model") + "/") == "my-model"
    with pytest.raises(mr.ModelResolutionError, match="config.json"):
        mr.resolve_model(str(tmp_path))
    # offline (or unknown repo): a clear error, quickly, not a hang or a traceback from deep inside
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(mr.ModelResolutionError, match="nanovllmx-test/no-such-model"):
        mr.resolve_model("nanovllmx-test/no-such-model")


def test_check_health_reports_a_dead_engine():
    from nanovllmx import LLM, EngineUnavailableError

    llm = LLM(str(demo_model_path()), context_len=256, device="cpu")
    try:
        llm.check_health()  # healthy: returns
    finally:
        llm.shutdown()
    with pytest.raises(EngineUnavailableError, match="shut down"):
        llm.check_health()


def test_api_server_entrypoint(tmp_path):
    """`python -m nanovllmx.entrypoints.openai.api_server` serves until SIGTERM, then exits cleanly;
    with --direct-ingress-port the replica answers on its own port too (no proxy hop)."""
    port, direct = free_port(), free_port()
    log = open(tmp_path / "api_server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanovllmx.entrypoints.openai.api_server",
            "--model",
            DEMO_MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--context-len",
            "256",
            "--max-bs",
            "4",
            "--device",
            "cpu",
            "--direct-ingress-port",
            str(direct),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for url in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{direct}"):
            wait_api_server(url, proc, tmp_path / "api_server.log")
            r = httpx.post(
                url + "/v1/completions",
                json={"model": DEMO_MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True},
                timeout=60,
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert rc == 0, (tmp_path / "api_server.log").read_text()[-3000:]


def test_api_server_args():
    from nanovllmx.entrypoints.openai import api_server
    from nanovllmx.serve import build_app

    ns = api_server.parse_args(
        [
            "--model",
            DEMO_MODEL_NAME,
            "--tp-size",
            "1",
            "--pp-size",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            "8123",
            "--gpu-memory-utilization",
            "0.5",
            "--max-bs",
            "8",
            "--context-len",
            "256",
            "--enforce-eager",
            "--stream-interval",
            "8",
        ]
    )
    args = api_server.app_args(ns)
    assert args["max_bs"] == 8 and args["context_len"] == 256 and args["enforce_eager"] is True
    assert args["stream_interval"] == 8 and "stream_interval" not in api_server.app_args(
        api_server.parse_args(["--model", "m"])
    )
    assert args["gpu_memory_utilization"] == 0.5 and (ns.host, ns.port) == ("127.0.0.1", 8123)
    build_app({**args, "device": "cpu"})
    vllm_style = api_server.parse_args(
        [
            "--model",
            "m",
            "--tensor-parallel-size",
            "2",
            "--max-model-len",
            "64",
            "--max-num-seqs",
            "4",
            "--served-model-name",
            "a",
            "b",
        ]
    )
    a = api_server.app_args(vllm_style)
    assert (a["tp_size"], a["context_len"], a["max_bs"], a["served_model_name"]) == (2, 64, 4, ["a", "b"])


# ============================================================================ every request field
IM_END = 151645  # <|im_end|>: an EOS id of the demo model
BOOL = {"type": "boolean"}
PARALLEL_SEED = 1  # tool_choice "required", temperature 1: the demo model writes two calls with this seed


def _walk_post(server, path: str, body: dict) -> dict:
    r = server.http.post(path, json=body)
    assert r.status_code == 200, (body, r.text)
    return r.json()


def _sse_events(server, path: str, body: dict) -> list:
    with server.http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _field_checks(server, path: str, base: dict):
    """field -> a check that fails unless the field changes the response as documented (or is refused
    with a 400 naming it). `base`: greedy, ignore_eos, return_token_ids."""

    def post(**over) -> dict:
        return _walk_post(server, path, {**base, **over})

    def ids(resp: dict, i: int = 0) -> list[int]:
        return resp["choices"][i]["token_ids"]

    def text(resp: dict, i: int = 0) -> str:
        c = resp["choices"][i]
        return c["message"]["content"] if "message" in c else c["text"]

    greedy = post()
    hot = dict(temperature=1.5, seed=1)
    hot_ids = ids(post(**hot))
    assert hot_ids != ids(greedy), "the walk needs a sampled run that differs from the greedy one"
    # 50 tokens made the likeliest (the output runs through them without repeating): a negative
    # penalty (or repetition_penalty < 1) makes the first one repeat
    rep = {str(t): 30 for t in range(100, 150)}

    def refused(field: str, value) -> None:
        _err(server.http.post(path, json={**base, field: value}), 400, field)

    def constrained(**over) -> dict:
        r = post(ignore_eos=False, max_tokens=12, **over)
        assert_eq(r["choices"][0]["finish_reason"], "stop")
        return r

    checks = {
        "model": lambda: _err(server.http.post(path, json={**base, "model": "nope"}), 404, "model"),
        "temperature": lambda: None,  # hot_ids above
        "top_p": lambda: (assert_eq(ids(post(**hot, top_p=1e-9)), ids(greedy)), refused("top_p", 2)),
        "top_k": lambda: (assert_eq(ids(post(**hot, top_k=1)), ids(greedy)), refused("top_k", -3)),
        "min_p": lambda: (assert_eq(ids(post(**hot, min_p=1.0)), ids(greedy)), refused("min_p", 2)),
        "seed": lambda: (assert_eq(ids(post(**hot)), hot_ids), assert_ne(ids(post(**{**hot, "seed": 2})), hot_ids)),
        "stop": lambda: (
            assert_eq(post(stop=[text(greedy)[1:3]])["choices"][0]["finish_reason"], "stop")
            if len(text(greedy)) > 3
            else None
        ),
        "stop_token_ids": lambda: assert_eq(ids(post(stop_token_ids=[ids(greedy)[1]])), ids(greedy)[:2]),
        "ignore_eos": lambda: assert_eq(len(ids(post(ignore_eos=False, logit_bias={str(IM_END): 100}))), 1),
        "stream": lambda: assert_eq(
            _sse_events(server, path, {**base, "stream": True})[0]["id"][:4] in ("chat", "cmpl"), True
        ),
        "stream_options": lambda: assert_eq(
            _sse_events(server, path, {**base, "stream": True, "stream_options": {"include_usage": True}})[-1]["usage"][
                "completion_tokens"
            ],
            len(ids(greedy)),
        ),
        "n": lambda: assert_eq(len(post(n=2)["choices"]), 2),
        "user": lambda: assert_eq(ids(post(user="someone")), ids(greedy)),  # accepted, ignored (docs)
        "metadata": lambda: assert_eq(ids(post(metadata={"k": "v"})), ids(greedy)),  # accepted, ignored (docs)
        "presence_penalty": lambda: assert_ne(
            ids(post(logit_bias=rep, presence_penalty=-2)), ids(post(logit_bias=rep))
        ),
        "frequency_penalty": lambda: assert_ne(
            ids(post(logit_bias=rep, frequency_penalty=-2)), ids(post(logit_bias=rep))
        ),
        "repetition_penalty": lambda: assert_ne(
            ids(post(logit_bias=rep, repetition_penalty=0.5)), ids(post(logit_bias=rep))
        ),
        "logit_bias": lambda: assert_eq(set(ids(post(logit_bias={"42": 100}))), {42}),
        "return_token_ids": lambda: assert_eq("token_ids" in post(return_token_ids=False)["choices"][0], False),
        "min_tokens": lambda: assert_eq(
            len(ids(post(ignore_eos=False, logit_bias={str(IM_END): 100}, min_tokens=3))), 4
        ),
        "include_stop_str_in_output": lambda: (
            assert_eq(
                text(post(stop=[text(greedy)[1:3]], include_stop_str_in_output=True)).endswith(text(greedy)[1:3]), True
            )
            if len(text(greedy)) > 3
            else None
        ),
        "skip_special_tokens": lambda: (
            assert_eq("<|im_end|>" in text(post(logit_bias={str(IM_END): 100}, skip_special_tokens=False)), True),
            assert_eq("<|im_end|>" in text(post(logit_bias={str(IM_END): 100})), False),
        ),
        "prompt_logprobs": lambda: assert_eq(
            post(prompt_logprobs=1)["choices"][0].get("prompt_logprobs") is not None
            or post(prompt_logprobs=1).get("prompt_logprobs") is not None,
            True,
        ),
        "max_tokens": lambda: assert_eq(len(ids(post(max_tokens=2))), 2),
        # structured outputs (issue 22): the random model's output follows the grammar, EOS after it
        "structured_outputs": lambda: (
            assert_in(text(constrained(structured_outputs={"choice": ["yes", "no"]})), ("yes", "no")),
            refused("structured_outputs", {"regex": "a", "choice": ["b"]}),
        ),
        "guided_json": lambda: (
            assert_in(json.loads(text(constrained(guided_json=BOOL))), (True, False)),
            refused("guided_json", "{not json"),
        ),
        "guided_regex": lambda: assert_eq(
            re.fullmatch(r"[0-9]{2}x", text(constrained(guided_regex=r"[0-9]{2}x"))) is not None, True
        ),
        "guided_choice": lambda: assert_in(text(constrained(guided_choice=["alpha", "beta"])), ("alpha", "beta")),
        "guided_grammar": lambda: assert_in(text(constrained(guided_grammar='root ::= "ab" | "cd"')), ("ab", "cd")),
        "guided_decoding_backend": lambda: refused("guided_decoding_backend", "outlines"),
        "guided_whitespace_pattern": lambda: refused("guided_whitespace_pattern", " "),
    }
    return checks, post, ids, greedy, refused


def assert_eq(a, b) -> None:
    assert a == b, (a, b)


def assert_ne(a, b) -> None:
    assert a != b, (a, b)


def assert_in(a, b) -> None:
    assert a in b, (a, b)


IGNORED_ON_PURPOSE = {"user", "metadata"}  # accepted and ignored; docs/serving.md lists them


def _run_field_checks(checks: dict, model) -> None:
    """Every field of the request model has a check (none more, none fewer), and each passes."""
    assert set(checks) == set(model.model_fields), set(model.model_fields) ^ set(checks)
    for field, check in checks.items():
        try:
            check()
        except AssertionError as e:
            raise AssertionError(f"{field}: {e}") from e


def test_every_request_field_is_honoured_or_refused(server):
    """Walks the fields of the request models: each has a check here that proves it changes the
    response, or that a value it cannot take is a 400 naming it; a field without one fails the test."""
    from nanovllmx.serve.protocol import ChatCompletionRequest, CompletionRequest

    docs = (ROOT / "docs" / "serving.md").read_text()
    for field in IGNORED_ON_PURPOSE:
        assert f"`{field}`" in docs.split("Accepted and ignored")[1].split("\n\n")[0], field

    chat_base = {**CHAT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    checks, post, ids, greedy, refused = _field_checks(server, "/v1/chat/completions", chat_base)
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
        for name in ("f", "g")
    ]

    def tool_calls(**over) -> list[str]:
        """The names of the calls of a constrained tool call (finish_reason "tool_calls")."""
        c = post(tools=tools, ignore_eos=False, max_tokens=80, **over)["choices"][0]
        assert_eq(c["finish_reason"], "tool_calls")
        return [t["function"]["name"] for t in c["message"]["tool_calls"]]

    def prompt_len(**over) -> int:
        return post(**over)["usage"]["prompt_tokens"]

    n0 = greedy["usage"]["prompt_tokens"]
    chat_checks = {
        **checks,
        "messages": lambda: assert_ne(prompt_len(messages=[{"role": "user", "content": "hi hi hi"}]), n0),
        "max_completion_tokens": lambda: assert_eq(len(ids(post(max_completion_tokens=2))), 2),
        "logprobs": lambda: assert_eq(len(post(logprobs=True)["choices"][0]["logprobs"]["content"]), 4),
        "top_logprobs": lambda: assert_eq(
            len(post(logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]), 2
        ),
        "tools": lambda: assert_ne(prompt_len(tools=tools), n0),
        "tool_choice": lambda: (
            assert_eq(prompt_len(tools=tools, tool_choice="none"), n0),
            refused("tool_choice", "required"),  # without tools
            assert_eq(tool_calls(tool_choice={"type": "function", "function": {"name": "g"}}), ["g"]),
        ),
        # tool_choice "required": one call with parallel_tool_calls false, else up to four (a seed
        # with which the random model writes more than one)
        "parallel_tool_calls": lambda: (
            assert_eq(len(tool_calls(tool_choice="required", seed=PARALLEL_SEED, temperature=1.0)) > 1, True),
            assert_eq(
                len(tool_calls(tool_choice="required", seed=PARALLEL_SEED, temperature=1.0, parallel_tool_calls=False)),
                1,
            ),
        ),
        "response_format": lambda: (
            assert_in(
                json.loads(
                    post(
                        ignore_eos=False,
                        max_tokens=12,
                        response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": BOOL}},
                    )["choices"][0]["message"]["content"]
                ),
                (True, False),
            ),
            assert_eq(post(response_format={"type": "text"})["choices"][0]["token_ids"], ids(greedy)),
            _err(
                server.http.post("/v1/chat/completions", json={**chat_base, "response_format": {"type": "yaml"}}),
                400,
                "response_format.type",
            ),
        ),
        "add_generation_prompt": lambda: assert_ne(prompt_len(add_generation_prompt=False), n0),
        "continue_final_message": lambda: assert_ne(
            prompt_len(
                messages=[*CHAT["messages"], {"role": "assistant", "content": "Sure"}],
                continue_final_message=True,
                add_generation_prompt=False,
            ),
            prompt_len(messages=[*CHAT["messages"], {"role": "assistant", "content": "Sure"}]),
        ),
        "chat_template_kwargs": lambda: assert_ne(prompt_len(chat_template_kwargs={"enable_thinking": False}), n0),
    }

    _run_field_checks(chat_checks, ChatCompletionRequest)

    cmpl_base = {**CMPL, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    checks, post, ids, greedy, refused = _field_checks(server, "/v1/completions", cmpl_base)

    cmpl_checks = {
        **checks,
        "prompt": lambda: assert_eq(len(post(prompt=["a", "b"])["choices"]), 2),
        "logprobs": lambda: assert_eq(len(post(logprobs=1)["choices"][0]["logprobs"]["tokens"]), 4),
        "echo": lambda: assert_eq(post(echo=True)["choices"][0]["text"].startswith(CMPL["prompt"]), True),
        "suffix": lambda: refused("suffix", "end"),
        "best_of": lambda: (assert_eq(ids(post(best_of=1)), ids(greedy)), refused("best_of", 2)),
    }
    _run_field_checks(cmpl_checks, CompletionRequest)
