"""A FastAPI app skeleton with the project's REST conventions.

- Errors: every error body is `{"error": {"status", "message"}}`; domain errors map through
  `rlhf_common.errors.to_http`, and FastAPI's validation errors become 400 (not 422), so REST
  and gRPC agree on what a bad request is.
- Authentication comes first: with API keys, a request to a protected path without a valid
  key gets 401 before its body is read or validated (as over gRPC). More than one
  Authorization header is refused.
- Bodies over the configured size get 413 before they are read (when Content-Length is
  given) or while they are read; bodies that are not UTF-8 get 400.
- Request counts and latency by route template and status; a client that leaves before any
  response is counted with status 499 (client closed), not as a server error.
- No redirects: `/v1/score/` is 404, never a 307 built from the client's Host header.
- `/docs` is Swagger UI served from the `swagger-ui-bundle` wheel: no CDN, it works offline.
"""

from __future__ import annotations

import logging
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf_common import errors
from rlhf_common.auth import ApiKeys
from rlhf_common.metrics import HttpMetrics

log = logging.getLogger(__name__)

DOCS_ASSETS = "/docs-assets"


class StrictModel(BaseModel):
    """A request body: unknown fields are errors (a misspelt field would otherwise be ignored)."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 409, 413, 429, 503)}


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    status, message = errors.to_http(exc)
    if isinstance(exc, errors.Unauthenticated):
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class BodyGuard:
    """ASGI middleware: refuses bodies over `max_bytes` (413, from Content-Length before
    reading when it is given, else while reading) and bodies that are not UTF-8, then
    replays the body to the app."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = errors.PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    return await error_response(too_large, {"Connection": "close"})(scope, receive, send)
            except ValueError:
                return await error_response(errors.InvalidInput("Content-Length: not a number"))(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await error_response(too_large, {"Connection": "close"})(scope, receive, send)
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = errors.InvalidInput(f"request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset "
                                      f"{e.start})")
            return await error_response(bad)(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class AuthGuard:
    """ASGI middleware: requests to paths under `prefixes` need a configured bearer key,
    checked before anything reads the body."""

    def __init__(self, app, keys: ApiKeys, prefixes: tuple[str, ...]):
        self.app = app
        self.keys = keys
        self.prefixes = prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys.enabled and scope["path"].startswith(self.prefixes):
            given = [v.decode("latin-1") for k, v in scope.get("headers") or () if k == b"authorization"]
            try:
                self.keys.check(given)
            except errors.Unauthenticated as exc:
                return await error_response(exc)(scope, receive, send)
        return await self.app(scope, receive, send)


class RequestMetrics:
    """ASGI middleware: REST request counts by route template and status, and latency."""

    def __init__(self, app, metrics: HttpMetrics | None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.metrics is None:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 499  # until a response starts: a client that leaves first closed the request

        async def send_status(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # Route templates only: unknown paths share one label, so labels stay bounded.
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(name, str(status)).inc()
            self.metrics.http_latency.labels(name).observe(time.perf_counter() - t0)


def require_key(keys: ApiKeys):
    """A route dependency that lets a request in only with a configured bearer key."""
    async def check(request: Request) -> None:
        keys.check(request.headers.getlist("authorization"))

    return Depends(check)


def make_app(title: str, description: str, registry: CollectorRegistry, metrics: HttpMetrics | None,
             max_body_bytes: int, keys: ApiKeys | None = None, protected: tuple[str, ...] = ("/v1/",)) -> FastAPI:
    """The app with error handlers, /metrics, the offline /docs page and the middlewares;
    the service adds its routes. With `keys`, paths under `protected` need a key before their
    body is read."""
    app = FastAPI(title=title, version="v1", description=description, responses=ERROR_RESPONSES,
                  docs_url=None, redoc_url=None, redirect_slashes=False)

    @app.exception_handler(errors.RLHFError)
    async def _domain_error(request: Request, exc: errors.RLHFError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(errors.InvalidInput(_validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Routing errors (404, 405) and body-parsing errors keep their status; same body shape.
        return JSONResponse({"error": {"status": exc.status_code, "message": str(exc.detail)}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(exc)

    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (no auth)", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Added innermost first: metrics see every response, including the guards' 401s and 413s;
    # authentication runs before the body is read.
    app.add_middleware(BodyGuard, max_bytes=max_body_bytes)
    if keys is not None:
        app.add_middleware(AuthGuard, keys=keys, prefixes=protected)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
