"""The app's ASGI middleware: JSON bodies whatever their Content-Type, the request body limit (413),
the API key (401), and the HTTP status metric (`nanovllmx_http_requests{status, route}`). Plain ASGI classes: nothing
in the way of streamed responses."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanovllmx.metrics import ServeMetrics
from nanovllmx.serve.errors import APIError

logger = logging.getLogger("nanovllmx.serve")

DEFAULT_MAX_REQUEST_BODY_BYTES = 8 * 1024 * 1024  # build_app's max_request_body_bytes


class JSONBodies:
    """POST bodies under /v1/ (and of /tokenize, /detokenize) are JSON whatever their Content-Type
    says (`curl -d` sends form-urlencoded)."""

    def __init__(self, asgi_app: ASGIApp):
        self.app = asgi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope.get("method") == "POST" and ("/v1/" in path or path.endswith("tokenize")):
            headers = scope.get("headers") or []
            if not any(k == b"content-type" and b"json" in v.lower() for k, v in headers):
                scope = {
                    **scope,
                    "headers": [(k, v) for k, v in headers if k != b"content-type"]
                    + [(b"content-type", b"application/json")],
                }
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses request bodies larger than `max_bytes` with 413 and OpenAI's error JSON: at once when
    Content-Length says so, else (chunked bodies) as soon as what was read passes the limit."""

    max_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES  # set by the replica (one per process); 0: no limit

    def __init__(self, asgi_app: ASGIApp):
        self.app = asgi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

        async def limited_receive() -> Message:
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


def app_path(scope: Scope) -> str:
    """The request's path inside the app (without the route prefix Serve mounts it under)."""
    path: str = scope.get("path", "")
    root = scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


class ApiKeyAuth:
    """With an API key set (build_app's `api_key`), every route but /health answers 401 with OpenAI's
    error JSON unless the request carries `Authorization: Bearer <key>` (compared in constant time).
    Without a key it lets everything through. The key is never logged, nor echoed."""

    api_key: bytes | None = None  # set by the replica (one per process); None: no key, no check
    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, asgi_app: ASGIApp):
        self.app = asgi_app

    @classmethod
    def set_key(cls, key: str | None) -> None:
        cls.api_key = key.encode("utf-8") if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = ApiKeyAuth.api_key
        if key is None or scope["type"] != "http" or app_path(scope) in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = b""
        for k, v in scope.get("headers") or []:
            if k == b"authorization":
                given = v
                break
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key):
            return await self.app(scope, receive, send)
        msg = (
            "Incorrect API key provided."
            if given
            else "You didn't provide an API key. Send it in an Authorization header: `Authorization: Bearer <key>`."
        )
        logger.info("%s %s -> 401 %s", scope.get("method"), app_path(scope), msg)
        err = APIError(
            401, msg, "invalid_request_error", None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
        await err.response()(scope, receive, send)


# ================================================================================ HTTP status counts
_KNOWN_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/engine/stats",
    "/tokenize",
    "/detokenize",
    "/health",
    "/version",
    "/docs",
    "/openapi.json",
)


def route_label(path: str) -> str:
    """A bounded set of route labels (unknown paths would make a series each)."""
    if path in _KNOWN_ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class HTTPStatusMiddleware:
    """Counts every HTTP response by status code and route (`nanovllmx_http_requests`). The replica
    points `HTTPStatusMiddleware.metrics` at its ServeMetrics (one replica per process)."""

    metrics: ServeMetrics | None = None

    def __init__(self, asgi_app: ASGIApp):
        self.app = asgi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        m = HTTPStatusMiddleware.metrics
        if m is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = app_path(scope)
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start" and not status:
                status.append(message["status"])
                try:
                    m.http_response(message["status"], route_label(path))
                except Exception:  # noqa: BLE001
                    pass
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            if not status:  # the outer error middleware answers 500
                try:
                    m.http_response(500, route_label(path))
                except Exception:  # noqa: BLE001
                    pass
            raise


def install_middleware(app: FastAPI) -> None:
    """Outermost first on the way in: the status metric (nanovllmx_http_requests{status, route}), the
    API key (before any body is read), the body limit, JSON bodies."""
    app.add_middleware(JSONBodies)
    app.add_middleware(BodyLimit)
    app.add_middleware(ApiKeyAuth)
    app.add_middleware(HTTPStatusMiddleware)
