"""Reward scoring, independent of gRPC and HTTP.

`RewardModel` wraps one loaded checkpoint (blocking calls). `RewardCore` is what the
servicers talk to: it validates input, batches concurrent requests dynamically into one
forward pass on a worker thread, holds the live model behind a reference that a hot swap
replaces atomically, scores an optional shadow model beside it, and keeps running
statistics of the live scores.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_common.algos.bradley_terry import preference_probability
from rlhf_common.errors import InvalidInput, NotReady, Overloaded
from rlhf_common.text import encode_pairs, ensure_pad_token
from rlhf_common.running_stats import RunningStats, StatsSnapshot
from rlhf_common.weights import MANIFEST

from .metrics import RewardMetrics
from .packed import PackedBert, length_buckets, supports as packed_supports

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreItem:
    prompt: str
    response: str


@dataclass(frozen=True)
class ScoreResult:
    # The model's raw logit for the (prompt, response) pair.
    score: float
    # True when the pair was longer than the token limit and was truncated.
    truncated: bool


@dataclass(frozen=True)
class ScoreOutput:
    """Results in request order, all from the one model version named here."""

    results: list[ScoreResult]
    model_version: str


@dataclass(frozen=True)
class Comparison:
    score_a: float
    score_b: float
    truncated_a: bool
    truncated_b: bool
    # Bradley-Terry: P(a preferred over b) = sigmoid(score_a - score_b).
    prob_a_preferred: float
    model_version: str


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    model_version: str
    version_number: int
    sha256: str
    max_length: int
    max_batch_items: int
    max_batch_size: int
    reward: StatsSnapshot
    shadow_model_version: str


MIN_SHARED_PREFIX = 16  # tokens; shorter shared prefixes are not worth a second pass


def _shares_prefixes(model) -> bool:
    """Whether rows with a shared prefix can be scored through a key-value cache: a decoder
    whose head is a linear layer on the last token's hidden state (Llama, Qwen, Mistral,
    SmolLM... sequence classifiers), not an encoder such as BERT."""
    import inspect

    head = getattr(model, "score", None)
    base = getattr(model, "base_model", None)
    return (isinstance(head, torch.nn.Linear) and base is not None and base is not model
            and "past_key_values" in inspect.signature(base.forward).parameters
            and not getattr(model.config, "is_encoder_decoder", False))


def _last_real(ids: list[int], pad: int | None) -> int:
    """Index of the last token that is not `pad` (what the classifier's pooling reads), or -1."""
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] != pad:
            return j
    return -1


