"""`Draining`: the Serve deployment that takes the app's route while the api_server drains, so that a
request arriving then gets OpenAI's error JSON (503 `engine_unavailable` + Retry-After) instead of
the Serve proxy's plain-text 404 for a route that is gone. The replicas of `LLMServer` finish what
is in flight meanwhile (Serve keeps delivering their responses)."""

from __future__ import annotations

import logging
import uuid

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from nanovllmx.serve.errors import UNAVAILABLE_RETRY_AFTER_S, APIError

logger = logging.getLogger("nanovllmx.serve")


@serve.deployment(name="Draining", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Draining:
    async def __call__(self, request: Request) -> JSONResponse:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        logger.info("%s %s -> 503 (draining) request %s", request.method, request.url.path, rid)
        return APIError(
            503,
            f"the server is shutting down; request id {rid}",
            "server_error",
            None,
            "engine_unavailable",
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        ).response()
