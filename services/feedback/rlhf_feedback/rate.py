"""The rating page (/rate) and its API, and the loop that keeps the rating queue ranked and filled.

The page is plain HTML, CSS and JS shipped in this package (static/), with no external
resource, so it works without the internet. It asks `GET /v1/rate/next` for a pair, shows
the prompt and the two answers side by side, and posts the rater's choice to
`POST /v1/rate/choice`, which answers with the next pair at once. A choice becomes a pairwise
item of the feedback API (`FeedbackCore.submit`, the same path as POST /v1/feedback), so it is
joined, labelled and counted like any other feedback.

Raters are told apart by the `X-Rater` header the page sends (a name the rater types once),
or else by a hash of their API key; the key itself is never stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from itertools import cycle
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field, StrictStr

from rlhf_common.errors import InvalidInput
from rlhf_common.loops import BackgroundLoop
from rlhf_http.app import StrictModel, require_key

from . import active
from .core import FeedbackCore
from .metrics import FeedbackMetrics
from .pairs import Assignment, RatingQueue

log = logging.getLogger(__name__)

MAX_RATER_CHARS = 64
STATIC = {"rate.css": "text/css; charset=utf-8", "rate.js": "text/javascript; charset=utf-8"}


class RateLoop(BackgroundLoop):
    """Ranks the queue's unrated pairs with the configured strategy and, given prompts and a
    policy, asks the policy for answers while the queue runs low."""

    def __init__(self, queue: RatingQueue, strategy: active.Strategy, ensemble, metrics: FeedbackMetrics | None,
                 every_s: float, rank_max: int, seed: int = 0, policy=None, prompts: list[str] | None = None,
                 min_open: int = 16, n_answers: int = 2, temperature: float = 1.0, max_tokens: int = 256):
        super().__init__("feedback-rate-queue")
        self.queue, self.strategy, self.ensemble, self.metrics = queue, strategy, ensemble, metrics
        self.every_s, self.rank_max = every_s, rank_max
        self.rng = random.Random(seed)
        self.policy, self.prompts = policy, cycle(prompts) if prompts else None
        self.min_open, self.n_answers = min_open, n_answers
        self.temperature, self.max_tokens = temperature, max_tokens

    def loop_body(self) -> None:
        while not self.stopping.is_set():
            try:
                self.fill_once()
                self.rank_once()
            except Exception as e:  # a reward or policy service away: keep serving, try again
                log.warning("rating queue: %s", e)
            if self.metrics is not None:
                self.metrics.rate_pairs.set(self.queue.open_count())
            self.stopping.wait(self.every_s)

    def rank_once(self) -> int:
        """Score up to rank_max unrated pairs (least recently ranked first) and set their priorities."""
        pairs = self.queue.open_pairs(self.rank_max)
        if not pairs:
            return 0
        if self.strategy == "random" or self.ensemble is None:
            probs = [[0.5] * len(pairs)]
        else:
            per_pair = [self.ensemble.compare(p.prompt, p.answer_a, p.answer_b) for p in pairs]
            probs = [list(col) for col in zip(*per_pair)]
        pri = active.priorities(self.strategy, probs, self.rng)
        self.queue.set_priorities({p.pair_id: x for p, x in zip(pairs, pri)})
        if self.metrics is not None:
            self.metrics.rate_ranked.inc(len(pairs))
        return len(pairs)

    def fill_once(self) -> int:
        """Ask the policy about the next prompts until the queue has min_open open pairs."""
        if self.policy is None or self.prompts is None:
            return 0
        made = 0
        for _ in range(self.min_open):
            if self.stopping.is_set() or self.queue.open_count() >= self.min_open:
                break
            made += self.queue.observe(self.policy.answers(next(self.prompts), self.n_answers, self.temperature,
                                                           self.max_tokens))
        return made


class PairOut(BaseModel):
    ticket: str = Field(description="Send it back with the choice")
    prompt: str
    a: str = Field(description="The answer shown on the left (A)")
    b: str = Field(description="The answer shown on the right (B)")


class NextResponse(BaseModel):
    pair: PairOut | None = Field(description="The next pair to rate; null when the queue is empty")


class ChoiceIn(StrictModel):
    ticket: StrictStr = Field(description="The ticket of the pair shown")
    choice: Literal["a", "b", "tie"] = Field(description="'a': the left answer is better, 'b': the right, 'tie'")
    reason: StrictStr = Field("", description="Optional free text: why")
    session_id: StrictStr = Field("", description="The page's session id")


class ChoiceResponse(BaseModel):
    recorded: bool
    next: PairOut | None = Field(description="The next pair, so the page shows it at once")


def _pair_out(a: Assignment | None) -> PairOut | None:
    return None if a is None else PairOut(ticket=a.ticket, prompt=a.prompt, a=a.answer_a, b=a.answer_b)


def rater_of(request: Request) -> str:
    """The rater: the X-Rater name the page sends, else a hash of the API key, else 'anonymous'."""
    name = request.headers.get("x-rater", "").strip()
    if name:
        if len(name) > MAX_RATER_CHARS or not name.isprintable():
            raise InvalidInput(f"X-Rater: must be 1-{MAX_RATER_CHARS} printable characters")
        return name
    auth = request.headers.get("authorization", "")
    if auth:
        return "key-" + hashlib.sha256(auth.strip().encode()).hexdigest()[:12]
    return "anonymous"


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


class RatingApi:
    """The page's routes over the queue (blocking, on its own thread) and the feedback core."""

    def __init__(self, queue: RatingQueue, core: FeedbackCore, metrics: FeedbackMetrics | None):
        self.queue, self.core, self.metrics = queue, core, metrics
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-rate")

    async def _blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def next(self, rater: str) -> PairOut | None:
        return _pair_out(await self._blocking(self.queue.next_for, rater))

    async def choose(self, rater: str, body: ChoiceIn) -> ChoiceResponse:
        if len(body.reason) > self.core.max_text_chars:
            raise InvalidInput(f"reason: at most {self.core.max_text_chars} characters (got {len(body.reason)})")
        item = await self._blocking(self.queue.feedback_for, body.ticket, rater, body.choice, body.reason,
                                    body.session_id[:256])
        if item is not None:
            await self.core.submit([item])  # on the broker before the ticket counts as answered
        await self._blocking(self.queue.record, body.ticket, body.choice)
        if self.metrics is not None:
            self.metrics.rate_choices.labels("first" if item is not None else "repeat").inc()
        return ChoiceResponse(recorded=True, next=await self.next(rater))

    async def stats(self):
        raters = await self._blocking(self.queue.rater_stats)
        ai = await self._blocking(self.queue.ai_stats)
        if self.metrics is not None:
            rep = sum(r.repeats for r in raters)
            if rep:
                same = sum(r.self_agreement * r.repeats for r in raters if r.self_agreement is not None)
                self.metrics.rate_self_agreement.set(same / rep)
        return raters, ai

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def add_rate_routes(app: FastAPI, api: RatingApi, keys) -> None:
    auth = [require_key(keys)]

    @app.get("/rate", response_class=HTMLResponse, tags=["rating"], summary="The rating page (no auth to load it)")
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("rate.html"))

    @app.get("/rate/static/{name}", tags=["rating"], summary="The page's stylesheet and script",
             include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise InvalidInput(f"no such asset: {name[:64]!r}")
        return Response(_static(name), media_type=STATIC[name], headers={"cache-control": "no-cache"})

    @app.get("/v1/rate/next", response_model=NextResponse, dependencies=auth, tags=["rating"],
             summary="The next pair for this rater (highest priority first; sides randomised)")
    async def next_pair(request: Request) -> NextResponse:
        return NextResponse(pair=await api.next(rater_of(request)))

    @app.post("/v1/rate/choice", response_model=ChoiceResponse, dependencies=auth, tags=["rating"],
              summary="Record the rater's choice as pairwise feedback; returns the next pair")
    async def choice(request: Request, body: ChoiceIn) -> ChoiceResponse:
        return await api.choose(rater_of(request), body)