def prefix_groups(rows: list[list[int]], pad: int | None) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Rows that share a prefix of at least MIN_SHARED_PREFIX tokens (the samples of one
    prompt): [(prefix length, row indices)], and the indices of the other rows."""
    by_start: dict[tuple[int, ...], list[int]] = {}
    rest = []
    for i, r in enumerate(rows):
        (by_start.setdefault(tuple(r[:MIN_SHARED_PREFIX]), []) if len(r) > MIN_SHARED_PREFIX else rest).append(i)
    groups = []
    for members in by_start.values():
        if len(members) < 2:
            rest.extend(members)
            continue
        n = min(len(rows[i]) for i in members) - 1  # every row keeps at least one token of its own
        first = rows[members[0]]
        for i in members[1:]:
            r = rows[i]
            n = next((j for j in range(n) if r[j] != first[j]), n)
        ok = [i for i in members if _last_real(rows[i], pad) >= n]
        rest.extend(i for i in members if i not in ok)
        if n >= MIN_SHARED_PREFIX and len(ok) >= 2:
            groups.append((n, ok))
        else:
            rest.extend(ok)
    return groups, sorted(rest)


class RewardModel:
    """A transformers sequence-classification model with one output logit (blocking calls).

    `version` names the checkpoint in responses (its folder name unless given);
    `version_number` orders checkpoints announced on rlhf.weights (-1: not from the store).
    """

    def __init__(self, model_dir: str | Path, max_length: int, version: str | None = None,
                 version_number: int | None = None, sha256: str = "", packed: bool = True):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        ensure_pad_token(self.tokenizer)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {self.model_dir!r} has num_labels={self.model.config.num_labels}, "
                             "expected 1")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Never past the model's own position limit, whatever the configured limit says.
        model_limit = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, model_limit)
        manifest = Path(self.model_dir) / MANIFEST
        meta = json.loads(manifest.read_text()) if manifest.exists() else {}
        self.version = version or Path(self.model_dir).name
        self.version_number = version_number if version_number is not None else int(meta.get("version", -1))
        self.sha256 = sha256 or meta.get("sha256", "")
        # Most padding accepted in one forward pass, as a fraction of its real tokens.
        self.max_padding = 0.25
        self.shares_prefixes = _shares_prefixes(self.model)
        # BERT-family encoders run on packed tokens: no padding in the dense layers, one
        # pass per batch (see packed.py); other models take padded passes of similar length.
        self.packed = PackedBert(self.model) if packed and packed_supports(self.model) else None
        # The fast tokenizer is not safe to call from two threads at once; the model is
        # (inference only), so several batches may run their forward passes together.
        self._tok_lock = threading.Lock()

    def encode(self, items: list[ScoreItem]) -> "Encoded":
        """Tokenize (blocking; on the tokenizer thread): truncated token ids per item.

        One fast-tokenizer call over all items; only the pairs longer than the limit are
        encoded again, with truncation (`encode_pairs`). A pair within the limit encodes the
        same with or without truncation, so every row equals `encode_pairs`'s."""
        prompts, responses = [it.prompt for it in items], [it.response for it in items]
        with self._tok_lock:
            return self._encode(prompts, responses)

    def _encode(self, prompts: list[str], responses: list[str]) -> "Encoded":
        enc = self.tokenizer(prompts, responses)
        keys = list(enc.keys())
        rows = [dict(zip(keys, r)) for r in zip(*(enc[k] for k in keys))]
        truncated = [len(r["input_ids"]) > self.max_length for r in rows]
        long = [i for i, t in enumerate(truncated) if t]
        if long:
            cut, _ = encode_pairs(self.tokenizer, [prompts[i] for i in long], [responses[i] for i in long],
                                  self.max_length)
            for j, i in enumerate(long):
                rows[i] = {k: cut[k][j] for k in cut.keys()}
        return Encoded(self, rows, truncated)

    def forward(self, rows: list[dict], truncated: list[bool]) -> list[ScoreResult]:
        """Score encoded items (blocking: call it from the model thread, never the event loop)."""
        scores = [0.0] * len(rows)
        with torch.inference_mode():
            rest = list(range(len(rows)))
            if self.shares_prefixes:
                groups, rest = prefix_groups([rows[i]["input_ids"] for i in rest], self.tokenizer.pad_token_id)
                for n, group in groups:
                    for i, s in zip(group, self._score_with_prefix([rows[i]["input_ids"] for i in group], n)):
                        scores[i] = s
            if self.packed is not None and rest:
                types = ([rows[i]["token_type_ids"] for i in rest] if "token_type_ids" in rows[rest[0]]
                         else None)
                for i, s in zip(rest, self.packed([rows[i]["input_ids"] for i in rest], types)):
                    scores[i] = s
                rest = []
            lengths = [len(rows[i]["input_ids"]) for i in rest]
            # On CPU the forward pass costs what its padded tokens cost: pairs of similar
            # length are run together so that padding stays small.
            for bucket in length_buckets(lengths, self.max_padding):
                group = [rest[j] for j in bucket]
                with self._tok_lock:
                    batch = self.tokenizer.pad([rows[i] for i in group], return_tensors="pt")
                for i, s in zip(group, self.model(**batch).logits[:, 0].tolist()):
                    scores[i] = s
        return [ScoreResult(float(s), t) for s, t in zip(scores, truncated)]

    def _score_with_prefix(self, ids: list[list[int]], n: int) -> list[float]:
        """Scores of rows that share their first `n` tokens: the prefix goes through the
        model once, and its keys and values serve every row's remaining tokens. The same
        scores as whole rows (the head reads the last token that is not padding, as the
        model's own pooling does; `prefix_groups` keeps only rows where that token lies
        after the prefix)."""
        base = self.model.base_model
        cache = base(input_ids=torch.tensor([ids[0][:n]]), use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(ids))
        pad = self.tokenizer.pad_token_id
        width = max(len(r) for r in ids) - n
        suffix = torch.full((len(ids), width), pad, dtype=torch.long)
        attn = torch.zeros((len(ids), n + width), dtype=torch.long)
        attn[:, :n] = 1
        for i, r in enumerate(ids):
            suffix[i, :len(r) - n] = torch.tensor(r[n:], dtype=torch.long)
            attn[i, n:len(r)] = 1
        pos = torch.arange(n, n + width).expand(len(ids), -1)
        hidden = base(input_ids=suffix, attention_mask=attn, position_ids=pos, past_key_values=cache,
                      use_cache=True).last_hidden_state
        last = torch.tensor([_last_real(r, pad) - n for r in ids])
        return self.model.score(hidden[torch.arange(len(ids)), last])[:, 0].tolist()

    def score(self, items: list[ScoreItem]) -> list[ScoreResult]:
        """Tokenize and score in one blocking call."""
        e = self.encode(items)
        return self.forward(e.rows, e.truncated)


