"""`LLMIngress`: the HTTP front of an app with several `LLMServer` replicas (docs/serving.md,
"Routing across replicas").

Serve's proxy hands a replica only the ASGI scope; the body is read later, by the replica. So a
request router that runs in the proxy cannot see the prompt. With several replicas, `build_app`
therefore puts this thin deployment in front: it serves the same routes, checks and tokenizes chat
and completions requests (chat template included) and calls `LLMServer.generate_ids` through a
`DeploymentHandle` with the token ids as the keyword `prompt_ids`. The handle's request router
(`PrefixCacheRouter`, serve/router.py) reads them there, and the engine takes the same ids: a prompt
is tokenized once. With one replica `build_app` does not use this deployment at all.
"""

# No `from __future__ import annotations`: FastAPI must see the real parameter types (as in app.py).
import asyncio
import logging
from types import SimpleNamespace
from typing import Any, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

import nanovllmx
from nanovllmx.engine.encoder import PromptEncoder
from nanovllmx.engine.protocol import EngineClient
from nanovllmx.serve import model_resolver
from nanovllmx.serve.app import openai_app
from nanovllmx.serve.errors import ERROR_RESPONSES, reject_invalid_text
from nanovllmx.serve.mapping import (
    DEFAULT_CHAT_TEMPLATE_TIMEOUT_S,
    DEFAULT_PROMPT_JOB_STUCK_AFTER_S,
    OpenAIRequest,
    RequestMapping,
)
from nanovllmx.serve.middleware import DEFAULT_MAX_REQUEST_BODY_BYTES, ApiKeyAuth, BodyLimit
from nanovllmx.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from nanovllmx.utils.log import setup_logging

logger = logging.getLogger("nanovllmx.serve")

ingress_app = openai_app()


class TokenizerView:
    """What `RequestMapping` needs of an engine to turn a request into token ids (the tokenizer,
    the context length, `encode`), without an engine: the engine's own `PromptEncoder`."""

    def __init__(self, folder: str, context_len: int, max_len: int, vocab_size: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.config = SimpleNamespace(
            context_len=context_len, max_len=max_len, hf_config=SimpleNamespace(vocab_size=vocab_size)
        )
        self._encoder = PromptEncoder(self.tokenizer, max_len)

    def encode(self, prompt: Any) -> list[int]:
        return self._encoder.encode(prompt)


@serve.deployment(name="LLMIngress", max_ongoing_requests=4096)
@serve.ingress(ingress_app)
class LLMIngress:
    def __init__(
        self,
        server: DeploymentHandle[Any],
        model: str,
        revision: str | None = None,
        log_level: str = "INFO",
        max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
        trust_request_chat_template: bool = False,
        chat_template_timeout_s: float = DEFAULT_CHAT_TEMPLATE_TIMEOUT_S,
        prompt_job_stuck_after_s: float = DEFAULT_PROMPT_JOB_STUCK_AFTER_S,
        api_key: str | None = None,
    ):
        setup_logging(log_level)
        BodyLimit.max_bytes = max_request_body_bytes
        ApiKeyAuth.set_key(api_key)  # never logged
        self.server = server
        self.stream_server = server.options(stream=True)
        self.folder = model_resolver.resolve_model(model, revision)
        self.trust = trust_request_chat_template
        self.template_timeout_s = chat_template_timeout_s
        self.prompt_job_stuck_after_s = prompt_job_stuck_after_s
        self._mapping: RequestMapping | None = None
        self._lock = asyncio.Lock()

    async def _get_mapping(self) -> RequestMapping:
        """Built on first use: the context length is the engine's, asked of a replica."""
        async with self._lock:
            if self._mapping is None:
                cfg = await self.server.prompt_config.remote()
                enc = await asyncio.to_thread(
                    TokenizerView, self.folder, cfg["context_len"], cfg["max_len"], cfg["vocab_size"]
                )
                self._mapping = RequestMapping(
                    cast(EngineClient, enc),
                    {},  # sampling defaults apply in LLMServer
                    trust_request_chat_template=self.trust,
                    chat_template_timeout_s=self.template_timeout_s,
                )
            return self._mapping

    async def check_health(self) -> None:
        if self._mapping is not None:
            stuck = self._mapping.jobs.stuck(self.prompt_job_stuck_after_s)
            if stuck:
                raise RuntimeError(stuck)

    def __del__(self) -> None:
        if getattr(self, "_mapping", None) is not None:
            self._mapping.jobs.shutdown()  # type: ignore[union-attr]

    async def _forward(self, what: str, arg: str | None = None) -> JSONResponse:
        status, content = await self.server.get_json.remote(what, arg)
        return JSONResponse(content, status_code=status)

    # ------------------------------------------------------------------------- plain routes
    @ingress_app.get("/health")
    async def health(self) -> JSONResponse:
        """One replica's health (the one the router picks); Serve health-checks every replica itself."""
        return await self._forward("health")

    @ingress_app.get("/version")
    async def version(self) -> dict[str, Any]:
        return {"version": nanovllmx.__version__}

    @ingress_app.get("/v1/models", response_model=ModelList)
    async def models(self) -> JSONResponse:
        return await self._forward("models")

    @ingress_app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def model(self, model_id: str) -> JSONResponse:
        return await self._forward("model", model_id)

    @ingress_app.get("/v1/engine/stats")
    async def engine_stats(self) -> JSONResponse:
        """One replica's engine counters (the one the router picks; `replica` names it)."""
        return await self._forward("engine_stats")

    # ------------------------------------------------------------------------- OpenAI routes
    @ingress_app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await self._generate("chat", body)

    @ingress_app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(self, body: CompletionRequest, raw_request: Request) -> Response:
        return await self._generate("completions", body)

    # ------------------------------------------------------------------------- vLLM's tokenizer routes
    @ingress_app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(self, body: TokenizeChatRequest | TokenizeCompletionRequest) -> dict[str, Any]:
        """Answered here: the ingress has the tokenizer (the model name is checked by no replica)."""
        mapping = await self._get_mapping()
        return (await mapping.jobs.run(mapping.tokenize, body)).model_dump()

    @ingress_app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        mapping = await self._get_mapping()
        return (await mapping.jobs.run(mapping.detokenize, body)).model_dump()

    async def _generate(self, route: str, body: OpenAIRequest) -> Response:
        reject_invalid_text(body)
        mapping = await self._get_mapping()
        mapping.check(body)
        prompts = await mapping.prompt_ids(body)
        fields = body.model_dump(exclude_unset=True)
        # the router reads the first prompt (keyword prompt_ids); the replica takes them all
        gen: Any = self.stream_server.generate_ids.remote(
            route, fields, prompt_ids=prompts[0], more_prompt_ids=prompts[1:] or None
        )
        try:
            status, headers, media_type = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        if media_type == "text/event-stream":

            async def body_iter() -> Any:
                try:
                    async for piece in gen:
                        yield piece
                finally:
                    gen.cancel()  # the client left: the replica aborts the request in the engine

            return StreamingResponse(body_iter(), status_code=status, headers=dict(headers), media_type=media_type)
        try:
            pieces = [p async for p in gen]
        except asyncio.CancelledError:
            gen.cancel()
            raise
        content = b"".join(p if isinstance(p, bytes) else str(p).encode() for p in pieces)
        return Response(content, status_code=status, headers=dict(headers), media_type=media_type)
