"""The OpenAI-compatible HTTP API as a Ray Serve deployment: the FastAPI app and `LLMServer`.

One deployment, `LLMServer`: each replica builds its own `LLM` (scheduler, workers, KV cache) in
`__init__` and serves the FastAPI routes below. Requests are tokenized in the replica (chat through
the checkpoint's chat template; `mapping.py`), handed to the engine, and every delta the engine
produces is written to the client as soon as it arrives (SSE for `stream: true`; `streaming.py`).
A client that goes away aborts its request in the engine, which frees its KV slots within one step.
With `frontends` > 1 (builder.py) the replicas are HTTP frontends of one shared engine instead: each
attaches its `LLM` to the `LLMEngine` deployment's scheduler actor (serve/engine_deployment.py).

The replica reaches the engine only through the `EngineClient` interface (engine/protocol.py).
`build_app(args)` (builder.py) turns the `args` of a Serve config into the application; see
docs/serving.md.
"""

# No `from __future__ import annotations`: FastAPI must see the real parameter types of the
# class-based routes (Serve rewrites them), or `Request` parameters turn into query parameters.
import asyncio
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

import nanovllmx
from nanovllmx.engine.protocol import EngineClient
from nanovllmx.errors import EngineUnavailableError
from nanovllmx.metrics import EngineStatsMonitor, ServeMetrics
from nanovllmx.serve import model_resolver
from nanovllmx.serve.errors import (
    ERROR_RESPONSES,
    APIError,
    engine_unavailable,
    install_error_handlers,
    reject_invalid_text,
)
from nanovllmx.serve.mapping import (
    DEFAULT_CHAT_TEMPLATE_TIMEOUT_S,
    DEFAULT_PROMPT_JOB_STUCK_AFTER_S,
    OpenAIRequest,
    RequestMapping,
    full_response,
    generation_defaults,
)
from nanovllmx.serve.middleware import (
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    ApiKeyAuth,
    BodyLimit,
    HTTPStatusMiddleware,
    install_middleware,
)
from nanovllmx.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from nanovllmx.serve.streaming import SSE_HEADERS, ChunkHead, collect, first_deltas, open_choices, sse_body
from nanovllmx.utils.log import setup_logging

logger = logging.getLogger("nanovllmx.serve")


def openai_app() -> FastAPI:
    """A FastAPI app with our middleware and OpenAI-shaped error handling (LLMServer's here, and
    LLMIngress's in serve/ingress.py)."""
    fastapi_app = FastAPI(
        title="Nano-vLLM-X OpenAI-compatible API",
        version=nanovllmx.__version__,
        description="OpenAI-compatible completions and chat completions served by Nano-vLLM-X on Ray Serve.",
    )
    install_middleware(fastapi_app)
    install_error_handlers(fastapi_app)
    return fastapi_app


app = openai_app()


ENGINE_WAIT_S = 900.0  # a frontend waits this long for a healthy LLMEngine (a replacement loads the model)


async def attach_engine(engine: DeploymentHandle[Any]) -> Any:
    """The LLMEngine's actor handles, once it is healthy. While the engine is replaced (its actors
    died) the old replica refuses and Serve routes to the new one once it is up; waiting here
    keeps the frontend's constructor from failing (and being retried by Serve) meanwhile."""
    deadline = time.monotonic() + ENGINE_WAIT_S
    while True:
        try:
            return await engine.attachment.remote()
        except Exception as e:  # noqa: BLE001 - an engine that cannot serve (yet): wait for its replacement
            if time.monotonic() > deadline:
                raise
            logger.info("waiting for a healthy engine to attach to: %s", e)
            await asyncio.sleep(1.0)


def start_stats_monitor(stats: Callable[[], dict[str, Any] | None], metrics: ServeMetrics | None) -> EngineStatsMonitor:
    """The engine gauges and counters, and the periodic stats log line, of the replica that owns an engine."""
    interval = float(os.environ.get("NANOVLLMX_STATS_LOG_INTERVAL", 5))
    return EngineStatsMonitor(stats, metrics, log_interval=interval).start()