@dataclass
class Encoded:
    """Items tokenized by one model's tokenizer."""

    model: RewardModel
    rows: list[dict]
    truncated: list[bool]

    @property
    def tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def _encode_many(model: RewardModel, requests: list[list[ScoreItem]]) -> list[Encoded]:
    """Several requests' items tokenized in one call, split back per request."""
    e = model.encode([it for items in requests for it in items])
    out, i = [], 0
    for items in requests:
        out.append(Encoded(model, e.rows[i:i + len(items)], e.truncated[i:i + len(items)]))
        i += len(items)
    return out


def validate(items: list[ScoreItem], max_batch_items: int, max_item_chars: int | None = None) -> None:
    """Raise InvalidInput naming the first problem; the same rules for gRPC and REST. Checked
    before any tokenizing, so the work a request can cause is bounded up front."""
    if not items:
        raise InvalidInput("items: at least one (prompt, response) item is required")
    if len(items) > max_batch_items:
        raise InvalidInput(f"items: {len(items)} items exceed the limit of {max_batch_items}")
    for i, it in enumerate(items):
        if max_item_chars is not None and isinstance(it.prompt, str) and isinstance(it.response, str):
            chars = len(it.prompt) + len(it.response)
            if chars > max_item_chars:
                raise InvalidInput(f"items[{i}]: {chars} characters of prompt and response exceed the limit of "
                                   f"{max_item_chars}")
        for name in ("prompt", "response"):
            text = getattr(it, name)
            if not isinstance(text, str):
                raise InvalidInput(f"items[{i}].{name}: must be a string, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidInput(f"items[{i}].{name}: not valid UTF-8 ({e.reason} at character {e.start})") \
                    from None
        # An empty response is a legitimate answer to score (often a bad one);
        # an item with no text at all is not.
        if not it.prompt.strip() and not it.response.strip():
            raise InvalidInput(f"items[{i}]: prompt and response are both empty")


@dataclass
class _Job:
    """A request waiting for the tokenizer."""

    items: list[ScoreItem]
    future: asyncio.Future


def _fail(failed: list[tuple[asyncio.Future, Exception]]) -> None:
    """Event loop: fail the callers whose request could not be queued."""
    for f, e in failed:
        if not f.done():
            f.set_exception(e)


@dataclass
class _Pending:
    items: list[ScoreItem]
    encoded: Encoded
    future: asyncio.Future
    enqueued: float


class RewardCore:
    """Dynamic batching over a hot-swappable live model, with an optional shadow model.

    A request is checked (items, characters) on the event loop before any work, then handed
    to a tokenizer thread of its own (so a long text never holds a model thread; requests
    that arrive while it is busy are tokenized together in one call), refused there when its
    tokens exceed `max_request_tokens`, and queued by that thread for the `model_workers`
    model threads. A model thread that is free takes every request that arrives within
    `max_wait_s` of the oldest one, up to `max_batch_size` items (a request is never split
    across batches), scores them and hands the results to the event loop in one callback.
    So the loop touches a request twice (in and out) and the threads hand work to each
    other directly: a model thread that finishes a batch starts on the next one at once,
    without waiting for a turn of the loop, which is busy with transport. Each batch reads
    the live model once, so every response comes from one version. A request whose caller
    has gone away is dropped before it is tokenized or before its forward pass.
    """

    def __init__(self, model: RewardModel, metrics: RewardMetrics | None = None, *, max_batch_items: int = 256,
                 max_batch_size: int = 32, max_wait_s: float = 0.005, max_queue_items: int = 4096,
                 shadow: RewardModel | None = None, max_shadow_backlog: int = 4, max_item_chars: int = 16384,
                 max_request_tokens: int = 65536, model_workers: int = 1, torch_threads: int | None = None):
        self._live = model
        self.shadow = shadow
        self.metrics = metrics
        self.max_batch_items = max_batch_items
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self.max_item_chars = max_item_chars
        self.max_request_tokens = max_request_tokens
        self.stats = RunningStats()
        # Requests waiting for the tokenizer thread (`_tok_cond`), tokenized requests waiting
        # for a model thread (`_cond`), and the counts the queue limit and the batch size
        # read: all guarded by one lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._tok_cond = threading.Condition(self._lock)
        self._to_encode: deque[_Job] = deque()
        self._queue: deque[_Pending] = deque()
        self._queued_items = 0  # admitted and not yet in a batch (tokenizing included)
        self._ready_items = 0  # in `_queue`
        self._busy = 0  # batches taken by a model thread and not yet answered
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Model threads: each scores its own batch with `torch_threads` intra-op threads (if
        # given). On a CPU, two threads of one torch thread each keep both cores busy without
        # the barrier waits of one two-thread forward pass, which stall whenever another
        # thread (gRPC, the tokenizer, a client) takes one of the cores.
        self.model_workers = model_workers
        self._torch_threads = torch_threads
        self._threads: list[threading.Thread] = []
        self._shadow_executor = ThreadPoolExecutor(1, thread_name_prefix="reward-shadow")
        self._shadow_backlog = 0
        self._shadow_lock = threading.Lock()
        self._max_shadow_backlog = max_shadow_backlog
        self._swap_lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._threads = [threading.Thread(target=self._model_thread, name=f"reward-model_{k}", daemon=True)
                         for k in range(self.model_workers)]
        self._threads.append(threading.Thread(target=self._tokenizer_thread, name="reward-tokenizer", daemon=True))
        for t in self._threads:
            t.start()

    async def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._cond.notify_all()
            self._tok_cond.notify_all()
        if self._threads:
            # Batches already on a model thread finish; their answers are queued on this loop
            # before the threads end, so they reach their callers before stop() returns.
            threads, self._threads = self._threads, []
            await asyncio.to_thread(lambda: [t.join() for t in threads])
            await asyncio.sleep(0)
        with self._lock:
            left = [j.future for j in self._to_encode] + [p.future for p in self._queue]
            self._to_encode, self._queue = deque(), deque()
            self._queued_items = self._ready_items = 0
        for f in left:
            if not f.done():
                f.set_exception(NotReady("reward service is stopping"))
        self._shadow_executor.shutdown(wait=False, cancel_futures=True)

    # -- the API the servicers use ----------------------------------------------------

    @property
    def live(self) -> RewardModel:
        return self._live

    def validate(self, items: list[ScoreItem]) -> None:
        validate(items, self.max_batch_items, self.max_item_chars)

    async def score(self, items: list[ScoreItem]) -> ScoreOutput:
        self.validate(items)
        if not self._threads or self._stopping:
            raise NotReady("reward scorer is not running")
        fut = self._loop.create_future()
        with self._lock:
            if self._queued_items + len(items) > self.max_queue_items:
                raise Overloaded(f"{self._queued_items} items already queued (limit {self.max_queue_items}); "
                                 "retry later")
            # Admitted items count against the queue from here (tokenizing included) until a
            # thread takes them or drops them (a caller that went away, a failure).
            self._queued_items += len(items)
            self._to_encode.append(_Job(list(items), fut))
            self._tok_cond.notify()
        self._set_queued_gauge()
        return await fut

    async def compare(self, prompt: str, response_a: str, response_b: str) -> Comparison:
        # Both responses go in one request, hence one batch and one model version.
        out = await self.score([ScoreItem(prompt, response_a), ScoreItem(prompt, response_b)])
        a, b = out.results
        p = float(preference_probability(torch.tensor(a.score, dtype=torch.float64),
                                         torch.tensor(b.score, dtype=torch.float64)))
        return Comparison(a.score, b.score, a.truncated, b.truncated, p, out.model_version)

    def info(self) -> ModelInfo:
        m = self._live
        return ModelInfo(
            model_name=m.model_dir, model_version=m.version, version_number=m.version_number, sha256=m.sha256,
            max_length=m.max_length, max_batch_items=self.max_batch_items, max_batch_size=self.max_batch_size,
            reward=self.stats.snapshot(), shadow_model_version=self.shadow.version if self.shadow else "",
        )

    def swap(self, model: RewardModel) -> RewardModel:
        """Make `model` the live one (any thread). Batches already running finish on the old
        model; every later batch uses the new one. Returns the old model."""
        with self._swap_lock:
            old, self._live = self._live, model
            self.stats.reset()
        self._export_stats()
        log.info("reward model swapped: %s -> %s", old.version, model.version)
        return old

    # -- tokenizing -------------------------------------------------------------------

    def _tokenizer_thread(self) -> None:
        """Tokenize queued requests and queue them for the model threads. Requests that
        arrive while it is busy are tokenized together in its next call: one fast-tokenizer
        call for many requests costs far less than a call per request."""
        while True:
            with self._lock:
                while not self._to_encode and not self._stopping:
                    self._tok_cond.wait()
                if self._stopping:
                    return
                jobs: list[_Job] = []
                n = 0
                while self._to_encode and (not jobs or n + len(self._to_encode[0].items) <= self.max_batch_items):
                    job = self._to_encode.popleft()
                    if job.future.done():  # the caller went away
                        self._queued_items -= len(job.items)
                        continue
                    jobs.append(job)
                    n += len(job.items)
            if jobs:
                c0 = time.thread_time()
                parts = self._encode_jobs(self._live, jobs)
                if self.metrics is not None:
                    self.metrics.tokenizer_cpu.inc(time.thread_time() - c0)
                self._queue_encoded(jobs, parts)

    def _encode_jobs(self, model: RewardModel, jobs: list[_Job]) -> list[Encoded | Exception]:
        try:
            return _encode_many(model, [j.items for j in jobs])
        except Exception:
            # One request's text must not fail the others: tokenize them one by one.
            parts: list[Encoded | Exception] = []
            for j in jobs:
                try:
                    parts.append(model.encode(j.items))
                except Exception as e:
                    parts.append(e)
            return parts

    def _queue_encoded(self, jobs: list[_Job], parts: list[Encoded | Exception]) -> None:
        """Tokenizer thread: queue each tokenized request for the model threads, or fail it."""
        now = time.perf_counter()
        failed: list[tuple[asyncio.Future, Exception]] = []
        with self._lock:
            for job, part in zip(jobs, parts):
                if not isinstance(part, Exception) and part.tokens > self.max_request_tokens:
                    part = InvalidInput(f"items: {part.tokens} tokens (after truncation to {part.model.max_length} "
                                        f"per item) exceed the limit of {self.max_request_tokens} per request")
                if isinstance(part, Exception):
                    self._queued_items -= len(job.items)
                    failed.append((job.future, part))
                    continue
                self._queue.append(_Pending(job.items, part, job.future, now))
                self._ready_items += len(job.items)
            self._cond.notify()
        if failed:
            self._set_queued_gauge()
            self._loop.call_soon_threadsafe(_fail, failed)

    # -- batching ---------------------------------------------------------------------

    def _set_queued_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queued_items.set(self._queued_items)

    def _model_thread(self) -> None:
        """One model thread: take a batch, score it, hand the results to the event loop, and
        go on with the next batch at once; end when the core stops."""
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
        while (batch := self._take_batch()) is not None:
            model = self._live
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                results, error = self._score_batch(model, batch), None
            except Exception as e:  # reported to every caller of the batch, then go on
                log.exception("scoring a batch of %d items failed", sum(len(p.items) for p in batch))
                results, error = None, e
            if self.metrics is not None:
                self.metrics.model_cpu.inc(time.thread_time() - c0)
            self._loop.call_soon_threadsafe(self._answer, model, batch, results, error, t0,
                                            time.perf_counter() - t0)

    def _take_batch(self) -> list[_Pending] | None:
        """Model thread: wait for requests, then let others join until the batch is full or
        the oldest request has waited `max_wait_s`; None once the core stops."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                left = self._queue[0].enqueued + self.max_wait_s - time.perf_counter()
                if self._ready_items < self.max_batch_size and left > 0:
                    self._cond.wait(left)
                    continue
                batch: list[_Pending] = []
                n = 0
                while self._queue and (not batch or n + len(self._queue[0].items) <= self.max_batch_size):
                    p = self._queue.popleft()
                    self._queued_items -= len(p.items)
                    self._ready_items -= len(p.items)
                    if p.future.done():  # the caller went away
                        continue
                    batch.append(p)
                    n += len(p.items)
                self._set_queued_gauge()
                if self._queue:
                    self._cond.notify()  # the rest is for another free thread
                if batch:
                    self._busy += 1
                    return batch

    def _answer(self, model: RewardModel, batch: list[_Pending], results: list[ScoreResult] | None,
                error: Exception | None, t0: float, seconds: float) -> None:
        """Event loop: answer the callers of one scored batch."""
        with self._lock:
            self._busy -= 1
        if error is not None:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        served: list[tuple[_Pending, list[ScoreResult]]] = []
        i = 0
        for p in batch:
            part = results[i:i + len(p.items)]
            i += len(p.items)
            if not p.future.done():  # a caller that left may have had its forward pass skipped
                p.future.set_result(ScoreOutput(part, model.version))
                served.append((p, part))
        if not served:
            return
        done = [r for _, part in served for r in part]
        self._observe(model, [p for p, _ in served], done, t0, seconds)
        if self.shadow is not None:
            self._submit_shadow([it for p, _ in served for it in p.items], [r.score for r in done])

    def _score_batch(self, model: RewardModel, batch: list[_Pending]) -> list[ScoreResult]:
        """Model thread: each request's encoding (re-done if a swap changed the model since),
        in forward passes of at most `max_batch_size`, skipping requests whose caller left."""
        rows, truncated, owners = [], [], []
        for p in batch:
            e = p.encoded if p.encoded.model is model else model.encode(p.items)
            rows += e.rows
            truncated += e.truncated
            owners += [p] * len(e.rows)
        out: list[ScoreResult] = []
        for i in range(0, len(rows), self.max_batch_size):
            part = slice(i, i + self.max_batch_size)
            if all(p.future.done() for p in owners[part]):  # nobody waits for these
                out += [ScoreResult(float("nan"), t) for t in truncated[part]]
                continue
            out += model.forward(rows[part], truncated[part])
        return out

    def _score_chunks(self, model: RewardModel, items: list[ScoreItem]) -> list[ScoreResult]:
        # A single request may hold more items than a forward pass takes.
        out: list[ScoreResult] = []
        for i in range(0, len(items), self.max_batch_size):
            out.extend(model.score(items[i:i + self.max_batch_size]))
        return out

    def _observe(self, model: RewardModel, batch: list[_Pending], results: list[ScoreResult], t0: float,
                 seconds: float) -> None:
        if model is self._live:
            self.stats.update(r.score for r in results)
            self._export_stats()
        m = self.metrics
        if m is None:
            return
        m.batch_size.observe(len(results))
        m.batch_seconds.observe(seconds)
        for p in batch:
            m.queue_wait.observe(t0 - p.enqueued)
        m.items.inc(len(results))
        m.truncated.inc(sum(r.truncated for r in results))

    def _export_stats(self) -> None:
        if self.metrics is None:
            return
        s = self.stats.snapshot()
        self.metrics.score_mean.set(s.mean)
        self.metrics.score_std.set(s.std)
        self.metrics.score_count.set(s.count)

    # -- shadow model -----------------------------------------------------------------

    def _submit_shadow(self, items: list[ScoreItem], live_scores: list[float]) -> None:
        """Score the shadow model off the response path; drop work rather than fall behind."""
        with self._shadow_lock:
            full = self._shadow_backlog >= self._max_shadow_backlog
            if not full:
                self._shadow_backlog += 1
        if full:
            if self.metrics is not None:
                self.metrics.shadow_items.labels("skipped").inc(len(items))
            return
        shadow = self.shadow
        fut = self._shadow_executor.submit(self._score_chunks, shadow, items)

        def done(f) -> None:
            with self._shadow_lock:
                self._shadow_backlog -= 1
            try:
                shadow_scores = [r.score for r in f.result()]
            except Exception:
                log.exception("shadow model %s failed on %d items", shadow.version, len(items))
                if self.metrics is not None:
                    self.metrics.shadow_items.labels("failed").inc(len(items))
                return
            diffs = [a - b for a, b in zip(live_scores, shadow_scores)]
            if self.metrics is not None:
                self.metrics.shadow_items.labels("scored").inc(len(items))
                for d in diffs:
                    self.metrics.shadow_diff.observe(d)
            log.info("shadow %s: %d items, mean live-shadow %+.4f; first item live %.4f shadow %.4f",
                     shadow.version, len(diffs), sum(diffs) / len(diffs), live_scores[0], shadow_scores[0])

        fut.add_done_callback(done)
