"""The training loop, independent of gRPC: rollouts in, GRPO step, weights out."""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import torch

from rlhf.events.v1 import events_pb2

from rlhf_common.algos.grpo import group_advantages, grpo_loss
from rlhf_common.algos.logprobs import pack_sequences, token_logprobs
from rlhf_common.bus import Consumer, Producer, Received, now_ms
from rlhf_common.config import BusConfig, TrainerConfig
from rlhf_common.metrics import TrainerMetrics
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore

from .clients import ReferenceClient, RewardClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    step: int
    version: int
    reward_mean: float
    reward_std: float
    kl: float
    loss: float
    clip_fraction: float
    response_length_mean: float
    version_lag_mean: float
    step_seconds: float
    rollouts: int


class GroupBuffer:
    """Collects rollouts into complete prompt groups, keeping arrival order."""

    def __init__(self):
        self.pending: dict[str, list[Received]] = {}
        self.complete: list[list[Received]] = []

    def add(self, r: Received) -> None:
        key = r.record.prompt_id
        group = self.pending.setdefault(key, [])
        if any(g.record.group_index == r.record.group_index for g in group):
            return  # same sample re-sent under a new id: keep the first
        group.append(r)
        if len(group) >= max(1, r.record.group_size):
            self.complete.append(self.pending.pop(key))

    def take(self, k: int) -> list[list[Received]]:
        out, self.complete = self.complete[:k], self.complete[k:]
        return out

    def safe_offsets(self, taken: list[Received]) -> dict[int, int]:
        """Per partition, the offset to commit so that no un-trained rollout is skipped on restart."""
        held: dict[int, int] = {}
        for group in [*self.pending.values(), *self.complete]:
            for r in group:
                held[r.partition] = min(held.get(r.partition, r.offset), r.offset)
        out: dict[int, int] = {}
        for r in taken:
            out[r.partition] = max(out.get(r.partition, 0), r.offset + 1)
        for p, off in held.items():
            out[p] = min(out.get(p, off), off)
        return out


