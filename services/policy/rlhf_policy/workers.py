"""Kafka-facing loops of the policy service, each in its own thread.

- WeightApplier applies this model's updates from rlhf.weights (through the library's
  WeightsFollower) and tracks the trainer's announced progress.
- RolloutWorker reads rlhf.prompts and writes n rollouts per prompt to rlhf.rollouts,
  pacing itself against the trainer's progress (back-pressure, never dropping prompts).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid

from rlhf.events.v1 import events_pb2

from rlhf_common import failpoints
from rlhf_common.bus import AckedSender, Consumer, Producer, now_ms
from rlhf_common.config import BusConfig, partition_list
from rlhf_common.errors import InvalidInput
from rlhf_common.loops import BackgroundLoop
from rlhf_common.topics import Topics
from rlhf_common.weights_follower import WeightsFollower

from .config import PolicyConfig
from .core import PolicyEngine, Sampling
from .metrics import PolicyMetrics

log = logging.getLogger(__name__)


class WeightApplier:
    """Applies this model's updates from rlhf.weights (the follower's callback, on its
    thread) and tracks the trainer's progress announced with them."""

    def __init__(self, cfg: PolicyConfig, bus: BusConfig, engine: PolicyEngine, metrics: PolicyMetrics,
                 loop: asyncio.AbstractEventLoop):
        self.cfg, self.engine, self.metrics, self.loop = cfg, engine, metrics, loop
        self.groups_consumed = 0  # as last announced by the trainer
        self.progress = threading.Condition()
        self.follower = WeightsFollower(bus, [cfg.model_name], self.apply, client_id="policy-weights",
                                        fetch_max_wait_ms=cfg.weights_fetch_wait_ms)

    def apply(self, u: events_pb2.WeightUpdate) -> None:
        t_recv = time.perf_counter()
        served = self.engine.served.version
        if u.version > served or (u.rollback and u.version != served):
            lora = u.format == events_pb2.WeightUpdate.FORMAT_LORA
            if u.rollback:
                log.warning("rolling back from version %d to %d", served, u.version)
            fut = asyncio.run_coroutine_threadsafe(
                self.engine.apply_update(u.version, u.uri, u.sha256, lora=lora, rollback=u.rollback), self.loop)
            try:
                fut.result(timeout=self.cfg.update_timeout_s)
            except concurrent.futures.TimeoutError:
                # A stuck update (or event loop) must not hang this thread for good: end the
                # follower, and with it the service, so that its supervisor restarts it.
                fut.cancel()
                raise RuntimeError(f"weight update v{u.version} did not finish within "
                                   f"{self.cfg.update_timeout_s:.0f}s ({self.cfg.env_of('update_timeout_s')})")
            except Exception:
                log.exception("failed to apply weight update v%d from %s", u.version, u.uri)
                self.metrics.weight_updates.labels("failed").inc()
                return
            self.metrics.weight_sync.observe(time.perf_counter() - t_recv)
            # From the trainer's announcement (its wall clock) to serving, Kafka delivery included;
            # not for updates read while catching up on the topic at start.
            if u.created_unix_ms > 0 and self.follower.caught_up.is_set():
                self.metrics.weight_event_to_serving.observe(max(0.0, (now_ms() - u.created_unix_ms) / 1000))
            self.metrics.weight_updates.labels("rolled_back" if u.rollback else "applied").inc()
            self.metrics.version.set(u.version)
            log.info("serving version %d (%s)", u.version, u.sha256[:12])
        with self.progress:
            self.groups_consumed = max(self.groups_consumed, u.groups_consumed)
            self.progress.notify_all()


