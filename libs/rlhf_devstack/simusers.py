"""Simulated production users and the hidden gold judge behind their taste.

The main demo aligns a policy online with users who are simulated, as in studies of reward
over-optimisation: a **gold reward model** stands in for the users' taste, and the system
never sees it. The users only reach the system through its public APIs: they ask the
policy's `Generate` (gRPC) for answers, judge them with the gold model plus noise, and post
thumbs, ratings and pairwise choices to the feedback service (REST) on the answers'
generation ids. What the system learns, it learns from that feedback alone; the gold model
then measures whether the policy really got better (`evaluate`, `win_rate`) or only better
at pleasing the proxy reward model.

Parts (docs/SIMULATED_USERS.md explains the choices):

- `GoldJudge`: frozen all-MiniLM-L6-v2 mean-pooled embeddings of "prompt\\nanswer" and a
  linear Bradley-Terry head fit on chitchat-dataset's human preference pairs (the better
  rated of two conversations on the same prompt wins). `train_gold_judge` measures held-out
  accuracy on a split by prompt, then fits the final head on every pair and caches it.
- The noise model (pure functions of a gold score, a `Calibration` and a seeded RNG):
  thumbs, 1-5 ratings and pairwise choices.
- `SimulatedUsers`: user threads that ask, judge and send feedback, keeping counts, failures
  and a time series for the report.
- `evaluate`, `win_rate`: the gold score of a policy on held-out prompts, and the gold win
  rate of one set of answers over another, with 95% intervals.

Dev tooling: no service imports this module.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import grpc
import httpx
import torch
# Imported here, not lazily in a thread: transformers' lazy imports race when two threads
# resolve them at once (the demo trains the judge while the stack starts).
from transformers import AutoModel, AutoTokenizer

from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf_jobs.preference_data import RatedConversation, chitchat_conversations, minilm_dir, pair_indices

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(".cache/demo/gold")
HEAD_FILE = "head.safetensors"
META_FILE = "gold.json"
Kind = Literal["thumbs", "rating", "pairwise"]
KINDS: tuple[Kind, ...] = ("thumbs", "rating", "pairwise")


# ---------------------------------------------------------------- intervals


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes may be fractional: ties count half)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, mid - half), min(1.0, mid + half)


_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
         15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04}


def mean_interval(xs: Sequence[float]) -> tuple[float, float, float]:
    """Mean and a 95% t-interval (the mean alone, twice, for fewer than two values)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    df = len(xs) - 1
    t = 1.96 if df > 30 else _T975[max(k for k in _T975 if k <= df)]
    h = t * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - h, m + h


# ---------------------------------------------------------------- gold judge