class Trainer:
    def __init__(self, cfg: TrainerConfig, bus: BusConfig, metrics: TrainerMetrics):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.bus, self.metrics = cfg, bus, metrics
        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.store = WeightStore(cfg.weight_store)
        self.step = 0
        self.version = 0
        self.rollouts_consumed = 0
        self.groups_consumed = 0
        start_from = cfg.model
        latest = self.store.latest(cfg.model_name)
        if latest is not None:
            # Continue the version sequence from the last published weights, so that a
            # restarted trainer never re-publishes a version the policy already serves.
            # The optimizer state is not restored yet.
            start_from = str(latest.path)
            self.step, self.version = latest.step, latest.version
            self.groups_consumed = int(latest.extra.get("groups_consumed", 0))
            self.rollouts_consumed = int(latest.extra.get("rollouts_consumed", 0))
            log.warning("continuing from published v%d (step %d) in %s; optimizer state starts fresh",
                        latest.version, latest.step, latest.path)
        self.model = AutoModelForCausalLM.from_pretrained(start_from, dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.recent: collections.deque[StepStats] = collections.deque(maxlen=64)
        self.paused = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.done = threading.Event()

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:
            self.error = e
            log.exception("trainer loop died")
        finally:
            self.done.set()

    def _run(self) -> None:
        topics = Topics(self.bus.topic_prefix)
        consumer = Consumer(self.bus, topics.rollouts, events_pb2.Rollout, group_id=self.cfg.group_id,
                            client_id="trainer", id_of=lambda r: r.rollout_id)
        producer = Producer(self.bus, client_id="trainer")
        reward = RewardClient(self.cfg.reward_addr)
        reference = ReferenceClient(self.cfg.reference_addr)
        buf = GroupBuffer()
        try:
            while not self.stopping.is_set():
                if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                    break
                if self.paused.is_set():
                    time.sleep(0.1)
                    continue
                t_wait = time.perf_counter()
                while len(buf.complete) < self.cfg.groups_per_step and not self.stopping.is_set():
                    dup_before = consumer.duplicates
                    for rec in consumer.poll(timeout_ms=200):
                        buf.add(rec)
                    self.metrics.duplicates.inc(consumer.duplicates - dup_before)
                if self.stopping.is_set():
                    break
                self.metrics.phase_seconds.labels("wait").observe(time.perf_counter() - t_wait)
                groups = buf.take(self.cfg.groups_per_step)
                taken = [r for g in groups for r in g]
                stats = self.train_step([r.record for r in taken], reward, reference)
                self.groups_consumed += len(groups)
                self.publish(producer, topics.weights, stats)
                # Offsets move only once the new weights are saved and announced.
                consumer.commit_offsets(buf.safe_offsets(taken))
        finally:
            consumer.close()
            producer.close()
            reward.close()
            reference.close()

    def train_step(self, rollouts: list[events_pb2.Rollout], reward: RewardClient,
                   reference: ReferenceClient) -> StepStats:
        t0 = time.perf_counter()
        rollouts = [r for r in rollouts if len(r.response_token_ids) > 0]
        prompts = [list(r.prompt_token_ids) for r in rollouts]
        responses = [list(r.response_token_ids) for r in rollouts]

        t = time.perf_counter()
        scores, _ = reward.score([(r.prompt_text, r.response_text) for r in rollouts])
        ref_lps = reference.logprobs(prompts, responses)
        self.metrics.phase_seconds.labels("scoring").observe(time.perf_counter() - t)

        t = time.perf_counter()
        rewards = torch.tensor(scores, dtype=torch.float32)
        adv = group_advantages(rewards, [r.prompt_id for r in rollouts])
        input_ids, attn, mask = pack_sequences(prompts, responses, self.pad_id)
        behaviour = torch.zeros_like(mask)
        ref = torch.zeros_like(mask)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            s = len(p) - 1
            behaviour[i, s:s + len(r)] = torch.tensor(list(rollouts[i].behaviour_logprobs), dtype=torch.float32)
            ref[i, s:s + len(r)] = torch.tensor(ref_lps[i], dtype=torch.float32)
        logits = self.model(input_ids=input_ids, attention_mask=attn).logits
        logp = token_logprobs(logits, input_ids)
        out = grpo_loss(logp, behaviour, ref, adv, mask, clip_eps=self.cfg.clip_eps, kl_beta=self.cfg.kl_beta)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.metrics.phase_seconds.labels("training").observe(time.perf_counter() - t)

        self.step += 1
        new_version = self.version + 1
        lags = [new_version - 1 - r.policy_version for r in rollouts]
        for lag in lags:
            self.metrics.version_lag.observe(lag)
        n_tokens = sum(len(r) for r in responses)
        stats = StepStats(
            step=self.step,
            version=new_version,
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
            kl=float(out.kl),
            loss=float(out.loss.detach()),
            clip_fraction=float(out.clip_fraction),
            response_length_mean=n_tokens / max(1, len(rollouts)),
            version_lag_mean=sum(lags) / max(1, len(lags)),
            step_seconds=time.perf_counter() - t0,
            rollouts=len(rollouts),
        )
        self.rollouts_consumed += len(rollouts)
        m = self.metrics
        m.rollouts.inc(len(rollouts))
        m.tokens.inc(n_tokens)
        m.reward_mean.set(stats.reward_mean)
        m.reward_std.set(stats.reward_std)
        m.kl.set(stats.kl)
        m.loss.set(stats.loss)
        m.response_length.set(stats.response_length_mean)
        m.step.set(self.step)
        return stats

    def publish(self, producer: Producer, topic: str, stats: StepStats) -> None:
        t = time.perf_counter()
        ckpt = self.store.save(self.model, self.tokenizer, self.cfg.model_name, stats.version, stats.step,
                               extra={"groups_consumed": self.groups_consumed,
                                      "rollouts_consumed": self.rollouts_consumed})
        update = events_pb2.WeightUpdate(
            model_name=self.cfg.model_name,
            version=ckpt.version,
            uri=str(ckpt.path),
            format=events_pb2.WeightUpdate.FORMAT_FULL,
            sha256=ckpt.sha256,
            step=ckpt.step,
            groups_consumed=self.groups_consumed,
            created_unix_ms=now_ms(),
        )
        producer.send(topic, self.cfg.model_name, update)
        self.store.prune(self.cfg.model_name, self.cfg.keep_versions)
        self.version = ckpt.version
        self.metrics.version.set(self.version)
        self.metrics.phase_seconds.labels("sync").observe(time.perf_counter() - t)
        self.recent.append(stats)
        log.info("step %d -> v%d reward %.4f±%.4f kl %.5f loss %.4f lag %.2f (%d rollouts, %.2fs)",
                 stats.step, stats.version, stats.reward_mean, stats.reward_std, stats.kl, stats.loss,
                 stats.version_lag_mean, stats.rollouts, stats.step_seconds)
