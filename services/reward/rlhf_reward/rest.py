"""REST API (FastAPI) over the same RewardCore as the gRPC servicer: thin handlers, typed
models; errors, limits, metrics and the offline OpenAPI page come from `rlhf_http`."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, StrictStr

from rlhf_common.auth import ApiKeys
from rlhf_http.app import StrictModel, make_app as make_base_app, require_key

from .core import RewardCore, ScoreItem
from .metrics import RewardMetrics

log = logging.getLogger(__name__)


class ScoreItemIn(StrictModel):
    prompt: StrictStr = Field(description="The prompt (may be empty if the response is not)")
    response: StrictStr = Field(description="The response to score (may be empty if the prompt is not)")


class ScoreRequest(StrictModel):
    items: list[ScoreItemIn] = Field(description="(prompt, response) pairs, scored in order")


class ScoreResultOut(BaseModel):
    score: float = Field(description="Scalar reward (the model's raw logit)")
    truncated: bool = Field(description="True when the pair exceeded the token limit and was truncated")


class ScoreResponse(BaseModel):
    results: list[ScoreResultOut]
    model_version: str = Field(description="Checkpoint that produced every result")


class CompareRequest(StrictModel):
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


def make_app(core: RewardCore, registry: CollectorRegistry, metrics: RewardMetrics | None, keys: ApiKeys,
             max_body_bytes: int) -> FastAPI:
    app = make_base_app(
        "RewardService",
        "Reward-model scoring. Same model, batching and versions as the gRPC "
        "`rlhf.reward.v1.RewardService`. When API keys are configured, `/v1/*` needs "
        "`Authorization: Bearer <key>`; `/healthz` and `/metrics` stay open.",
        registry, metrics, max_body_bytes, keys=keys)
    auth = [require_key(keys)]

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

    return app
