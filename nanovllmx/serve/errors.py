"""OpenAI's error JSON for everything the app refuses: `APIError`, the exception handlers that turn
FastAPI's and Starlette's errors into it (400 rather than 422), the engine's typed errors as HTTP
errors, and the check that request text is valid Unicode."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from nanovllmx.errors import EngineOverloadedError, EngineRequestError, EngineUnavailableError
from nanovllmx.serve.protocol import ErrorResponse

logger = logging.getLogger("nanovllmx.serve")

RETRY_AFTER_S = 1  # Retry-After of a 503 when the engine's queue is full
# Retry-After of a 503 when the replica's engine is dead or shutting down: by then Serve is replacing
# the replica (build_app's health check: 3 failures 2 s apart) or routes to another one
UNAVAILABLE_RETRY_AFTER_S = 2

# ---- request ids: every error names its request, and the log lines about it carry the same id
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("nanovllmx_request_id", default="-")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id() -> str:
    """The id of the HTTP request being handled: Serve's `x-request-id` (the proxy sets it, and
    returns it to the client as the `X-Request-ID` response header), else one made up here."""
    return _REQUEST_ID.get()


class RequestIdContext:
    """ASGI middleware: sets `request_id()` for the request (and everything it runs, its streamed
    body included) from the `x-request-id` header, or a new id when there is none or it is odd."""

    def __init__(self, asgi_app: ASGIApp):
        self.app = asgi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = ""
        for k, v in scope.get("headers") or []:
            if k == b"x-request-id":
                rid = v.decode("latin-1")
                break
        token = _REQUEST_ID.set(rid if _SAFE_ID.fullmatch(rid) else uuid.uuid4().hex)
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST_ID.reset(token)


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

# the `responses` of the OpenAI routes in the OpenAPI schema
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    500: {"model": ErrorResponse, "description": "engine error"},
}


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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# Client-facing 5xx messages are generic: the engine's own messages name nodes, PIDs, actor ids and
# the Ray namespace. The details go to the replica's log, under the same request id.
def engine_unavailable(detail: str, rid: str | None = None) -> APIError:
    """The engine is dead or shutting down: 503 + Retry-After (a retry lands on a healthy replica,
    or on this one's replacement)."""
    rid = rid or request_id()
    logger.warning("request %s: the engine is unavailable: %s", rid, detail)
    return APIError(
        503,
        f"the engine is unavailable; request id {rid}",
        "server_error",
        None,
        "engine_unavailable",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
    )


def engine_failed(e: EngineRequestError, rid: str | None = None) -> APIError:
    """The engine failed a request it had accepted while it kept running: 500."""
    rid = rid or request_id()
    logger.error("request %s: the engine failed it: %s", rid, e)
    return APIError(500, f"the engine failed this request; request id {rid}", "server_error", None, "engine_error")


def engine_refused(rid: str, e: EngineOverloadedError | EngineUnavailableError) -> APIError:
    """The engine refused a request at submission: 503 + Retry-After."""
    if isinstance(e, EngineOverloadedError):  # its queue is full: come back later
        logger.warning("request %s (%s) refused: %s", request_id(), rid, e)
        return APIError(
            503, str(e), "server_error", None, "engine_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    return engine_unavailable(f"{e} (engine request {rid})")  # shutting down, or dead


def reject_invalid_text(body: Any) -> None:
    """JSON can escape lone UTF-16 surrogates (`"\\ud800"`): such strings are not Unicode text, no
    tokenizer takes them and they cannot be encoded back to UTF-8. 400, before anything uses them."""

    def find(v: Any) -> tuple[str, str] | None:
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


# =============================================================================================== handlers
async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    if exc.status < 500 and exc.code != "client_disconnected":  # a client that left: its request's line says so
        logger.info("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return exc.response()


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI answers 422 with its own shape; OpenAI answers 400 with its error JSON."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg", "invalid JSON")
        err = bad_request(
            f"malformed JSON body: {detail} (at character {first.get('loc', ('', '?'))[-1]})", None, "invalid_json"
        )
    else:
        parts: list[str] = []
        param: str | None = None
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


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """404 for unknown routes, 405 for wrong methods, 400 for unparsable bodies: OpenAI's shape too."""
    assert isinstance(exc, StarletteHTTPException)
    typ = _STATUS_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error")
    msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"no route {request.method} {request.url.path}; see GET /openapi.json"
    logger.info("%s %s -> %d %s", request.method, request.url.path, exc.status_code, msg)
    return APIError(exc.status_code, msg, typ, None, "request_too_large" if exc.status_code == 413 else None).response()


async def _internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id()
    logger.exception("request %s: internal error on %s %s", rid, request.method, request.url.path)
    return APIError(500, f"internal server error; request id {rid}", "server_error", None, "internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    """Every error of `app` answered with OpenAI's error JSON, and an OpenAPI schema that says so."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _internal_error_handler)
    app.add_middleware(RequestIdContext)  # outermost: every response, and its log lines, have their id

    def openapi() -> dict[str, Any]:
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
                                "content": {
                                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                                },
                            },
                        )
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customize the schema