class RolloutWorker(BackgroundLoop):
    def __init__(self, cfg: PolicyConfig, bus: BusConfig, engine: PolicyEngine, metrics: PolicyMetrics,
                 loop: asyncio.AbstractEventLoop, weights: WeightApplier):
        super().__init__("rollout-worker")
        self.cfg, self.bus, self.engine, self.metrics, self.loop = cfg, bus, engine, metrics, loop
        self.weights = weights
        # Groups this worker produced, counted on the trainer's scale: it starts at the
        # trainer's progress when the worker starts (earlier groups are taken as consumed),
        # so either side can restart without stalling the other.
        self.groups_emitted = 0

    def _ahead(self) -> int:
        return self.groups_emitted - self.weights.groups_consumed

    def _wait_for_trainer(self) -> bool:
        """Block while too far ahead of the trainer; False when stopping."""
        with self.weights.progress:
            while self._ahead() >= self.cfg.max_groups_ahead:
                self.metrics.groups_ahead.set(self._ahead())
                if self.stopping.is_set():
                    return False
                self.weights.progress.wait(timeout=0.2)
        return not self.stopping.is_set()

    def loop_body(self) -> None:
        while not self.weights.follower.caught_up.wait(timeout=0.2):
            if self.stopping.is_set():
                return
        with self.weights.progress:
            self.groups_emitted = self.weights.groups_consumed
        topics = Topics(self.bus.topic_prefix)
        c = Consumer(self.bus, topics.prompts, events_pb2.Prompt, group_id="rlhf-policy-rollout",
                     client_id="policy-rollout", id_of=lambda p: p.prompt_id,
                     partitions=partition_list(self.cfg.rollout_partitions) or None)
        out = AckedSender(self.bus, client_id="policy-rollout")
        try:
            while not self.stopping.is_set():
                if not self._wait_for_trainer():
                    return
                # Take as many prompts as the pacing budget allows and generate them
                # concurrently, so vLLM batches across prompts; write groups in prompt order.
                budget = self.cfg.max_groups_ahead - self._ahead()
                recs = list(c.poll(timeout_ms=200, max_records=max(1, budget)))
                if not recs:
                    continue
                t0, kafka_s = time.perf_counter(), 0.0
                futures = [self._submit(r.record) for r in recs]
                for rec, fut in zip(recs, futures):
                    try:
                        gen = fut.result()
                    except InvalidInput as e:  # a bad prompt never stops the worker
                        c.reject(rec, e)
                        continue
                    t = time.perf_counter()
                    self._write(rec.record, gen, out)
                    kafka_s += time.perf_counter() - t
                failpoints.reached("policy.rollouts_written")
                t = time.perf_counter()
                self._commit(c, recs)
                kafka_s += time.perf_counter() - t
                self.metrics.rollout_seconds.labels("generate").observe(time.perf_counter() - t0 - kafka_s)
                self.metrics.rollout_seconds.labels("kafka").observe(kafka_s)
        finally:
            c.close()
            out.close()

    def _submit(self, p: events_pb2.Prompt):
        n = p.n or self.cfg.rollout_n
        s = Sampling(temperature=self.cfg.rollout_temperature, max_tokens=self.cfg.max_tokens, n=n, logprobs=True)
        return asyncio.run_coroutine_threadsafe(self.engine.generate(p.text, s, bounded=False), self.loop)

    def _write(self, p: events_pb2.Prompt, gen, out: AckedSender) -> None:
        topic = Topics(self.bus.topic_prefix).rollouts
        sent = []
        for i, c in enumerate(gen.completions):
            r = events_pb2.Rollout(
                rollout_id=uuid.uuid4().hex,
                prompt_id=p.prompt_id,
                generation_id=c.generation_id,
                policy_version=gen.policy_version,
                prompt_text=p.text,
                response_text=c.text,
                prompt_token_ids=gen.prompt_token_ids,
                response_token_ids=c.token_ids,
                behaviour_logprobs=c.logprobs,
                group_index=i,
                group_size=len(gen.completions),
                finish_reason=c.finish_reason,
                created_unix_ms=now_ms(),
            )
            sent.append((p.prompt_id, r))
        self._send_acknowledged(out, topic, sent)
        self.groups_emitted += 1
        self.metrics.groups_ahead.set(self._ahead())
        self.metrics.rollouts.inc(len(gen.completions))
        self.metrics.generated_tokens.labels("rollout").inc(sum(len(c.token_ids) for c in gen.completions))


    def _send_acknowledged(self, out: AckedSender, topic: str, items: list) -> None:
        """Send until the broker has acknowledged every record, riding out an outage (the
        same records again: their ids let the trainer skip any it already has). A stop while
        the broker is away leaves the prompt uncommitted, to be sampled again."""
        delay = 0.5
        while items := out.send_batch(topic, items):
            if self.stopping.is_set():
                raise RuntimeError(f"stopping with {len(items)} rollouts not acknowledged")
            log.warning("%d rollouts not acknowledged; sending again in %.1fs", len(items), delay)
            self.stopping.wait(delay)
            delay = min(delay * 2, 10.0)

    def _commit(self, c: Consumer, recs) -> None:
        """Commit the prompts' offsets, retrying while the broker is away."""
        delay = 0.5
        while True:
            try:
                c.commit(recs)
                return
            except Exception as e:  # KafkaError subclasses, timeouts
                if self.stopping.is_set():
                    raise
                log.warning("committing prompt offsets failed (%s); retrying in %.1fs", e, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)


class GenerationRecorder:
    """Writes answers served to production to rlhf.generations (for joining feedback later).

    `record` returns a future that completes once the broker has acknowledged the answer's
    records, so a caller that awaits it never returns an answer that was not recorded. One
    thread sends whatever has queued up and flushes once for the whole batch, so concurrent
    requests share a round trip to the broker instead of each paying for one.
    """

    def __init__(self, bus: BusConfig):
        self.topic = Topics(bus.topic_prefix).generations
        self._p = Producer(bus, client_id="policy-generations")
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation-recorder", daemon=True)
        self._thread.start()

    def record(self, gen) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((gen, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            sent = []
            try:
                for gen, fut in batch:
                    sent.append((fut, [self._p.send(self.topic, c.generation_id, events_pb2.Generation(
                        generation_id=c.generation_id, request_id=gen.request_id, prompt=gen.prompt,
                        response=c.text, policy_version=gen.policy_version,
                        prompt_token_ids=gen.prompt_token_ids, response_token_ids=c.token_ids,
                        finish_reason=c.finish_reason, created_unix_ms=now_ms(),
                    ), wait=False) for c in gen.completions]))
                self._p.flush()
            except Exception as e:  # those requests fail with it; the recorder keeps going
                log.warning("recording %d answers failed: %s", len(batch), e)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for fut, records in sent:
                failed = next((r.exception for r in records if r.failed()), None)
                if failed is not None:
                    log.warning("recording an answer failed: %s", failed)
                    fut.set_exception(failed)
                else:
                    fut.set_result(None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._p.close()