class Embedder:
    """Frozen all-MiniLM-L6-v2: mean-pooled, L2-normalised embeddings, in batches sorted by
    length (less padding). Thread-safe: one forward pass at a time."""

    def __init__(self, max_length: int = 128, batch_size: int = 32):
        self.max_length, self.batch_size = max_length, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        self.model = AutoModel.from_pretrained(str(minilm_dir())).eval()
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str], progress: bool = False, desc: str = "embedding") -> torch.Tensor:
        """(N, 384) float32 embeddings of `texts`, in their order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), desc=desc, unit="text", mininterval=2.0)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1)
                out[torch.tensor(idx)] = torch.nn.functional.normalize(v, dim=-1)
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out


def judge_text(prompt: str, answer: str) -> str:
    """What the judge embeds: the prompt, a newline, the answer (a chitchat transcript in training)."""
    return f"{prompt}\n{answer}"


def fit_bradley_terry(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Linear Bradley-Terry head w on embedding differences x (N, D) with labels y (N,) in
    {0, 1}: P(A preferred) = sigmoid(w . (e_A - e_B)); L2-regularised, L-BFGS."""
    w = torch.zeros(x.shape[1], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


@dataclass(frozen=True)
class GoldSettings:
    """How a gold judge is made; a cached judge is reused only for the same settings."""

    # Conversations used: 0 = all rated chitchat conversations (5,986), else a seeded sample.
    conversations: int = 0
    seed: int = 0
    # Tokens of "prompt\nanswer" the backbone sees.
    max_length: int = 128
    # L2 penalty on the head (per pair mean loss + l2 * |w|^2).
    l2: float = 1e-3
    # Rating gap that makes a training pair (ratings are means of three 1-10 scales) ...
    train_gap: float = 1.0
    # ... and the gap of the held-out pairs that measure accuracy (clear preferences).
    eval_gap: float = 3.0
    held_out_fraction: float = 0.2
    max_per_prompt: int = 300


class GoldJudge:
    """The users' hidden taste: score = w . embed("prompt\\nanswer"). Differences of scores
    are Bradley-Terry logits: sigmoid(score_A - score_B) is the head's estimate of the chance
    that a chitchat rater prefers A."""

    def __init__(self, head: torch.Tensor, meta: dict, embedder: Embedder | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        # A fresh, aligned copy in float64: a head read from a file (memory-mapped at any offset)
        # then scores bit-identically to the one that was saved.
        self.head = head.detach().to(torch.float64).clone()
        self.meta = meta
        self.embedder = embedder or Embedder(meta["settings"]["max_length"])

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Gold scores of (prompt, answer) pairs, batched."""
        if not pairs:
            return []
        e = self.embedder([judge_text(p, a) for p, a in pairs])
        return (e.to(torch.float64) @ self.head).tolist()

    @property
    def held_out_accuracy(self) -> float:
        return self.meta["held_out"]["accuracy"]

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (HEAD_FILE + ".tmp")
        save_file({"w": self.head.to(torch.float32).contiguous()}, str(tmp))
        tmp.replace(folder / HEAD_FILE)
        (folder / (META_FILE + ".tmp")).write_text(json.dumps(self.meta, indent=1) + "\n")
        (folder / (META_FILE + ".tmp")).replace(folder / META_FILE)

    @classmethod
    def load(cls, folder: Path, threads: int | None = None) -> "GoldJudge":
        from safetensors.torch import load_file

        meta = json.loads((folder / META_FILE).read_text())
        return cls(load_file(str(folder / HEAD_FILE))["w"], meta, threads=threads)


def cached_settings(folder: Path) -> GoldSettings | None:
    """The settings of the judge cached in `folder`, or None when there is none (or it is unreadable)."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if not (folder / HEAD_FILE).exists():
            return None
        return GoldSettings(**meta["settings"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def train_gold_judge(settings: GoldSettings = GoldSettings(), progress: bool = True, threads: int | None = None,
                     conversations: Sequence[RatedConversation] | None = None) -> GoldJudge:
    """Embed the conversations once; fit a head on the training prompts' pairs and measure
    pairwise accuracy on the held-out prompts' clear pairs; then fit the final head on the
    pairs of every prompt."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    s = settings
    convs = list(conversations) if conversations is not None else chitchat_conversations()
    total = len(convs)
    if s.conversations and s.conversations < len(convs):
        convs = random.Random(s.seed).sample(convs, s.conversations)
    prompts = sorted({c.prompt for c in convs})
    if len(prompts) < 2:
        raise ValueError(f"a split by prompt needs at least two prompts, the sample has {len(prompts)}")
    shuffled = prompts[:]
    random.Random(s.seed).shuffle(shuffled)
    n_held = min(len(prompts) - 1, max(1, round(s.held_out_fraction * len(prompts))))
    held, train = set(shuffled[:n_held]), set(shuffled[n_held:])

    embedder = Embedder(s.max_length)
    emb = embedder([judge_text(c.prompt, c.text) for c in convs], progress=progress,
                   desc=f"embedding {len(convs)} conversations")
    t_embed = time.perf_counter() - t0

    def tensors(pairs):
        a = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        b = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return emb[a] - emb[b], torch.tensor([p[2] for p in pairs], dtype=torch.float32)

    train_pairs = pair_indices(convs, train, s.train_gap, s.max_per_prompt, random.Random(s.seed + 1))
    held_pairs = pair_indices(convs, held, s.eval_gap, s.max_per_prompt, random.Random(s.seed + 2))
    held_all = pair_indices(convs, held, s.train_gap, s.max_per_prompt, random.Random(s.seed + 2))
    if not train_pairs or not held_pairs:
        raise ValueError(f"too few pairs to train and measure: {len(train_pairs)} training pairs (gap >= "
                         f"{s.train_gap}), {len(held_pairs)} held-out pairs (gap >= {s.eval_gap})")
    w = fit_bradley_terry(*tensors(train_pairs), s.l2)

    def accuracy(pairs) -> dict:
        x, y = tensors(pairs)
        correct = int(((x @ w > 0).float() == y).sum())
        lo, hi = wilson(correct, len(pairs))
        return {"accuracy": round(correct / len(pairs), 4), "wilson95": [round(lo, 4), round(hi, 4)],
                "pairs": len(pairs), "correct": correct}

    held_out = {**accuracy(held_pairs), "min_gap": s.eval_gap, "prompts": n_held, "train_prompts": len(train),
                "train_pairs": len(train_pairs)}
    held_out_any_gap = {**accuracy(held_all), "min_gap": s.train_gap}

    all_pairs = pair_indices(convs, set(prompts), s.train_gap, s.max_per_prompt, random.Random(s.seed + 3))
    w_all = fit_bradley_terry(*tensors(all_pairs), s.l2)
    x_all, _ = tensors(all_pairs)
    meta = {
        "what": "gold judge: frozen all-MiniLM-L6-v2 mean-pooled embeddings of 'prompt\\nanswer' and a linear "
                "Bradley-Terry head fit on chitchat-dataset human preference pairs",
        "settings": asdict(s),
        "conversations_used": len(convs), "conversations_available": total, "prompts": len(prompts),
        "held_out": held_out, "held_out_any_gap": held_out_any_gap,
        "final_pairs": len(all_pairs),
        "final_head_norm": round(float(w_all.norm()), 3),
        "conversation_score_std": round(float((emb @ w_all).std()), 4),
        "final_pair_logit_abs_mean": round(float((x_all @ w_all).abs().mean()), 4),
        "seconds": {"embedding": round(t_embed, 1), "total": round(time.perf_counter() - t0, 1)},
        "torch_threads": torch.get_num_threads(),
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return GoldJudge(w_all, meta, embedder)


def load_or_train(folder: Path = DEFAULT_CACHE, settings: GoldSettings = GoldSettings(), progress: bool = True,
                  threads: int | None = None) -> GoldJudge:
    """The judge cached in `folder` if it was made with `settings`; otherwise train one and cache it."""
    if cached_settings(folder) == settings:
        return GoldJudge.load(folder, threads=threads)
    judge = train_gold_judge(settings, progress=progress, threads=threads)
    judge.save(folder)
    return judge


# ---------------------------------------------------------------- noise model


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Calibration:
    """Where the initial policy's answers fall on the gold scale, so that feedback is informative
    from the first answer: the centre of the thumbs and the boundaries between ratings."""

    centre: float  # median gold score of the calibration answers
    boundaries: tuple[float, ...]  # quantiles k/levels (k = 1..levels-1): rating k+1 above boundary k
    scale: float  # standard deviation of the calibration scores (for choosing temperatures)
    n: int

    @classmethod
    def from_scores(cls, scores: Sequence[float], levels: int = 5) -> "Calibration":
        if len(scores) < 2:
            raise ValueError(f"calibration needs at least two gold scores, got {len(scores)}")
        if levels < 2:
            raise ValueError(f"levels={levels}: a rating scale needs at least two levels")
        xs = sorted(scores)
        return cls(centre=statistics.median(xs), boundaries=tuple(_quantile(xs, k / levels) for k in range(1, levels)),
                   scale=statistics.stdev(xs), n=len(xs))

    @property
    def levels(self) -> int:
        return len(self.boundaries) + 1


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (pos - lo) * (sorted_xs[hi] - sorted_xs[lo])


@dataclass(frozen=True)
class NoiseModel:
    """How noisily the simulated users report the gold judge's view. All three are in gold
    score units; a gold score difference is a Bradley-Terry logit of the head fit on human
    choices, so a temperature of 1 makes a user about as noisy as that fit says the chitchat
    raters were. A temperature of 0 is a noiseless user (ties go to "down" and "b")."""

    # P(thumb up) = sigmoid((gold - calibration.centre) / thumb_temperature).
    thumb_temperature: float = 1.0
    # The rating is the rank of (gold + Normal(0, rating_noise)) among the calibration
    # boundaries: 1 below the first, `levels` above the last.
    rating_noise: float = 0.5
    # P(choose A) = sigmoid((gold_A - gold_B) / pairwise_temperature).
    pairwise_temperature: float = 1.0

    def __post_init__(self):
        for name in ("thumb_temperature", "rating_noise", "pairwise_temperature"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"NoiseModel.{name}={v!r}: must be a finite number >= 0")

    @classmethod
    def scaled(cls, cal: Calibration, temperature: float = 0.5, rating_noise: float = 0.5) -> "NoiseModel":
        """Noise relative to the spread of the calibration answers: thumb and pairwise
        temperatures of `temperature` calibration standard deviations, rating noise of
        `rating_noise` of them. With 0.5, an answer one standard deviation above the centre
        gets a thumb up with probability sigmoid(2) = 0.88, whatever the judge's scale."""
        return cls(thumb_temperature=temperature * cal.scale, rating_noise=rating_noise * cal.scale,
                   pairwise_temperature=temperature * cal.scale)


def p_thumb_up(gold: float, cal: Calibration, noise: NoiseModel) -> float:
    d = gold - cal.centre
    if noise.thumb_temperature == 0:
        return 1.0 if d > 0 else 0.0
    return sigmoid(d / noise.thumb_temperature)


def thumb(gold: float, cal: Calibration, noise: NoiseModel, rng: random.Random) -> Literal["up", "down"]:
    return "up" if rng.random() < p_thumb_up(gold, cal, noise) else "down"


def rating(gold: float, cal: Calibration, noise: NoiseModel, rng: random.Random) -> int:
    """A rating in 1..cal.levels."""
    x = gold + (rng.gauss(0.0, noise.rating_noise) if noise.rating_noise > 0 else 0.0)
    return 1 + sum(x > b for b in cal.boundaries)


def p_choose_a(gold_a: float, gold_b: float, noise: NoiseModel) -> float:
    d = gold_a - gold_b
    if noise.pairwise_temperature == 0:
        return 1.0 if d > 0 else 0.0
    return sigmoid(d / noise.pairwise_temperature)


def pairwise(gold_a: float, gold_b: float, noise: NoiseModel, rng: random.Random) -> Literal["a", "b"]:
    return "a" if rng.random() < p_choose_a(gold_a, gold_b, noise) else "b"


# ---------------------------------------------------------------- policy calls


@dataclass(frozen=True)
class Answer:
    prompt: str
    text: str
    generation_id: str
    policy_version: int
    gold: float = float("nan")


def _metadata(api_key: str | None) -> tuple | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)


def generate_request(prompt: str, n: int, max_tokens: int, temperature: float, seed: int | None, chat: bool = True,
                     logprobs: bool = False) -> policy_pb2.GenerateRequest:
    """A Generate request for n answers to `prompt`, as a user message when `chat`, else raw text."""
    sampling = policy_pb2.SamplingParams(temperature=temperature, max_tokens=max_tokens, n=n,
                                         seed=seed or 0, has_seed=seed is not None, logprobs=logprobs)
    if chat:
        return policy_pb2.GenerateRequest(messages=[policy_pb2.ChatMessage(role="user", content=prompt)],
                                          sampling=sampling)
    return policy_pb2.GenerateRequest(prompt=prompt, sampling=sampling)


def generate(stub: policy_pb2_grpc.PolicyServiceStub, prompt: str, n: int, max_tokens: int, temperature: float,
             seed: int | None, chat: bool = True, api_key: str | None = None, timeout_s: float = 120.0,
             retries: int = 3) -> tuple[list[Answer], int]:
    """n answers to `prompt` from the policy (as a user message when `chat`, else raw text)
    and the number of retries it took (UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED
    are retried with back-off; other errors, and the last retry's, are raised)."""
    req = generate_request(prompt, n, max_tokens, temperature, seed, chat)
    for attempt in range(retries + 1):
        try:
            r = stub.Generate(req, timeout=timeout_s, metadata=_metadata(api_key))
            break
        except grpc.RpcError as e:
            if e.code() not in RETRIED_CODES or attempt == retries:
                raise
            time.sleep(0.2 * 2 ** attempt)
    return [Answer(prompt, c.text, c.generation_id, r.policy_version) for c in r.completions], attempt


# ---------------------------------------------------------------- simulated users


@dataclass(frozen=True)
class Event:
    """One answer a user saw: seconds since the start, the feedback kind it got ("none" when
    the user gave none), its gold score and the policy version that wrote it."""

    t: float
    kind: str
    gold: float
    policy_version: int
    generation_id: str


@dataclass(frozen=True)
class Sent:
    """One feedback item the service accepted."""

    feedback_id: str
    kind: Kind
    generation_ids: tuple[str, ...]  # the judged answer; for a pairwise choice, A then B
    value: str  # "up"/"down", the rating, or "a"/"b"
    policy_version: int
    duplicate: bool


@dataclass(frozen=True)
class Failure:
    t: float
    stage: Literal["generate", "feedback", "judge"]
    kind: str
    error: str  # the gRPC code and details, or the HTTP status and body


@dataclass
class Report:
    interactions: int = 0
    answers: int = 0
    generate_retries: int = 0
    feedback_retries: int = 0
    accepted: Counter = field(default_factory=Counter)  # by kind
    failed: Counter = field(default_factory=Counter)  # by stage/kind
    events: list[Event] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"interactions": self.interactions, "answers": self.answers, "accepted": dict(self.accepted),
                "failed": dict(self.failed), "generate_retries": self.generate_retries,
                "feedback_retries": self.feedback_retries, "seconds": round(self.seconds, 2),
                "failures": [asdict(f) for f in self.failures[:20]]}

    def to_json(self) -> dict:
        return {**self.summary(), "failures": [asdict(f) for f in self.failures],
                "events": [asdict(e) for e in self.events], "sent": [asdict(s) for s in self.sent]}


class SimulatedUsers:
    """Users who ask the policy, judge its answers with the gold judge and noise, and send
    feedback on a share of them, over the public APIs only.

    Each interaction: pick a prompt; with probability `feedback_share` pick a feedback kind
    from `mix` (weights, normalised); ask `Generate` for one answer, or two to the same prompt
    for a pairwise choice; score the answers with the judge; post the item to the feedback
    service's REST API with the answers' generation ids. A 503 or a connection error is
    retried with the same feedback id (the API's contract); any other refusal is counted
    and logged with its status and body. Everything is kept in `report`.
    """

    def __init__(self, policy_addr: str, feedback_url: str, api_key: str | None, prompts: Sequence[str],
                 judge: GoldJudge, calibration: Calibration, mix: dict[str, float] | None = None,
                 feedback_share: float = 1.0, seed: int = 0, noise: NoiseModel = NoiseModel(),
                 max_tokens: int = 64, temperature: float = 1.0, chat: bool = True, policy_api_key: str | None = None,
                 user_id_prefix: str = "sim", retries: int = 3, timeout_s: float = 120.0,
                 on_event: Callable[[Event], None] | None = None):
        mix = dict(mix or {"thumbs": 0.5, "rating": 0.3, "pairwise": 0.2})
        unknown = set(mix) - set(KINDS)
        if unknown:
            raise ValueError(f"mix: unknown kinds {sorted(unknown)}; the kinds are {list(KINDS)}")
        if any(not (math.isfinite(v) and v >= 0) for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix={mix}: weights must be >= 0 and not all 0")
        if not 0 <= feedback_share <= 1:
            raise ValueError(f"feedback_share={feedback_share}: must be within [0, 1]")
        if not prompts:
            raise ValueError("prompts: at least one prompt is needed")
        self.policy_addr, self.feedback_url = policy_addr, feedback_url.rstrip("/")
        self.api_key, self.policy_api_key = api_key, policy_api_key
        self.prompts, self.judge, self.calibration, self.noise = list(prompts), judge, calibration, noise
        self.kinds = [k for k in KINDS if mix.get(k, 0) > 0]
        self.weights = [mix[k] for k in self.kinds]
        self.feedback_share, self.seed = feedback_share, seed
        self.max_tokens, self.temperature, self.chat = max_tokens, temperature, chat
        self.retries, self.timeout_s, self.on_event = retries, timeout_s, on_event
        self.run_id = f"{user_id_prefix}-{uuid.uuid4().hex[:8]}"
        self.report = Report()
        self._lock = threading.Lock()
        self._issued = 0
        self._t0 = 0.0

    # -- one interaction

    def _take(self, limit: int | None, deadline: float | None, stop: threading.Event) -> int | None:
        """The number of the next interaction, or None when the run is over."""
        with self._lock:
            if stop.is_set() or (limit is not None and self._issued >= limit) or \
                    (deadline is not None and time.monotonic() >= deadline):
                return None
            self._issued += 1
            return self._issued - 1

    def _fail(self, stage: str, kind: str, error: str) -> None:
        f = Failure(round(time.monotonic() - self._t0, 3), stage, kind, error[:2000])
        log.warning("simulated user: %s failed (%s): %s", stage, kind, f.error)
        with self._lock:
            self.report.failures.append(f)
            self.report.failed[f"{stage}/{kind}"] += 1

    def interact(self, number: int, stub, http: httpx.Client) -> None:
        rng = random.Random(f"{self.seed}:{number}")  # each interaction's choices are reproducible
        prompt = rng.choice(self.prompts)
        kind = rng.choices(self.kinds, self.weights)[0] if rng.random() < self.feedback_share else "none"
        n = 2 if kind == "pairwise" else 1
        try:
            answers, retries = generate(stub, prompt, n, self.max_tokens, self.temperature, rng.randrange(2 ** 31),
                                        self.chat, self.policy_api_key, self.timeout_s, self.retries)
        except grpc.RpcError as e:
            self._fail("generate", kind, f"{e.code().name}: {e.details()}")
            return
        try:
            golds = self.judge.score([(a.prompt, a.text) for a in answers])
        except Exception as e:  # noqa: BLE001 - a judge error is reported, not raised in a user thread
            self._fail("judge", kind, f"{type(e).__name__}: {e}")
            return
        t = round(time.monotonic() - self._t0, 3)
        events = [Event(t, kind, g, a.policy_version, a.generation_id) for a, g in zip(answers, golds)]
        with self._lock:
            self.report.interactions += 1
            self.report.answers += len(answers)
            self.report.generate_retries += retries
            self.report.events.extend(events)
        if self.on_event is not None:
            for e in events:
                self.on_event(e)
        if kind == "none":
            return
        a = answers[0]
        fid = f"{self.run_id}-{number}"
        item: dict = {"feedback_id": fid, "generation_id": a.generation_id,
                      "user_id": f"{self.run_id}-u{number % 1000}"}
        if kind == "thumbs":
            value = thumb(golds[0], self.calibration, self.noise, rng)
            item["thumb"] = value
            gens = (a.generation_id,)
        elif kind == "rating":
            r = rating(golds[0], self.calibration, self.noise, rng)
            item["rating"] = {"value": r, "scale_min": 1, "scale_max": self.calibration.levels}
            value, gens = str(r), (a.generation_id,)
        else:
            value = pairwise(golds[0], golds[1], self.noise, rng)
            item["pairwise"] = {"other_generation_id": answers[1].generation_id, "choice": value}
            gens = (a.generation_id, answers[1].generation_id)
        self._post(http, kind, item, gens, value, a.policy_version)

    def _post(self, http: httpx.Client, kind: Kind, item: dict, gens: tuple[str, ...], value: str,
              version: int) -> None:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.report.feedback_retries += 1
                time.sleep(0.2 * 2 ** (attempt - 1))
            try:
                r = http.post(f"{self.feedback_url}/v1/feedback", json={"items": [item]}, headers=headers,
                              timeout=self.timeout_s)
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 200:
                dup = bool(r.json()["results"][0]["duplicate"])
                with self._lock:
                    self.report.accepted[kind] += 1
                    self.report.sent.append(Sent(item["feedback_id"], kind, gens, value, version, dup))
                return
            error = f"HTTP {r.status_code}: {r.text}"
            if r.status_code != 503:
                break
        self._fail("feedback", kind, error)

    # -- the run

    def run(self, users: int = 4, interactions: int | None = None, seconds: float | None = None,
            stop: threading.Event | None = None, think_s: float = 0.0) -> Report:
        """Run `users` threads until `interactions` interactions are done, `seconds` have
        passed or `stop` is set (at least one limit is needed); returns the report (which
        keeps growing over repeated runs). Each user waits a random time (exponential, mean
        `think_s`) after each interaction, as people read before they ask again; 0 asks back
        to back, the most load the users can put on the policy."""
        if interactions is None and seconds is None and stop is None:
            raise ValueError("give interactions, seconds or stop: a run needs an end")
        if not (math.isfinite(think_s) and think_s >= 0):
            raise ValueError(f"think_s={think_s}: must be >= 0")
        stop = stop or threading.Event()
        self._t0 = self._t0 or time.monotonic()
        start = time.monotonic()
        limit = None if interactions is None else self._issued + interactions
        deadline = None if seconds is None else start + seconds
        channel = grpc.insecure_channel(self.policy_addr)
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        errors: list[BaseException] = []

        def user(i: int) -> None:
            pause = random.Random(f"{self.seed}:think:{i}")
            try:
                with httpx.Client() as http:
                    while (number := self._take(limit, deadline, stop)) is not None:
                        self.interact(number, stub, http)
                        if think_s and stop.wait(pause.expovariate(1 / think_s)):
                            break
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=user, args=(i,), name=f"sim-user-{i}", daemon=True) for i in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        channel.close()
        self.report.seconds += time.monotonic() - start
        if errors:
            raise errors[0]
        return self.report


# ---------------------------------------------------------------- gold evaluation


@dataclass(frozen=True)
class Evaluation:
    mean: float
    low: float  # 95% t-interval over prompts (each prompt's mean over its samples)
    high: float
    answers: list[Answer]
    policy_versions: tuple[int, ...]


def evaluate(policy_stub, prompts: Sequence[str], judge: GoldJudge, samples: int = 1, max_tokens: int = 64,
             temperature: float = 0.0, seed: int = 0, chat: bool = True, api_key: str | None = None) -> Evaluation:
    """Mean gold score of the policy's answers to `prompts` (held out from the users), with a
    95% interval over prompts, and every answer with the policy version that wrote it. With
    temperature 0 (greedy) one sample per prompt is enough."""
    answers: list[Answer] = []
    for i, p in enumerate(prompts):
        got, _ = generate(policy_stub, p, samples, max_tokens, temperature, seed + i, chat, api_key)
        answers.extend(got)
    golds = judge.score([(a.prompt, a.text) for a in answers])
    answers = [Answer(a.prompt, a.text, a.generation_id, a.policy_version, g) for a, g in zip(answers, golds)]
    per_prompt: dict[str, list[float]] = {}
    for a in answers:
        per_prompt.setdefault(a.prompt, []).append(a.gold)
    m, lo, hi = mean_interval([statistics.fmean(v) for v in per_prompt.values()])
    return Evaluation(m, lo, hi, answers, tuple(sorted({a.policy_version for a in answers})))


def calibrate(policy_stub, prompts: Sequence[str], judge: GoldJudge, samples: int = 2, max_tokens: int = 64,
              temperature: float = 1.0, seed: int = 0, chat: bool = True, api_key: str | None = None,
              levels: int = 5) -> Calibration:
    """The calibration of the noise model from the gold scores of the policy's answers now
    (call it before training, on the users' prompts, with the users' sampling settings)."""
    ev = evaluate(policy_stub, prompts, judge, samples, max_tokens, temperature, seed, chat, api_key)
    return Calibration.from_scores([a.gold for a in ev.answers], levels)


@dataclass(frozen=True)
class WinRate:
    rate: float  # share of prompts where A's gold score is higher (ties count half)
    low: float  # Wilson 95% interval
    high: float
    wins: int
    ties: int
    n: int


def win_rate(answers_a: Sequence[Answer | tuple[str, str]], answers_b: Sequence[Answer | tuple[str, str]],
             judge: GoldJudge) -> WinRate:
    """Gold win rate of answers A over answers B, paired by position (the same prompt each)."""
    def pairs(xs):
        return [(x.prompt, x.text) if isinstance(x, Answer) else (x[0], x[1]) for x in xs]

    pa, pb = pairs(answers_a), pairs(answers_b)
    if len(pa) != len(pb) or not pa:
        raise ValueError(f"win_rate needs two non-empty lists of the same length, got {len(pa)} and {len(pb)}")
    bad = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x[0] != y[0]), None)
    if bad is not None:
        raise ValueError(f"answers {bad} are to different prompts: {pa[bad][0]!r} and {pb[bad][0]!r}")
    scores = judge.score(pa + pb)
    ga, gb = scores[:len(pa)], scores[len(pa):]
    wins = sum(a > b for a, b in zip(ga, gb))
    ties = sum(a == b for a, b in zip(ga, gb))
    lo, hi = wilson(wins + 0.5 * ties, len(pa))
    return WinRate((wins + 0.5 * ties) / len(pa), lo, hi, wins, ties, len(pa))


def main(argv: list[str] | None = None) -> None:
    """Train (or load) the gold judge and print its metadata: `python -m rlhf_devstack.simusers`."""
    import argparse

    ap = argparse.ArgumentParser(description="Train the gold judge of the simulated users, or load it from its cache")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--conversations", type=int, default=0, help="a seeded sample of this many (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    judge = load_or_train(a.cache, GoldSettings(conversations=a.conversations, seed=a.seed), threads=a.threads or None)
    print(json.dumps(judge.meta, indent=1))
    print(f"ready in {time.perf_counter() - t0:.1f}s ({a.cache})")


if __name__ == "__main__":
    main()