class LLMServerImpl:
    """One replica = one engine. Constructed by Serve from `build_app`'s arguments. Two deployments
    of it (below): `LLMServer` serves the HTTP routes itself (one replica); `LLMBackend` is called by
    `LLMIngress` through a handle (several replicas: serve/ingress.py)."""

    # Serve awaits an async __init__ (an engine's handles come through an awaited handle call)
    async def __init__(  # type: ignore[misc]
        self,
        model: str,
        served_model_names: list[str],
        engine_kwargs: dict[str, Any],
        generation_config: str = "auto",
        revision: str | None = None,
        log_level: str = "INFO",
        max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
        shutdown_timeout_s: float = 30.0,
        trust_request_chat_template: bool = False,
        chat_template_timeout_s: float = DEFAULT_CHAT_TEMPLATE_TIMEOUT_S,
        prompt_job_stuck_after_s: float = DEFAULT_PROMPT_JOB_STUCK_AFTER_S,
        api_key: str | None = None,
        reasoning_parser: str = "auto",
        tool_call_parser: str = "auto",
        engine: DeploymentHandle[Any] | None = None,
        frontends: int = 1,
    ):
        """`engine`: an `LLMEngine` deployment (build_app's `frontends` > 1). This replica is then one
        of `frontends` HTTP frontends of that engine: its LLM attaches to the engine's scheduler actor
        (handles fetched once, here), admits its share of the engine's queue bound, and it exports no
        engine-level metrics (the engine does)."""
        from nanovllmx import LLM

        setup_logging(log_level)
        BodyLimit.max_bytes = max_request_body_bytes
        ApiKeyAuth.set_key(api_key)  # never logged
        self.prompt_job_stuck_after_s = prompt_job_stuck_after_s
        self.model_arg = model  # what the config's `model` named: a folder, hub id or the demo name
        self.served_model_names = list(served_model_names)
        self.accepted_names = set(self.served_model_names) | {model}
        self.is_demo = model_resolver.is_demo(model)
        self.folder = model_resolver.resolve_model(model, revision)
        t0 = time.perf_counter()
        attach_to = None if engine is None else await attach_engine(engine)
        self.llm: EngineClient = LLM(self.folder, attach_to=attach_to, clients=frontends, **engine_kwargs)
        self.mapping = RequestMapping(
            self.llm,
            generation_defaults(self.folder) if generation_config == "auto" else {},
            trust_request_chat_template=trust_request_chat_template,
            chat_template_timeout_s=chat_template_timeout_s,
            reasoning_parser=reasoning_parser,
            tool_call_parser=tool_call_parser,
        )
        # /v1/models names the model as served (or its hub id), never the operator's local folder
        kind = model_resolver.kind_of(model)
        self.model_root = model if kind in ("hub", "demo") else self.served_model_names[0]
        self.context_len = self.mapping.context_len
        self.created = int(time.time())
        self.num_aborted = 0  # requests stopped early because their client went away
        self._closed = False
        # __del__: how long requests still in the engine may run (Serve calls __del__ once it has
        # drained the replica's requests, within graceful_shutdown_timeout_s; build_app passes that)
        self.shutdown_timeout_s = float(shutdown_timeout_s)
        # metrics (only with Ray up, as in any replica) and the engine stats poller / log line
        self.metrics: ServeMetrics | None = ServeMetrics.create(self.served_model_names[0])
        HTTPStatusMiddleware.metrics = self.metrics
        me = weakref.ref(self)  # the poller must not keep the replica alive

        def engine_stats() -> dict[str, Any] | None:
            server = me()
            return server.llm.stats() if server is not None else None

        # a frontend's engine is shared: its LLMEngine replica exports the engine's stats, once
        self._stats_monitor = None if engine is not None else start_stats_monitor(engine_stats, self.metrics)
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
        """Why this replica cannot serve, or None. Blocks (up to 10 s with Ray): call it off the event loop."""
        if self._closed:
            return "the server is shutting down"
        try:
            self.llm.check_health()
        except EngineUnavailableError as e:
            return str(e)
        return None

    def _stuck_workers(self) -> str | None:
        """Why the prompt workers (chat template render, encoding) count as stuck, or None. Does not block."""
        return self.mapping.jobs.stuck(self.prompt_job_stuck_after_s)

    async def check_health(self) -> None:
        """Serve's replica health check: raising marks the replica unhealthy (Serve replaces it)."""
        problem = self._stuck_workers() or await asyncio.to_thread(self._engine_problem)
        if problem:
            raise RuntimeError(problem)

    def __del__(self) -> None:
        """Serve calls this when it removes the replica (downscale, redeploy, delete, shutdown, a
        failed health check), after its drain: requests routed here have finished or the drain timed
        out. New requests are refused (503 engine_unavailable); requests still in the engine may finish
        for up to `shutdown_timeout_s`, the rest end with finish_reason "abort"."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._stats_monitor is not None:
            self._stats_monitor.stop()
        with suppress(Exception):
            self.llm.shutdown(timeout=self.shutdown_timeout_s)
        with suppress(Exception):
            self.mapping.jobs.shutdown()

    # ------------------------------------------------------------------------- plain routes
    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health(self) -> JSONResponse:
        stuck = self._stuck_workers()
        if stuck:
            return APIError(503, stuck, "server_error", None, "prompt_workers_stuck").response()
        problem = await asyncio.to_thread(self._engine_problem)
        if problem:  # the details (addresses, actor ids) go to the log, under the request id
            return engine_unavailable(problem).response()
        return JSONResponse({})

    @app.get("/version")
    async def version(self) -> dict[str, Any]:
        return {"version": nanovllmx.__version__}

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> dict[str, Any]:
        return ModelList(data=[self._model_card(n) for n in self.served_model_names]).model_dump()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def model(self, model_id: str) -> dict[str, Any]:
        return self._model_card(self._served_name(model_id)).model_dump()

    @app.get("/v1/engine/stats")
    async def engine_stats(self) -> dict[str, Any]:
        """Not OpenAI: this replica's engine counters (running/waiting requests, KV slots, cache hits)."""
        stats = await asyncio.to_thread(self.llm.stats)
        ctx = serve.get_replica_context()
        return {
            "model": self.served_model_names[0],
            "replica": ctx.replica_id.unique_id,
            "replica_node_id": ray.get_runtime_context().get_node_id(),
            "num_aborted_requests": self.num_aborted,
            **stats,
        }

    def _model_card(self, name: str) -> ModelCard:
        card = ModelCard(
            id=name, created=self.created, root=self.model_root, max_model_len=self.context_len, owned_by="nanovllmx"
        )
        if self.is_demo:
            card.owned_by = "nanovllmx-demo (random weights: output is noise)"
            card.random_weights = True
            card.description = model_resolver.DEMO_DESCRIPTION
        return card

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

    # ------------------------------------------------------------------------- OpenAI routes
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await self._generate(body, raw_request, "chatcmpl", "chat.completion.chunk")

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(self, body: CompletionRequest, raw_request: Request) -> Response:
        return await self._generate(body, raw_request, "cmpl", "text_completion")

    async def _generate(self, body: OpenAIRequest, raw_request: Request, id_prefix: str, chunk_object: str) -> Response:
        """Both OpenAI routes: check and map the request, one engine request per choice, then a
        streamed (SSE) or a whole response."""
        reject_invalid_text(body)
        name = self._served_name(body.model)
        self.mapping.check(body)
        prompts = await self.mapping.prompt_ids(body)
        return await self._respond(body, prompts, raw_request, id_prefix, chunk_object, name)

    async def _respond(
        self,
        body: OpenAIRequest,
        prompts: list[list[int]],
        raw_request: Request | None,
        id_prefix: str,
        chunk_object: str,
        name: str,
    ) -> Response:
        """A checked request with its prompts' token ids: one engine request per choice (n per
        prompt), then a streamed (SSE) or a whole response."""
        params = [self.mapping.sampling_params(body, len(p)) for p in prompts]
        grammar = params[0].structured  # the same for every prompt: the request's fields ask for it
        if grammar is not None:  # compiled off the event loop (a big schema takes a while)
            await self.mapping.compile_grammar(grammar)
        rid = f"{id_prefix}-{uuid.uuid4().hex}"
        streams = open_choices(self, prompts, params, rid, body.n or 1)
        created = int(time.time())
        texts = self.mapping.texts
        if body.stream:
            await first_deltas(self, streams)  # failed before its first token: an HTTP error, not a 200
            head = ChunkHead(rid, chunk_object, created, name)
            return StreamingResponse(
                sse_body(body, streams, head, prompts, texts, self.mapping.output_parser),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        results = await collect(streams, raw_request, self)
        return JSONResponse(
            full_response(body, rid, created, name, prompts, results, texts, self.mapping.output_parser)
        )

    # ------------------------------------------------------------------------- vLLM's tokenizer routes
    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(self, body: TokenizeChatRequest | TokenizeCompletionRequest) -> dict[str, Any]:
        self._served_name(body.model)
        return (await self.mapping.jobs.run(self.mapping.tokenize, body)).model_dump()

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self._served_name(body.model)
        return (await self.mapping.jobs.run(self.mapping.detokenize, body)).model_dump()

    # ------------------------------------------------------------------------- behind LLMIngress
    async def generate_ids(
        self, route: str, body: dict[str, Any], prompt_ids: list[int], more_prompt_ids: list[list[int]] | None = None
    ) -> AsyncIterator[Any]:
        """A chat or completions request that `LLMIngress` already checked and tokenized (several
        replicas: docs/serving.md, "Routing across replicas"); the request router read `prompt_ids`
        (the first prompt's) to pick this replica; a completions request with several prompts sends
        the others as `more_prompt_ids`. Yields the response's head `(status, headers, media type)`,
        then its body pieces; errors come back as OpenAI error responses, as on the HTTP routes."""
        chat = route == "chat"
        try:
            req: OpenAIRequest = (
                ChatCompletionRequest.model_validate(body) if chat else CompletionRequest.model_validate(body)
            )
            name = self._served_name(req.model)
            resp = await self._respond(
                req,
                [prompt_ids, *(more_prompt_ids or [])],
                None,
                "chatcmpl" if chat else "cmpl",
                "chat.completion.chunk" if chat else "text_completion",
                name,
            )
        except APIError as e:
            resp = e.response()
        except Exception:
            logger.exception("internal error on a %s request from the ingress", route)
            resp = APIError(500, "internal server error", "server_error", None, "internal_error").response()
        headers = [(k, v) for k, v in resp.headers.items() if k.lower() != "content-length"]
        yield resp.status_code, headers, resp.media_type
        if isinstance(resp, StreamingResponse):
            async for piece in resp.body_iterator:
                yield piece
        else:
            yield bytes(resp.body)

    def prompt_config(self) -> dict[str, Any]:
        """What LLMIngress needs to tokenize for this engine."""
        return {
            "context_len": self.context_len,
            "max_len": self.llm.config.max_len,
            "vocab_size": self.mapping.vocab_size,
        }

    async def get_json(self, what: str, arg: str | None = None) -> tuple[int, Any]:
        """LLMIngress's plain routes: (status, JSON) of /health, /v1/models[/id], /v1/engine/stats."""
        import json

        try:
            if what == "health":
                resp = await self.health()
                return resp.status_code, json.loads(bytes(resp.body))
            if what == "models":
                return 200, await self.models()
            if what == "model":
                return 200, await self.model(arg or "")
            if what == "engine_stats":
                return 200, await self.engine_stats()
        except APIError as e:
            return e.status, json.loads(bytes(e.response().body))
        return 404, {"error": {"message": f"no such route {what}", "type": "invalid_request_error"}}


class LLMBackendImpl(LLMServerImpl):
    """A replica behind LLMIngress: it also publishes routing stats for the request router (Serve
    polls `record_routing_stats` on every replica that defines it, so the one-replica LLMServer,
    which no router reads, does not)."""

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing stats of this replica, read by the request router (serve/router.py) every
        request_routing_stats_period_s: the engine's prefix summary and its load."""
        from nanovllmx.serve.router import SUMMARY_LIMIT, encode_summary

        if self._closed:
            return {}

        def read() -> dict[str, Any]:
            stats = self.llm.stats()
            return {
                "prefix_hashes": encode_summary(self.llm.prefix_summary(SUMMARY_LIMIT)),
                "num_running": stats.get("num_running", 0),
                "num_waiting": stats.get("num_waiting", 0),
                "free_slots": int(stats.get("free_slots", 0)) + int(stats.get("cached_slots", 0)),
            }

        return await asyncio.to_thread(read)


# Serve allows one FastAPI ingress per application: behind LLMIngress the engine replicas are the
# plain class (same name in Serve, so metrics and logs read the same)
LLMServer = serve.deployment(name="LLMServer", max_ongoing_requests=512)(serve.ingress(app)(LLMServerImpl))
LLMBackend = serve.deployment(name="LLMServer", max_ongoing_requests=512)(LLMBackendImpl)
