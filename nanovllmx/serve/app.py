"""The OpenAI-compatible HTTP API as a Ray Serve application.

One deployment, `LLMServer`: each replica builds its own `LLM` (scheduler, workers, KV cache) in
`__init__` and serves the FastAPI routes below. Requests are tokenized in the replica (chat through
the checkpoint's chat template), handed to `LLM.stream`, and every delta the engine produces is
written to the client as soon as it arrives (SSE for `stream: true`). A client that goes away
aborts its request in the engine, which frees its KV slots within one step.

`build_app(args)` turns the `args` of a Serve config into the application; see docs/serving.md.
"""

# No `from __future__ import annotations`: FastAPI must see the real parameter types of the
# class-based routes (Serve rewrites them), or `Request` parameters turn into query parameters.
import asyncio
import dataclasses
import inspect
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanovllmx
from nanovllmx.engine.output_processor import EngineRequestError
from nanovllmx.errors import EngineOverloadedError
from nanovllmx.metrics import EngineStatsMonitor, HTTPStatusMiddleware, ServeMetrics
from nanovllmx.outputs import StreamDelta
from nanovllmx.sampling_params import SamplingParams
from nanovllmx.serve import model_resolver
from nanovllmx.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    drop_none,
)

logger = logging.getLogger("nanovllmx.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DEFAULT_MAX_REQUEST_BODY_BYTES = 8 * 1024 * 1024  # build_app's max_request_body_bytes
RETRY_AFTER_S = 1  # Retry-After of a 503 when the engine's queue is full
MAX_CHOICES = 64  # most `n` per request: each choice is an engine request (they share the prompt's KV)
_INT64_MAX = 2**63 - 1


# =============================================================================================== errors
class APIError(Exception):
    """An error with OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        # a message may quote the request's text: keep it encodable (lone surrogates) or rendering fails
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

_ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    500: {"model": ErrorResponse, "description": "engine error"},
}

app = FastAPI(
    title="Nano-vLLM-X OpenAI-compatible API",
    version=nanovllmx.__version__,
    description="OpenAI-compatible completions and chat completions served by Nano-vLLM-X on Ray Serve.",
)


class _JSONBodies:
    """POST bodies under /v1/ are JSON whatever their Content-Type says (`curl -d` sends
    form-urlencoded). A plain ASGI middleware: nothing in the way of streamed responses."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and "/v1/" in scope.get("path", ""):
            headers = scope.get("headers") or []
            if not any(k == b"content-type" and b"json" in v.lower() for k, v in headers):
                scope = {
                    **scope,
                    "headers": [(k, v) for k, v in headers if k != b"content-type"]
                    + [(b"content-type", b"application/json")],
                }
        await self.app(scope, receive, send)


app.add_middleware(_JSONBodies)


class _BodyLimit:
    """Refuses request bodies larger than `max_bytes` with 413 and OpenAI's error JSON: at once when
    Content-Length says so, else (chunked bodies) as soon as what was read passes the limit."""

    max_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES  # set by the replica (one per process); 0: no limit

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        limit = self.max_bytes
        if scope["type"] != "http" or not limit:
            return await self.app(scope, receive, send)
        where = f"{scope.get('method')} {scope.get('path')}"
        for k, v in scope.get("headers") or []:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                msg = f"the request body has {int(v)} bytes; this server accepts at most {limit}"
                logger.info("%s -> 413 %s", where, msg)
                return await APIError(413, msg, "invalid_request_error", None, "request_too_large").response()(
                    scope, receive, send
                )
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body") or b"")
                if seen > limit:  # FastAPI re-raises HTTPExceptions from body reading: our handler answers
                    raise StarletteHTTPException(
                        413, f"the request body has more than {limit} bytes, the most this server accepts"
                    )
            return message

        await self.app(scope, limited_receive, send)


app.add_middleware(_BodyLimit)
app.add_middleware(HTTPStatusMiddleware)  # nanovllmx_http_requests{status, route}


def _openapi() -> dict:
    """FastAPI's schema, minus the 422 responses it documents by default: invalid requests get 400."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                if isinstance(op, dict) and "422" in op.get("responses", {}):
                    op["responses"].pop("422")
                    op["responses"].setdefault(
                        "400",
                        {
                            "description": "invalid request",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                        },
                    )
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


@app.exception_handler(APIError)
async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    if exc.status < 500 and exc.code != "client_disconnected":  # a client that left: its request's line says so
        logger.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI answers 422 with its own shape; OpenAI answers 400 with its error JSON."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg", "invalid JSON")
        err = bad_request(
            f"malformed JSON body: {detail} (at character {first.get('loc', ('', '?'))[-1]})", None, "invalid_json"
        )
    else:
        parts, param = [], None
        for e in errors[:8]:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            if param is None and loc:
                param = loc[0]
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
        more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
        err = bad_request(
            "invalid request: " + "; ".join(parts) + more,
            param,
            "missing_required_parameter" if first.get("type") == "missing" else "invalid_value",
        )
    logger.info("%s %s -> 400 %s", request.method, request.url.path, err.message)
    return err.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 for unknown routes, 405 for wrong methods, 400 for unparsable bodies: OpenAI's shape too."""
    typ = _STATUS_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error")
    msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"no route {request.method} {request.url.path}; see GET /openapi.json"
    logger.info("%s %s -> %d %s", request.method, request.url.path, exc.status_code, msg)
    return APIError(exc.status_code, msg, typ, None, "request_too_large" if exc.status_code == 413 else None).response()


@app.exception_handler(Exception)
async def _internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error on %s %s", request.method, request.url.path)
    return APIError(
        500, f"internal server error: {type(exc).__name__}: {exc}", "server_error", None, "internal_error"
    ).response()


# =============================================================================================== helpers
def _generation_defaults(folder: str) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config.json (as vLLM does by default)."""
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path) as f:
            gc = json.load(f)
    except (OSError, ValueError):
        return {}
    if gc.get("do_sample") is False:
        return {}
    return {
        k: gc[k]
        for k in ("temperature", "top_p", "top_k", "min_p")
        if isinstance(gc.get(k), (int, float)) and not isinstance(gc.get(k), bool)
    }


def _setup_logging(level: str) -> None:
    """The replica's `nanovllmx` loggers write to its stderr (Ray shows it with the replica's name)."""
    root = logging.getLogger("nanovllmx")
    if not any(getattr(h, "_nanovllmx", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
        h._nanovllmx = True
        root.addHandler(h)
        root.propagate = False
    root.setLevel(str(level).upper())


def engine_problem(llm) -> str | None:
    """Why this LLM cannot serve, or None. (The LLM API has no health call yet: probe its parts.)"""
    if getattr(llm, "_closed", False):
        return "the engine has been shut down"
    core = llm.core
    check = getattr(core, "check_health", None)
    if callable(check):
        try:
            check()
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            return f"engine unhealthy: {type(e).__name__}: {e}"
    if getattr(core, "_closed", False):
        return "the engine has been shut down"
    # the in-process core's step loop; the Ray client's output poller (it ends when the scheduler actor dies)
    for attr, what in (("_thread", "step loop"), ("_poll_thread", "scheduler actor connection")):
        t = getattr(core, attr, None)
        if t is not None and not t.is_alive():
            return f"the engine's {what} has stopped"
    t = getattr(llm, "_out_thread", None)
    if t is not None and not t.is_alive():
        return "the engine's output loop has stopped"
    return None


def _reject_invalid_text(body) -> None:
    """JSON can escape lone UTF-16 surrogates (`"\\ud800"`): such strings are not Unicode text, no
    tokenizer takes them and they cannot be encoded back to UTF-8. 400, before anything uses them."""

    def find(v) -> tuple[str, str] | None:
        """(path, string) of the first invalid string in v, or None. Paths are built only on the
        way back from a hit: a 700-token prompt is a list of ints checked at C speed."""
        if isinstance(v, str):
            try:
                v.encode("utf-8")
                return None
            except UnicodeEncodeError:
                return "", v
        if isinstance(v, dict):
            for k, x in v.items():
                r = find(k)
                if r is not None:
                    return "", r[1]
                r = find(x)
                if r is not None:
                    return f".{k}{r[0]}", r[1]
        elif isinstance(v, (list, tuple)):
            if all(type(x) is int for x in v):
                return None
            for i, x in enumerate(v):
                r = find(x)
                if r is not None:
                    return f"[{i}]{r[0]}", r[1]
        elif hasattr(v, "model_dump"):
            return find(v.model_dump(exclude_unset=True))
        return None

    hit = find(body)
    if hit is None:
        return
    path, text = hit[0].lstrip("."), hit[1]
    e = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    raise bad_request(
        f"{path or 'body'} is not valid Unicode text: it holds a lone UTF-16 surrogate ({text[e]!r}) at index {e}",
        path.split(".")[0].split("[")[0] or None,
    )


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(d: StreamDelta | None, n_prompt: int) -> dict:
    return _usage_of_choices([d], n_prompt).model_dump()


def _usage_of_choices(lasts: list[StreamDelta | None], n_prompt: int) -> Usage:
    """Usage of a response with one choice per last delta: the prompt counts once (as OpenAI's),
    completion tokens add up; cached tokens are the first choice's."""
    done = sum(d.num_output_tokens for d in lasts if d is not None)
    cached = lasts[0].num_cached_tokens if lasts and lasts[0] is not None else 0
    return Usage.of(n_prompt, done, cached)


def _param_of(message: str) -> str | None:
    """SamplingParams errors start with the field's name."""
    word = message.split(" ", 1)[0]
    return word if word in {f.name for f in dataclasses.fields(SamplingParams)} else None


class EngineStream:
    """The deltas of one engine request, for one HTTP response.

    Whoever stops reading early (a cancelled handler, a closed SSE response, garbage collection of
    a response that never started) aborts the request in the engine, so its KV slots are freed
    within one engine step.
    """

    def __init__(
        self,
        server: "LLMServer",
        agen,
        first: asyncio.Future,
        request_id: str,
        num_prompt: int,
        t_arrival: float | None = None,
    ):
        self.server, self.agen, self.request_id, self.num_prompt = server, agen, request_id, num_prompt
        self._first: asyncio.Future | None = first
        self.finished = False
        self.t_arrival = t_arrival if t_arrival is not None else time.perf_counter()  # submitted to the engine
        self.t_first_token: float | None = None
        self.t_last_token: float | None = None
        self.last: StreamDelta | None = None
        self.metrics: ServeMetrics | None = getattr(server, "metrics", None)

    def __aiter__(self) -> "EngineStream":
        return self

    async def __anext__(self) -> StreamDelta:
        if self.finished:
            raise StopAsyncIteration
        try:
            if self._first is not None:
                fut, self._first = self._first, None
                d = await fut
            else:
                d = await self.agen.__anext__()
        except StopAsyncIteration:
            self.finished = True
            raise
        except (ValueError, TypeError) as e:  # a refusal that surfaced late: the request never ran
            self.finished = True
            raise bad_request(str(e), _param_of(str(e)) or "prompt") from e
        except EngineRequestError as e:  # the engine failed it: nothing left to abort
            self.finished = True
            self._report("error", str(e))
            raise
        except BaseException:  # cancelled (client gone) or anything else: stop it in the engine
            self.close()
            raise
        if d.token_ids:
            now = time.perf_counter()
            m = self.metrics
            if self.t_first_token is None:
                self.t_first_token = now
                if m is not None:
                    m.ttft.observe(now - self.t_arrival)
                    if d.queue_time is not None:
                        m.queue_time.observe(d.queue_time)
            elif m is not None:  # per token: a delta may carry several (stream_interval, a lagging stream)
                m.itl.observe((now - self.t_last_token) / len(d.token_ids))
            self.t_last_token = now
        self.last = d
        if d.finished:
            self.finished = True
            self._report(d.finish_reason)
        return d

    def close(self) -> None:
        """Abort the request unless it finished. Idempotent, callable from any context."""
        if self.finished:
            return
        self.finished = True
        self.server.llm.abort(self.request_id)
        self.server.num_aborted += 1
        first = self._first
        if first is not None and not first.done():
            with suppress(RuntimeError):  # loop closed
                first.get_loop().call_soon_threadsafe(first.cancel)
        self._report("abort", "client disconnected")

    def _report(self, outcome: str | None, detail: str = "") -> None:
        """One log line per request when it ends (the only one), and its outcome metrics."""
        d, now = self.last, time.perf_counter()
        ttft = f"{self.t_first_token - self.t_arrival:.3f}s" if self.t_first_token is not None else "-"
        queue = f" queue={d.queue_time:.3f}s" if d is not None and d.queue_time is not None else ""
        logger.info(
            "request %s %s: prompt=%d cached=%d generated=%d ttft=%s total=%.3fs%s%s",
            self.request_id,
            outcome,
            self.num_prompt,
            d.num_cached_tokens if d else 0,
            d.num_output_tokens if d else 0,
            ttft,
            now - self.t_arrival,
            queue,
            f" ({detail})" if detail else "",
        )
        if self.metrics is not None:
            with suppress(Exception):
                self.metrics.request_finished(outcome, now - self.t_arrival)

    async def aclose(self) -> None:
        self.close()

    def __del__(self):
        with suppress(Exception):
            self.close()


# =============================================================================================== the deployment
@serve.deployment(name="LLMServer", max_ongoing_requests=512)
@serve.ingress(app)
class LLMServer:
    """One replica = one engine. Constructed by Serve from `build_app`'s arguments."""

    def __init__(
        self,
        model: str,
        served_model_names: list[str],
        engine_kwargs: dict[str, Any],
        generation_config: str = "auto",
        revision: str | None = None,
        log_level: str = "INFO",
        max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
    ):
        from nanovllmx import LLM

        _setup_logging(log_level)
        _BodyLimit.max_bytes = max_request_body_bytes
        self.model = model
        self.served_model_names = list(served_model_names)
        self.accepted_names = set(self.served_model_names) | {model}
        self.is_demo = model_resolver.is_demo(model)
        self.folder = model_resolver.resolve_model(model, revision)
        t0 = time.perf_counter()
        self.llm = LLM(self.folder, **engine_kwargs)
        self.tokenizer = self.llm.tokenizer
        self.context_len: int = self.llm.config.context_len
        self.vocab_size: int = self.llm.config.hf_config.vocab_size
        self.defaults = _generation_defaults(self.folder) if generation_config == "auto" else {}
        self.created = int(time.time())
        self.num_aborted = 0  # requests stopped early because their client went away
        self._closed = False
        # metrics (only with Ray up, as in any replica) and the engine stats poller / log line
        self.metrics = ServeMetrics.create(self.served_model_names[0])
        HTTPStatusMiddleware.metrics = self.metrics
        me = weakref.ref(self)  # the poller must not keep the replica alive
        self._stats_monitor = EngineStatsMonitor(
            lambda: me().llm.stats() if me() is not None else None,
            self.metrics,
            log_interval=float(os.environ.get("NANOVLLMX_STATS_LOG_INTERVAL", 5)),
        ).start()
        logger.info(
            "LLMServer ready: model=%s folder=%s served as %s, context %d, %s slots, loaded in %.1fs",
            model,
            self.folder,
            self.served_model_names,
            self.context_len,
            self.llm.stats().get("num_slots"),
            time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------------- health
    def _engine_problem(self) -> str | None:
        return "the server is shutting down" if self._closed else engine_problem(self.llm)

    def check_health(self) -> None:
        """Serve's replica health check: raising marks the replica unhealthy (Serve replaces it)."""
        problem = self._engine_problem()
        if problem:
            raise RuntimeError(problem)

    def __del__(self):
        if getattr(self, "_closed", True):
            return
        self._closed = True
        with suppress(Exception):
            self._stats_monitor.stop()
        with suppress(Exception):
            self.llm.shutdown()

    # ------------------------------------------------------------------------- plain routes
    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health(self) -> JSONResponse:
        problem = self._engine_problem()
        if problem:
            return APIError(503, problem, "server_error", None, "engine_dead").response()
        return JSONResponse({})

    @app.get("/version")
    async def version(self) -> dict:
        return {"version": nanovllmx.__version__}

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> dict:
        return ModelList(data=[self._model_card(n) for n in self.served_model_names]).model_dump()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERROR_RESPONSES)
    async def model(self, model_id: str) -> dict:
        return self._model_card(self._served_name(model_id)).model_dump()

    @app.get("/v1/engine/stats")
    async def engine_stats(self) -> dict:
        """Not OpenAI: this replica's engine counters (running/waiting requests, KV slots, cache hits)."""
        stats = await asyncio.to_thread(self.llm.stats)
        ctx = serve.get_replica_context()
        return {
            "model": self.served_model_names[0],
            "replica": ctx.replica_id.unique_id,
            "num_aborted_requests": self.num_aborted,
            **stats,
        }

    def _model_card(self, name: str) -> ModelCard:
        card = ModelCard(
            id=name, created=self.created, root=self.model, max_model_len=self.context_len, owned_by="nanovllmx"
        )
        if self.is_demo:
            card.owned_by = "nanovllmx-demo (random weights: output is noise)"
            card.random_weights = True
            card.description = model_resolver.DEMO_DESCRIPTION
        return card

    # ------------------------------------------------------------------------- OpenAI routes
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest, raw_request: Request):
        _reject_invalid_text(body)
        name = self._served_name(body.model)
        self._check_common(body)
        if body.logprobs or (body.top_logprobs or 0) > 0:
            raise bad_request("logprobs are not supported yet", "logprobs", "unsupported_parameter")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise bad_request(
                "response_format other than {'type': 'text'} is not supported yet",
                "response_format",
                "unsupported_parameter",
            )
        if isinstance(body.tool_choice, dict) or body.tool_choice not in (None, "auto", "none"):
            raise bad_request(
                "tool_choice must be 'auto' or 'none' (forced tool calls are not supported yet)",
                "tool_choice",
                "unsupported_parameter",
            )
        prompt_ids = await asyncio.to_thread(self._render_chat, body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self._sampling_params(
            body,
            max_tokens,
            len(prompt_ids),
            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
            "messages",
        )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._open_choices(prompt_ids, params, rid, body.n or 1)
        created = int(time.time())
        if body.stream:
            events = self._merged_sse(
                [self._chat_sse(st, rid, name, created, body, prompt_ids, i) for i, st in enumerate(streams)],
                streams,
                body,
                rid,
                name,
                created,
                "chat.completion.chunk",
                len(prompt_ids),
            )
            return StreamingResponse(
                self._guarded_sse(events, streams), media_type="text/event-stream", headers=SSE_HEADERS
            )
        results = await self._collect(streams, raw_request)
        resp = ChatCompletionResponse(
            id=rid,
            created=created,
            model=name,
            choices=[
                ChatCompletionChoice(
                    index=i,
                    message=ChatCompletionMessage(content=text),
                    finish_reason=last.finish_reason,
                    token_ids=token_ids if body.return_token_ids else None,
                )
                for i, (text, token_ids, last) in enumerate(results)
            ],
            usage=_usage_of_choices([r[2] for r in results], len(prompt_ids)),
            prompt_token_ids=prompt_ids if body.return_token_ids else None,
        ).model_dump()
        drop_none(resp, ("prompt_token_ids",))
        for c in resp["choices"]:
            drop_none(c, ("token_ids",))
        return JSONResponse(resp)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def completions(self, body: CompletionRequest, raw_request: Request):
        _reject_invalid_text(body)
        name = self._served_name(body.model)
        self._check_common(body)
        if body.logprobs is not None:
            raise bad_request("logprobs are not supported yet", "logprobs", "unsupported_parameter")
        if body.echo:
            raise bad_request("echo is not supported yet", "echo", "unsupported_parameter")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
        if body.best_of not in (None, 1):
            raise bad_request("best_of > 1 is not supported yet", "best_of", "unsupported_parameter")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(
                    f"a list of {len(prompt)} prompts was sent; several prompts in one request are "
                    "not supported yet: send one request per prompt",
                    "prompt",
                    "unsupported_parameter",
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(self.llm.encode, prompt)
        else:
            prompt_ids = list(prompt)
        params = self._sampling_params(body, body.max_tokens, len(prompt_ids), "max_tokens", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._open_choices(prompt_ids, params, rid, body.n or 1)
        created = int(time.time())
        if body.stream:
            events = self._merged_sse(
                [self._completion_sse(st, rid, name, created, body, prompt_ids, i) for i, st in enumerate(streams)],
                streams,
                body,
                rid,
                name,
                created,
                "text_completion",
                len(prompt_ids),
            )
            return StreamingResponse(
                self._guarded_sse(events, streams), media_type="text/event-stream", headers=SSE_HEADERS
            )
        results = await self._collect(streams, raw_request)
        choices = [
            CompletionChoice(
                index=i,
                text=text,
                finish_reason=last.finish_reason,
                token_ids=token_ids if body.return_token_ids else None,
                prompt_token_ids=prompt_ids if body.return_token_ids else None,
            )
            for i, (text, token_ids, last) in enumerate(results)
        ]
        resp = CompletionResponse(
            id=rid,
            created=created,
            model=name,
            choices=choices,
            usage=_usage_of_choices([r[2] for r in results], len(prompt_ids)),
        ).model_dump()
        for c in resp["choices"]:
            drop_none(c, ("token_ids", "prompt_token_ids"))
        return JSONResponse(resp)

    # ------------------------------------------------------------------------- request building
    def _served_name(self, requested: str | None) -> str:
        if requested is None:
            return self.served_model_names[0]
        if requested in self.accepted_names:
            return requested if requested in self.served_model_names else self.served_model_names[0]
        raise APIError(
            404,
            f"The model `{requested}` does not exist. This server serves: {', '.join(self.served_model_names)}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    @staticmethod
    def _check_common(body) -> None:
        if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
            raise bad_request(f"n must be between 1 and {MAX_CHOICES}, got {body.n}", "n")
        for field, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1)):
            v = getattr(body, field)
            if v is not None and v != neutral:
                raise bad_request(
                    f"{field} is not supported yet (only {neutral} is accepted)", field, "unsupported_parameter"
                )
        if body.logit_bias:
            raise bad_request("logit_bias is not supported yet", "logit_bias", "unsupported_parameter")

    def _render_chat(self, body: ChatCompletionRequest) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages", "no_chat_template")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise bad_request(
                            f"messages[{i}].content[{j}]: content parts of type {part.type!r} are not "
                            "supported (text only)",
                            "messages",
                            "unsupported_content",
                        )
                    texts.append(part.text)
                content = "\n".join(texts)
            if content is None and m.role != "assistant":
                raise bad_request(
                    f"messages[{i}]: a {m.role} message needs content", "messages", "missing_required_parameter"
                )
            msg: dict[str, Any] = {
                "role": "system" if m.role == "developer" else m.role,
                "content": content if content is not None else "",
            }
            for extra in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
                v = getattr(m, extra)
                if v is not None:
                    msg[extra] = v
            messages.append(msg)
        kwargs = dict(body.chat_template_kwargs or {})
        for reserved in (
            "conversation",
            "messages",
            "tokenize",
            "add_generation_prompt",
            "continue_final_message",
            "tools",
            "return_dict",
        ):
            if reserved in kwargs:
                raise bad_request(f"chat_template_kwargs may not set {reserved!r}", "chat_template_kwargs")
        tools = body.tools if body.tool_choice != "none" else None
        try:
            text = tok.apply_chat_template(
                messages,
                tools=tools or None,
                tokenize=False,
                add_generation_prompt=bool(body.add_generation_prompt) and not body.continue_final_message,
                continue_final_message=bool(body.continue_final_message),
                **kwargs,
            )
        except Exception as e:  # jinja2.TemplateError, ValueError from transformers, ... : the input's fault
            raise bad_request(
                f"the chat template could not render these messages: {type(e).__name__}: {e}",
                "messages",
                "invalid_messages",
            ) from e
        return tok.encode(text, add_special_tokens=False)

    def _sampling_params(
        self, body, max_tokens: int | None, n_prompt: int, max_param: str, prompt_param: str
    ) -> SamplingParams:
        if n_prompt == 0:
            raise bad_request("the prompt is empty", prompt_param, "empty_prompt")
        if n_prompt >= self.context_len:
            raise bad_request(
                f"This model's maximum context length is {self.context_len} tokens, but the prompt has "
                f"{n_prompt} tokens (at least one token must be left for the output).",
                prompt_param,
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = self.context_len - n_prompt
        elif isinstance(max_tokens, int) and max_tokens >= 1 and n_prompt + max_tokens > self.context_len:
            raise bad_request(
                f"This model's maximum context length is {self.context_len} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} "
                f"for the completion). Reduce the prompt or {max_param}.",
                max_param,
                "context_length_exceeded",
            )

        def pick(name: str, default):
            v = getattr(body, name)
            return v if v is not None else self.defaults.get(name, default)

        top_k = pick("top_k", -1)
        if isinstance(top_k, int) and top_k >= self.vocab_size:
            top_k = -1  # no cut-off, and keeps the engine's int32 arrays in range
        seed = body.seed
        if seed is not None:
            if not -(2**63) <= seed <= _INT64_MAX:
                raise bad_request(f"seed must be a 64-bit integer, got {seed}", "seed")
            seed %= 2**63  # the engine treats negative seeds as "unseeded"
        try:
            return SamplingParams(
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=top_k,
                min_p=pick("min_p", 0.0),
                max_tokens=max_tokens,
                stop=body.stop or [],
                stop_token_ids=body.stop_token_ids or [],
                ignore_eos=bool(body.ignore_eos),
                seed=seed,
            )
        except ValueError as e:
            msg = str(e)
            param = _param_of(msg)
            if param == "max_tokens":
                param, msg = max_param, msg.replace("max_tokens", max_param, 1)
            raise bad_request(msg, param) from e

    # ------------------------------------------------------------------------- engine streams
    async def _open(self, prompt_ids: list[int], params: SamplingParams, rid: str) -> "EngineStream":
        """Submit to the engine now; raise APIError(400) for a request it refuses. Returns the deltas."""
        t_arrival = time.perf_counter()
        agen = self.llm.stream(prompt_ids, params, request_id=rid)
        first = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0)  # runs the submission, which validates synchronously
        if first.done() and not first.cancelled() and first.exception() is not None:
            e = first.exception()
            if isinstance(e, (ValueError, TypeError)):
                raise bad_request(str(e), _param_of(str(e)) or "prompt") from e
            if isinstance(e, EngineOverloadedError):  # its queue is full: come back later
                logger.warning("request %s refused: %s", rid, e)
                raise APIError(
                    503, str(e), "server_error", None, "engine_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}
                ) from e
            if isinstance(e, RuntimeError):  # e.g. the engine is shutting down
                logger.warning("request %s refused by the engine: %s", rid, e)
                raise APIError(
                    503, f"the engine cannot take requests: {e}", "server_error", None, "engine_unavailable"
                ) from e
            raise e
        return EngineStream(self, agen, first, rid, len(prompt_ids), t_arrival)

    async def _open_choices(
        self, prompt_ids: list[int], params: SamplingParams, rid: str, n: int
    ) -> list["EngineStream"]:
        """One engine request per choice (they share the prompt's KV through the radix cache). With a
        seed, choice i uses seed + i: reproducible, and the choices differ."""
        streams: list[EngineStream] = []
        try:
            for i in range(n):
                p = params if (n == 1 or params.seed is None) else dataclasses.replace(params, seed=params.seed + i)
                streams.append(await self._open(prompt_ids, p, rid if n == 1 else f"{rid}-{i}"))
        except BaseException:
            for st in streams:  # all or none
                st.close()
            raise
        return streams

    async def _collect(
        self, streams: list["EngineStream"], raw_request: Request
    ) -> list[tuple[str, list[int], StreamDelta]]:
        """Run non-streaming requests (a response's choices) to their end; abort them in the engine if
        the client disconnects (seen by watching the ASGI receive channel, or by Serve cancelling
        this handler)."""

        async def consume_one(stream: EngineStream) -> tuple[str, list[int], StreamDelta]:
            texts: list[str] = []
            ids: list[int] = []
            last = None
            async for d in stream:
                texts.append(d.text)
                ids.extend(d.token_ids)
                last = d
            return "".join(texts), ids, last

        async def consume():
            return await asyncio.gather(*(consume_one(st) for st in streams))

        async def disconnected():
            while True:
                message = await raw_request.receive()
                if message.get("type") == "http.disconnect":
                    return

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(disconnected())
        gone = False
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled
            watch.cancel()
            if not work.done():
                gone = True
                work.cancel()
                for st in streams:
                    st.close()
        if gone:
            raise APIError(499, "client disconnected", "invalid_request_error", None, "client_disconnected")
        try:
            return list(work.result())
        except BaseException as e:
            for st in streams:  # the other choices are of no use without the failed one
                st.close()
            if isinstance(e, EngineRequestError):
                raise APIError(500, str(e), "server_error", None, "engine_error") from e
            raise

    @staticmethod
    async def _guarded_sse(events: AsyncIterator[str], streams: list["EngineStream"]) -> AsyncIterator[str]:
        """An SSE body: the events, an OpenAI error event if the engine failed mid-stream, always
        `data: [DONE]`; closing the body aborts the requests when the client went away."""
        try:
            async for e in events:
                yield e
        except EngineRequestError as e:
            yield _sse(APIError(500, str(e), "server_error", None, "engine_error").body())
        except APIError as e:
            yield _sse(e.body())
        finally:
            for st in streams:  # a no-op when finished; aborts when the client went away mid-stream
                st.close()
        yield "data: [DONE]\n\n"

    @staticmethod
    async def _merged_sse(
        choices: list[AsyncIterator[str]],
        streams: list["EngineStream"],
        body,
        rid: str,
        name: str,
        created: int,
        obj: str,
        n_prompt: int,
    ) -> AsyncIterator[str]:
        """The events of every choice as they come, then (stream_options.include_usage) one usage
        chunk for the whole response."""
        if len(choices) == 1:
            async for e in choices[0]:
                yield e
        else:
            q: asyncio.Queue = asyncio.Queue()

            async def pump(gen: AsyncIterator[str]) -> None:
                try:
                    async for e in gen:
                        await q.put(e)
                    await q.put(None)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                    await q.put(e)

            tasks = [asyncio.ensure_future(pump(g)) for g in choices]
            try:
                left = len(tasks)
                while left:
                    e = await q.get()
                    if e is None:
                        left -= 1
                    elif isinstance(e, BaseException):
                        raise e
                    else:
                        yield e
            finally:
                for t in tasks:
                    t.cancel()
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": name,
                    "choices": [],
                    "usage": _usage_of_choices([st.last for st in streams], n_prompt).model_dump(),
                }
            )

    async def _chat_sse(
        self,
        stream,
        rid: str,
        name: str,
        created: int,
        body: ChatCompletionRequest,
        prompt_ids: list[int],
        index: int = 0,
    ) -> AsyncIterator[str]:
        """One choice's chunks (the response's usage chunk comes from _merged_sse)."""
        opts = body.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts.continuous_usage_stats)
        n_prompt, last = len(prompt_ids), None

        def chunk(delta: dict, finish: str | None = None, token_ids: list[int] | None = None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if body.return_token_ids and token_ids is not None:
                choice["token_ids"] = token_ids
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [choice]}
            if include_usage:
                c["usage"] = _usage(last, n_prompt) if continuous else None
            return c

        head = chunk({"role": "assistant", "content": ""})
        if body.return_token_ids:  # as vLLM: the prompt's ids on the first chunk
            head["prompt_token_ids"] = prompt_ids
        yield _sse(head)
        async for d in stream:
            last = d
            if d.text or d.finished or (body.return_token_ids and d.token_ids):
                yield _sse(
                    chunk({"content": d.text} if d.text else {}, d.finish_reason if d.finished else None, d.token_ids)
                )

    async def _completion_sse(
        self, stream, rid: str, name: str, created: int, body: CompletionRequest, prompt_ids: list[int], index: int = 0
    ) -> AsyncIterator[str]:
        """One choice's chunks (the response's usage chunk comes from _merged_sse)."""
        opts = body.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = include_usage and bool(opts.continuous_usage_stats)
        n_prompt, last, sent_prompt = len(prompt_ids), None, False
        async for d in stream:
            last = d
            if not (d.text or d.finished or (body.return_token_ids and d.token_ids)):
                continue
            choice = {
                "index": index,
                "text": d.text,
                "logprobs": None,
                "finish_reason": d.finish_reason if d.finished else None,
            }
            if body.return_token_ids:
                choice["token_ids"] = d.token_ids
                if not sent_prompt:
                    choice["prompt_token_ids"], sent_prompt = prompt_ids, True
            c = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [choice]}
            if include_usage:
                c["usage"] = _usage(last, n_prompt) if continuous else None
            yield _sse(c)


