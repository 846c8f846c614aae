"""REST API (FastAPI) over the same RewardCore as the gRPC servicer: thin handlers, typed
models, errors mapped by rlhf_common.errors.to_http. OpenAPI page at /docs."""

from __future__ import annotations

import contextlib
import logging
import time

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf_common import errors

from .auth import ApiKeys
from .core import RewardCore, ScoreItem
from .metrics import RewardMetrics

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    # Unknown fields are errors (a misspelt field would otherwise be silently ignored).
    model_config = ConfigDict(extra="forbid")


class ScoreItemIn(_Strict):
    prompt: StrictStr = Field(description="The prompt (may be empty if the response is not)")
    response: StrictStr = Field(description="The response to score (may be empty if the prompt is not)")


class ScoreRequest(_Strict):
    items: list[ScoreItemIn] = Field(description="(prompt, response) pairs, scored in order")


class ScoreResultOut(BaseModel):
    score: float = Field(description="Scalar reward (the model's raw logit)")
    truncated: bool = Field(description="True when the pair exceeded the token limit and was truncated")


class ScoreResponse(BaseModel):
    results: list[ScoreResultOut]
    model_version: str = Field(description="Checkpoint that produced every result")


class CompareRequest(_Strict):
    prompt: StrictStr
    response_a: StrictStr
    response_b: StrictStr


class CompareResponse(BaseModel):
    score_a: float
    score_b: float
    truncated_a: bool
    truncated_b: bool
    prob_a_preferred: float = Field(description="Bradley-Terry: sigmoid(score_a - score_b)")
    model_version: str


class RewardStats(BaseModel):
    count: int
    mean: float
    std: float = Field(description="Sample standard deviation")


class ModelInfoResponse(BaseModel):
    model_name: str
    model_version: str
    version_number: int
    sha256: str
    max_length: int
    max_batch_items: int
    max_batch_size: int
    reward: RewardStats = Field(description="Running statistics (Welford) of live scores since the last swap")
    shadow_model_version: str


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


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


class RequestMetrics:
    """ASGI middleware: REST request counts by route template and status, and latency."""

    def __init__(self, app, metrics: RewardMetrics | None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.metrics is None:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

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


def make_app(core: RewardCore, registry: CollectorRegistry, metrics: RewardMetrics | None, keys: ApiKeys,
             max_body_bytes: int) -> FastAPI:
    app = FastAPI(
        title="RewardService",
        version="v1",
        description="Reward-model scoring. Same model, batching and versions as the gRPC "
                    "`rlhf.reward.v1.RewardService`. When API keys are configured, `/v1/*` needs "
                    "`Authorization: Bearer <key>`; `/healthz` and `/metrics` stay open.",
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                   429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )

    async def require_key(request: Request) -> None:
        keys.check(request.headers.get("authorization"))

    auth = [Depends(require_key)]

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

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=auth, tags=["reward"],
              summary="Score (prompt, response) pairs")
    async def score(body: ScoreRequest) -> ScoreResponse:
        out = await core.score([ScoreItem(i.prompt, i.response) for i in body.items])
        return ScoreResponse(results=[ScoreResultOut(score=r.score, truncated=r.truncated) for r in out.results],
                             model_version=out.model_version)

    @app.post("/v1/compare", response_model=CompareResponse, dependencies=auth, tags=["reward"],
              summary="Preference probability of response_a over response_b (Bradley-Terry)")
    async def compare(body: CompareRequest) -> CompareResponse:
        c = await core.compare(body.prompt, body.response_a, body.response_b)
        return CompareResponse(score_a=c.score_a, score_b=c.score_b, truncated_a=c.truncated_a,
                               truncated_b=c.truncated_b, prob_a_preferred=c.prob_a_preferred,
                               model_version=c.model_version)

    @app.get("/v1/model", response_model=ModelInfoResponse, dependencies=auth, tags=["reward"],
             summary="Live model, limits and running reward statistics")
    async def model_info() -> ModelInfoResponse:
        i = core.info()
        return ModelInfoResponse(
            model_name=i.model_name, model_version=i.model_version, version_number=i.version_number,
            sha256=i.sha256, max_length=i.max_length, max_batch_items=i.max_batch_items,
            max_batch_size=i.max_batch_size, shadow_model_version=i.shadow_model_version,
            reward=RewardStats(count=i.reward.count, mean=i.reward.mean, std=i.reward.std))

    @app.get("/healthz", tags=["ops"], summary="Liveness and the live model version (no auth)")
    async def healthz() -> dict[str, str]:
        return {"status": "serving", "model_version": core.live.version}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (no auth)", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Outermost first: metrics see every response, including the guard's 413s.
    app.add_middleware(BodyGuard, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


class RestServer(uvicorn.Server):
    """uvicorn inside the service's own event loop; the gRPC server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def rest_server(app: FastAPI, host: str, port: int) -> RestServer:
    return RestServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                     access_log=False, timeout_graceful_shutdown=5))
