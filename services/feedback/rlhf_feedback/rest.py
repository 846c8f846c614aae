"""REST API (FastAPI) over the same FeedbackCore as the gRPC servicer: thin handlers and typed
models; errors, limits, metrics and the offline OpenAPI page come from `rlhf_http`."""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, StrictFloat, StrictInt, StrictStr

from rlhf_common.auth import ApiKeys
from rlhf_http.app import StrictModel, make_app as make_base_app, require_key

from .core import FeedbackCore, FeedbackItem
from .metrics import FeedbackMetrics
from .rate import RatingApi, add_rate_routes

Number = StrictInt | StrictFloat


class RatingIn(StrictModel):
    value: Number = Field(description="The rating, within [scale_min, scale_max]")
    scale_min: Number = Field(description="Lowest value of the scale, e.g. 1")
    scale_max: Number = Field(description="Highest value of the scale, e.g. 5")


class PairwiseIn(StrictModel):
    other_generation_id: StrictStr = Field(description="The other answer (B) to the same prompt")
    choice: Literal["a", "b", "tie"] = Field(description="'a': this item's answer was preferred, 'b': the other")


class EditIn(StrictModel):
    edited_response: StrictStr = Field(description="The user's corrected answer, preferred over the original")


class FeedbackItemIn(StrictModel):
    feedback_id: StrictStr = Field(description="Your idempotency key: resend the same item with the same id")
    generation_id: StrictStr = Field(description="The answer judged, as returned by the policy with it")
    thumb: Literal["up", "down"] | None = None
    rating: RatingIn | None = None
    pairwise: PairwiseIn | None = None
    edit: EditIn | None = None
    comment: StrictStr = Field("", description="Optional free text (stored as given, never logged)")
    user_id: StrictStr = Field("", description="Optional user id (stored as given, never logged)")
    session_id: StrictStr = Field("", description="Optional session id (stored as given, never logged)")

    def to_item(self) -> FeedbackItem:
        return FeedbackItem(
            feedback_id=self.feedback_id, generation_id=self.generation_id, thumb=self.thumb,
            rating=(float(self.rating.value), float(self.rating.scale_min), float(self.rating.scale_max))
            if self.rating else None,
            other_generation_id=self.pairwise.other_generation_id if self.pairwise else None,
            choice=self.pairwise.choice if self.pairwise else None,
            edited_response=self.edit.edited_response if self.edit else None,
            comment=self.comment, user_id=self.user_id, session_id=self.session_id)


class SubmitRequest(StrictModel):
    items: list[FeedbackItemIn] = Field(description="Feedback items; each sets exactly one of thumb, rating, "
                                                    "pairwise, edit")


class ItemResultOut(BaseModel):
    feedback_id: str
    duplicate: bool = Field(description="True when this id was accepted before with the same body")


class SubmitResponse(BaseModel):
    results: list[ItemResultOut] = Field(description="One per item, in request order")


class CountOut(BaseModel):
    kind: str
    outcome: str
    count: int


class RaterOut(BaseModel):
    rater: str
    ratings: int = Field(description="Pairs rated (first judgements)")
    repeats: int = Field(description="Repeated pairs answered")
    self_agreement: float | None = Field(description="Share of repeats answered as the first time")


class AiOut(BaseModel):
    judged: int = Field(description="Pairs the AI labeller judged")
    sent: int = Field(description="... of which sent as feedback with source 'ai' (no human had rated them)")
    compared: int = Field(description="Pairs judged by both a human and the AI labeller")
    agreement: float | None = Field(description="Share of those where the AI chose as the human did")


class StatsResponse(BaseModel):
    counts: list[CountOut]
    labels_by_source: dict[str, int] = Field({}, description="Labels made by the join, by source (human, ai)")
    raters: list[RaterOut] = Field([], description="Rating page: each rater's ratings and self-agreement")
    ai: AiOut | None = Field(None, description="The AI labeller's judgements and its agreement with humans")


def make_app(core: FeedbackCore, registry: CollectorRegistry, metrics: FeedbackMetrics | None, keys: ApiKeys,
             max_body_bytes: int, rating: RatingApi | None = None) -> FastAPI:
    app = make_base_app(
        "FeedbackService",
        "Feedback on answers served by the policy: thumbs, ratings, A/B choices and edits, each on the "
        "`generation_id` returned with the answer. Same core as the gRPC `rlhf.feedback.v1.FeedbackService`. "
        "A 2xx means every new item is on the broker; a 503 means none is remembered: resend with the same "
        "`feedback_id`s. The same id with another body gets 409. When API keys are configured, `/v1/*` needs "
        "`Authorization: Bearer <key>`; `/healthz` and `/metrics` stay open.",
        registry, metrics, max_body_bytes, keys=keys)
    auth = [require_key(keys)]

    @app.post("/v1/feedback", response_model=SubmitResponse, dependencies=auth, tags=["feedback"],
              summary="Submit feedback items")
    async def submit(body: SubmitRequest) -> SubmitResponse:
        results = await core.submit([i.to_item() for i in body.items])
        return SubmitResponse(results=[ItemResultOut(feedback_id=r.feedback_id, duplicate=r.duplicate)
                                       for r in results])

    @app.get("/v1/feedback/stats", response_model=StatsResponse, dependencies=auth, tags=["feedback"],
             summary="Counts by kind and outcome, at the gateway and at the join")
    async def stats() -> StatsResponse:
        counts = await core.stats()
        out = StatsResponse(counts=[CountOut(kind=k, outcome=o, count=n) for (k, o), n in sorted(counts.items())],
                            labels_by_source=core.source_stats())
        if rating is not None:
            raters, ai = await rating.stats()
            out.raters = [RaterOut(rater=r.rater, ratings=r.ratings, repeats=r.repeats,
                                   self_agreement=r.self_agreement) for r in raters]
            out.ai = AiOut(judged=ai.judged, sent=ai.sent, compared=ai.compared, agreement=ai.agreement)
        return out

    if rating is not None:
        add_rate_routes(app, rating, keys)

    @app.get("/healthz", tags=["ops"], summary="Liveness (no auth)")
    async def healthz() -> dict[str, str]:
        return {"status": "serving"}

    return app