# =============================================================================================== the builder
# Keys of `args` that configure the app itself rather than the engine or the Serve deployment.
APP_KEYS = ("model", "served_model_name", "generation_config", "revision", "log_level", "max_request_body_bytes")
# Serve deployment options that may be given in `args` (applied with Deployment.options).
DEPLOYMENT_KEYS = tuple(
    p
    for p in inspect.signature(serve.Deployment.options).parameters
    if not p.startswith("_") and p not in ("self", "func_or_class", "name", "version", "user_config")
)


def engine_arg_names() -> dict[str, str]:
    """Every `LLM(...)` argument by name, with its annotation (as text)."""
    from nanovllmx.config import EngineConfig
    from nanovllmx.llm import LLM

    names = {
        f.name: str(f.type) for f in dataclasses.fields(EngineConfig) if f.name not in ("hf_config", "eos_token_ids")
    }
    for p in inspect.signature(LLM.__init__).parameters.values():
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            names.setdefault(p.name, str(p.annotation))
    names.pop("model", None)
    return names


def _coerce(value: Any, annotation: str) -> Any:
    """`serve run nanovllmx.serve:build_app key=value` passes strings: give them their field's type."""
    if not isinstance(value, str) or "str" in annotation:
        return value
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _cluster_has_gpus() -> bool:
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001
        pass
    import torch

    return torch.cuda.is_available()


