"""The AI labeller (RLAIF): a judge model labels pairs of the rating queue that no human has.

Every pass takes the queue's highest-priority pairs the judge has not seen, shows the judge
the prompt and both answers (in a random order, undone afterwards, so a judge that prefers
a position does not prefer an answer) and reads its choice:

- backend "policy": the judge prompt goes to the policy service's Generate (greedy, a few
  tokens); the first "A", "B" or "tie" in the text is the choice, anything else is "unparsed";
- backend "folder": a causal LM loaded from a folder in this process; the choice is whichever
  of the tokens "A" and "B" is likelier as the next token (a judge that always answers).

A pair no human has rated goes to the feedback API as a pairwise item with source "ai", so it
is joined, labelled and counted like any other feedback, flagged as AI all the way (the
reward learner gives it its own weight). A pair a human already rated is only recorded: the
agreement of AI and human choices on the same pairs is in /v1/feedback/stats and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from typing import Callable

from rlhf_common.loops import BackgroundLoop

from .core import FeedbackItem
from .metrics import FeedbackMetrics
from .pairs import OpenPair, RatingQueue

log = logging.getLogger(__name__)

JUDGE_TEMPLATE = """You are judging two answers to the same request. Read the request and both answers, then say which answer is more helpful, correct and pleasant to read. Reply with a single letter: A or B (or the word tie if they are equally good).

Request:
{prompt}

Answer A:
{a}

Answer B:
{b}

The better answer is:"""

_FIRST = re.compile(r"^\W*(tie|a|b)\b", re.IGNORECASE)
_NAMED = re.compile(r"\banswer\s+(a|b)\b", re.IGNORECASE)


def judge_prompt(prompt: str, a: str, b: str, max_chars: int) -> str:
    return JUDGE_TEMPLATE.format(prompt=prompt[:max_chars], a=a[:max_chars], b=b[:max_chars])


def parse_choice(text: str) -> str | None:
    """'a', 'b' or 'tie' from the judge's reply; None when it names none."""
    m = _FIRST.match(text) or _NAMED.search(text)
    return m.group(1).lower() if m else None


class PolicyJudge:
    """The judge behind the policy service's Generate (greedy)."""

    def __init__(self, client, max_tokens: int = 4):
        self.client, self.max_tokens = client, max_tokens

    def __call__(self, text: str) -> str | None:
        resp = self.client.generate(text, n=1, temperature=0.0, max_tokens=self.max_tokens)
        return parse_choice(resp.completions[0].text if resp.completions else "")


class FolderJudge:
    """A causal LM from a folder: A or B by their next-token probability."""

    def __init__(self, path: str, max_length: int = 1024):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.max_length = max_length
        self.ids = {c: sorted({t for v in (c, " " + c) for t in self.tok.encode(v, add_special_tokens=False)[:1]})
                    for c in ("A", "B")}

    def __call__(self, text: str) -> str | None:
        enc = self.tok(text, return_tensors="pt", truncation=True, max_length=self.max_length)
        with self.torch.inference_mode():
            logits = self.model(**enc).logits[0, -1].float()
        score = {c: float(logits[ids].max()) for c, ids in self.ids.items()}
        return "a" if score["A"] >= score["B"] else "b"


class AiLabeller(BackgroundLoop):
    """Judges queue pairs on its own thread; `submit` hands feedback items to the gateway (the
    same path as the REST and gRPC APIs) and returns once they are on the broker."""

    def __init__(self, queue: RatingQueue, judge: Callable[[str], str | None],
                 submit: Callable[[list[FeedbackItem]], None], metrics: FeedbackMetrics | None,
                 every_s: float, batch: int, max_chars: int, seed: int = 0):
        super().__init__("feedback-ai-labeller")
        self.queue, self.judge, self.submit, self.metrics = queue, judge, submit, metrics
        self.every_s, self.batch, self.max_chars = every_s, batch, max_chars
        self.rng = random.Random(seed)

    def loop_body(self) -> None:
        while not self.stopping.is_set():
            self.run_once()
            self.stopping.wait(self.every_s)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.ai_judgements.labels(outcome).inc()

    def judge_pair(self, p: OpenPair) -> str | None:
        """The judge's choice oriented as gen_a vs gen_b."""
        swap = self.rng.random() < 0.5
        first, second = (p.answer_b, p.answer_a) if swap else (p.answer_a, p.answer_b)
        choice = self.judge(judge_prompt(p.prompt, first, second, self.max_chars))
        if choice is None or not swap:
            return choice
        return {"a": "b", "b": "a"}.get(choice, choice)

    def run_once(self) -> int:
        """Judge one batch; returns how many pairs were judged."""
        done = 0
        for p in self.queue.open_pairs(self.batch, ai_unjudged=True):
            if self.stopping.is_set():
                break
            try:
                choice = self.judge_pair(p)
            except Exception as e:  # the judge's model is away: try again next pass
                log.warning("AI judge failed on pair %s: %s", p.pair_id, e)
                self._count("failed")
                break
            if choice is None:
                self.queue.record_ai(p.pair_id, "none", False)
                self._count("unparsed")
                continue
            send = not p.human_rated
            if send:
                self.submit([FeedbackItem(feedback_id=f"ai-{p.pair_id}", generation_id=p.gen_a,
                                          other_generation_id=p.gen_b, choice=choice, source="ai",
                                          user_id="ai-labeller")])
            self.queue.record_ai(p.pair_id, choice, send)
            self._count("sent" if send else "audit")
            done += 1
        if self.metrics is not None:
            agreement = self.queue.ai_stats().agreement
            if agreement is not None:
                self.metrics.ai_agreement.set(agreement)
        return done


def submitter(core, loop: asyncio.AbstractEventLoop, timeout_s: float) -> Callable[[list[FeedbackItem]], None]:
    """Blocking submit from a thread through the core on the service's event loop."""
    def submit(items: list[FeedbackItem]) -> None:
        asyncio.run_coroutine_threadsafe(core.submit(items), loop).result(timeout_s)

    return submit