def build_app(args: dict) -> serve.Application:
    """Build the Serve application from a config's `args`.

    args: `model` (local folder, hub id or the demo name; required), `served_model_name` (str or list;
    default: the folder / repo name), `generation_config` ("auto": sampling defaults from the
    checkpoint's generation_config.json, "none": OpenAI's defaults), `revision` (hub revision),
    every `LLM(...)` argument by name (tp_size, pp_size, context_len, max_bs, gpu_memory_utilization,
    ...), and Serve deployment options (num_replicas, autoscaling_config, ray_actor_options,
    max_ongoing_requests, health_check_period_s, ...).
    """
    args = dict(args or {})
    if "model" not in args:
        raise ValueError(
            "build_app: `model` is required (a local checkpoint folder, a Hugging Face Hub id, or 'nanovllmx-demo')"
        )
    model = str(args.pop("model"))
    model_resolver.check_model(model)
    served = args.pop("served_model_name", None) or model_resolver.default_served_name(model)
    served_names = [served] if isinstance(served, str) else [str(s) for s in served]
    if not served_names or not all(served_names):
        raise ValueError("served_model_name must be a non-empty string or list of strings")
    generation_config = str(args.pop("generation_config", "auto"))
    if generation_config not in ("auto", "none"):
        raise ValueError(f"generation_config must be 'auto' or 'none', got {generation_config!r}")
    revision = args.pop("revision", None)
    log_level = str(args.pop("log_level", None) or os.environ.get("NANOVLLMX_LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}")

    max_body = _coerce(args.pop("max_request_body_bytes", DEFAULT_MAX_REQUEST_BODY_BYTES), "int")
    if max_body is None:
        max_body = 0
    if not isinstance(max_body, int) or isinstance(max_body, bool) or max_body < 0:
        raise ValueError(f"max_request_body_bytes must be an integer >= 0 (0: no limit), got {max_body!r}")

    engine_names = engine_arg_names()
    deploy_opts = {k: _coerce(args.pop(k), "Any") for k in DEPLOYMENT_KEYS if k in args}
    engine_kwargs = {}
    for k in list(args):
        if k in engine_names:
            engine_kwargs[k] = _coerce(args.pop(k), engine_names[k])
    if args:
        raise ValueError(
            f"build_app: unknown argument(s) {sorted(args)}. Known: app {list(APP_KEYS)}, "
            f"engine {sorted(engine_names)}, deployment {sorted(DEPLOYMENT_KEYS)}"
        )

    # GPUs. On GPU the engine runs in its own actors (a scheduler actor and one worker actor per
    # shard), never inside the replica: the replica's Python thread streams every token of every
    # request, and sharing its GIL with the engine's step loop cost 2/3 of the throughput on an H100
    # (docs/benchmarks-history.md). On CPU (the demo, the tests) the in-process engine is cheaper.
    device = engine_kwargs.get("device", "auto")
    if device == "auto":  # decide here: a replica without a GPU of its own would otherwise pick the CPU
        device = engine_kwargs["device"] = "cuda" if _cluster_has_gpus() else "cpu"
    tp, pp = int(engine_kwargs.get("tp_size", 1)), int(engine_kwargs.get("pp_size", 1))
    executor = engine_kwargs.get("executor", "auto")
    if executor == "auto":
        executor = engine_kwargs["executor"] = "ray" if (device == "cuda" or tp * pp > 1) else "local"
    own_workers = executor == "ray"
    actor_opts = dict(deploy_opts.get("ray_actor_options") or {})
    actor_opts.setdefault("num_gpus", 1 if (device == "cuda" and not own_workers) else 0)
    actor_opts.setdefault("num_cpus", 1)
    deploy_opts["ray_actor_options"] = actor_opts
    # one log line per request, ours (EngineStream._report); Serve's access log would be a second one
    deploy_opts.setdefault("logging_config", {"enable_access_log": False})
    # Serve's default (5 at once) would starve continuous batching: let the engine see the queue. It
    # sees all of it (max_bs running + max_waiting_requests waiting), so the engine's own bound applies
    # (503 + Retry-After, OpenAI's error JSON) rather than an unbounded queue in Serve's router.
    from nanovllmx.config import EngineConfig

    max_bs = int(engine_kwargs.get("max_bs", 256))
    max_waiting = int(engine_kwargs.get("max_waiting_requests", EngineConfig.max_waiting_requests))
    deploy_opts.setdefault("max_ongoing_requests", max(64, max_bs + max_waiting + 1))
    auto = deploy_opts.get("autoscaling_config")
    if isinstance(auto, dict) and "target_ongoing_requests" not in auto:
        # Serve's default target (2 per replica) suits one-request-at-a-time models, not a batching engine
        deploy_opts["autoscaling_config"] = {**auto, "target_ongoing_requests": max(1, max_bs // 2)}

    return LLMServer.options(**deploy_opts).bind(
        model, served_names, engine_kwargs, generation_config, revision, log_level, max_request_body_bytes=max_body
    )
