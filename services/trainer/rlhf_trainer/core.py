"""The trainer loop, independent of gRPC: rollouts in, a policy update, weights out.

Order of effects for every step (what makes a kill -9 at any point safe):
  train -> save weights (new version folder, in the serving dtype) -> [every few steps or
  minutes, when idle, and at a stop: save the training state: full-precision weights,
  optimizer, the offsets to continue from, the trained rollout ids] -> publish WeightUpdate
  -> commit consumer-group offsets (informational: the training state's offsets are the truth).
On start, the newest training state is loaded and the consumer seeks to its offsets. If no
version was published after it, that version is announced again (the policy ignores
versions it already serves). If some were (a crash between two states), those versions are
a branch the trainer does not continue: the state's weights are published as a new version,
so the policy serves the trainer's weights again, and the rollouts after the state's offsets
are read and trained on once more. That is what a crash between two states costs: the steps
since the last one. New versions are numbered after the newest one in the weight store, so
a version number is never reused.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from rlhf.events.v1 import events_pb2

from rlhf_common import failpoints
from rlhf_common.bus import Consumer, Producer, Received, now_ms
from rlhf_common.config import BusConfig
from rlhf_common.errors import InvalidInput
from rlhf_common.loops import BackgroundLoop
from rlhf_common.text import pad_id
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore

from .checkpoint import CheckpointStore, TrainerState
from .clients import TRANSIENT, ReferenceClient, RewardClient
from .config import TrainerConfig
from .labels import PairBuffer
from .learner import LearnerConfig, PolicyLearner, PreferenceBatch, RolloutBatch
from .metrics import TrainerMetrics
from .rewards import RewardWhitener

log = logging.getLogger(__name__)

TRAINED_IDS_KEPT = 100_000


@dataclass(frozen=True)
class StepStats:
    step: int
    version: int
    reward_mean: float
    reward_std: float
    kl: float
    loss: float
    clip_fraction: float
    entropy: float
    value_loss: float
    kl_beta: float
    response_length_mean: float
    version_lag_mean: float
    step_seconds: float
    rollouts: int
    kind: str = "rollouts"  # or "labels": a step of the preference loss on feedback pairs
    label_ids: tuple[str, ...] = ()  # the labels a "labels" step learned from


@dataclass(frozen=True)
class Progress:
    """Counters as of the last completed step, replaced as a whole so readers (the Status
    RPC) never see a step without its version."""

    step: int
    version: int
    rollouts_consumed: int
    groups_consumed: int


def rollout_problem(r: events_pb2.Rollout, vocab: int) -> str | None:
    """Why a well-formed rollout cannot be trained on, or None."""
    for name in ("prompt_token_ids", "response_token_ids"):
        bad = next((t for t in getattr(r, name) if not 0 <= t < vocab), None)
        if bad is not None:
            return f"{name} holds {bad}, outside the vocabulary of {vocab}"
    if len(r.behaviour_logprobs) != len(r.response_token_ids):
        return (f"{len(r.behaviour_logprobs)} behaviour log-probs for {len(r.response_token_ids)} response "
                "tokens")
    if any(not (lp <= 0.0) for lp in r.behaviour_logprobs):  # NaN fails too
        return "behaviour log-probs must be finite and <= 0"
    if not 0 <= r.group_index < max(1, r.group_size):
        return f"group_index {r.group_index} outside group_size {r.group_size}"
    if not r.prompt_token_ids:
        return "no prompt tokens"
    return None


class GroupBuffer:
    """Collects rollouts into complete prompt groups, keeping arrival order.

    At most one complete group per prompt is ever handed out: a policy that crashed after
    writing a group's rollouts but before committing its prompt offset samples the prompt
    again after its restart (new rollout ids), and that second group is dropped here.
    The prompts of the groups taken are kept in the training state and given back here
    (`done_prompts`), so this holds across trainer restarts too.
    """

    def __init__(self, done_prompts=()):
        self.pending: dict[str, list[Received]] = {}
        self.complete: list[list[Received]] = []
        self.done_prompts: collections.deque[str] = collections.deque(done_prompts, maxlen=TRAINED_IDS_KEPT)
        self._done = set(self.done_prompts)
        self.repeated = 0  # rollouts dropped because their prompt already had a complete group
        self.repeated_groups = 0  # such groups (counted by their first sample)

    def add(self, r: Received) -> None:
        key = r.record.prompt_id
        if key in self._done:
            self.repeated += 1
            self.repeated_groups += r.record.group_index == 0
            return
        group = self.pending.setdefault(key, [])
        if any(g.record.group_index == r.record.group_index for g in group):
            return  # same sample re-sent under a new id: keep the first
        group.append(r)
        if len(group) >= max(1, r.record.group_size):
            self.complete.append(self.pending.pop(key))
            if len(self.done_prompts) == self.done_prompts.maxlen:
                self._done.discard(self.done_prompts[0])
            self.done_prompts.append(key)
            self._done.add(key)

    def take(self, k: int) -> list[list[Received]]:
        out, self.complete = self.complete[:k], self.complete[k:]
        return out

    def safe_offsets(self, taken: list[Received]) -> dict[int, int]:
        """Per partition, the offset to continue from so that no un-trained rollout is skipped."""
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


def publish_dtype(cfg: TrainerConfig) -> torch.dtype:
    """The dtype of published full weights: the setting, or with "auto" the initial model's
    own (its config.json's dtype; float32 when it names none)."""
    name = cfg.publish_dtype
    if name == "auto":
        import json

        try:
            conf = json.loads((Path(cfg.model) / "config.json").read_text())
        except (OSError, ValueError):
            conf = {}
        name = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def learner_config(cfg: TrainerConfig) -> LearnerConfig:
    return LearnerConfig(
        algorithm=cfg.algorithm, lr=cfg.lr, kl_beta=cfg.kl_beta, kl_target=cfg.kl_target or None,
        kl_estimator=cfg.kl_estimator, kl_in=cfg.kl_in, clip_eps=cfg.clip_eps, epochs=cfg.epochs,
        minibatch_size=cfg.minibatch_size, gamma=cfg.gamma, lam=cfg.lam, vf_coef=cfg.vf_coef,
        entropy_coef=cfg.entropy_coef, is_cap=cfg.is_cap, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
    )


class Trainer:
    def __init__(self, cfg: TrainerConfig, bus: BusConfig, metrics: TrainerMetrics):
        from transformers import AutoTokenizer

        self.cfg, self.bus, self.metrics = cfg, bus, metrics
        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.pad_id = pad_id(self.tokenizer)
        self.store = WeightStore(cfg.weight_store)
        self.checkpoints = CheckpointStore(self.store.child(f"{cfg.model_name}-trainer-state"),
                                           keep=cfg.keep_checkpoints)
        # This trainer is the model's one writer: saves a killed predecessor left half-done go.
        for p in self.store.remove_unfinished(cfg.model_name) + self.checkpoints.remove_unfinished():
            log.warning("removed an unfinished save: %s", p)
        self.step = 0
        self.version = 0
        self.rollouts_consumed = 0
        self.groups_consumed = 0
        self.offsets: dict[int, int] = {}
        self.trained_ids: collections.deque[str] = collections.deque(maxlen=TRAINED_IDS_KEPT)
        self.label_offsets: dict[int, int] = {}
        self.trained_labels: collections.deque[str] = collections.deque(maxlen=TRAINED_IDS_KEPT)
        # Prompts whose group was taken (see GroupBuffer); saved with the training state.
        self.taken_prompts: collections.deque[str] = collections.deque(maxlen=TRAINED_IDS_KEPT)
        self._announced: tuple[int, str, str] | None = None  # the last version announced
        self.label_pairs_trained = 0
        self.whitener = RewardWhitener()
        self.resumed_from: TrainerState | None = self.checkpoints.latest()
        st = self.resumed_from
        self.model = self._load_model(str(st.weights_folder()) if st else None)
        self.model.train()
        self.learner = PolicyLearner(self.model, learner_config(cfg), self.pad_id)
        if st is not None:
            self.learner.load_state_dict(st.learner)
            torch.set_rng_state(st.torch_rng)
            self.step, self.version = st.step, st.version
            self.groups_consumed, self.rollouts_consumed = st.groups_consumed, st.rollouts_consumed
            self.offsets = dict(st.offsets)
            self.trained_ids.extend(st.trained_ids)
            if "whitener" in st.extra:
                self.whitener.load_state_dict(st.extra["whitener"])
            self.label_offsets = dict(st.extra.get("label_offsets", {}))
            self.trained_labels.extend(st.extra.get("trained_labels", []))
            self.taken_prompts.extend(st.extra.get("done_prompts", []))
            self.label_pairs_trained = int(st.extra.get("label_pairs_trained", 0))
            log.info("resumed from step %d (v%d), offsets %s", st.step, st.version, st.offsets)
        newest = self.store.latest(cfg.model_name)
        if newest is not None and newest.version > self.version:
            log.warning("weights up to v%d exist beyond the training state (v%d); numbering continues after them",
                        newest.version, self.version)
            self.version = newest.version
        self.publish_dtype = publish_dtype(cfg)
        self.state_step = st.step if st is not None else 0  # the step of the newest training state
        self.state_time = time.monotonic()
        self.last_step_time = time.monotonic()
        self.recent: collections.deque[StepStats] = collections.deque(maxlen=64)
        self.progress = self._progress()
        self.evaluator = None
        self.last_eval = None
        self.paused = threading.Event()
        # Held while the model and optimizer change, so a Checkpoint RPC sees a consistent state.
        self._state_lock = threading.Lock()
        # Set by the TrainingLoop that runs `run` to make it return.
        self.stopping = threading.Event()
        self._calls = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trainer-calls")
        # (version, path, sha256) of the newest version this trainer published or resumed from
        self._published: tuple[int, str, str] | None = (
            (st.version, st.weights_path, st.weights_sha256) if st is not None else None)

    def _load_model(self, checkpoint: str | None):
        """The policy to train: full weights, or the base model plus a trainable LoRA adapter."""
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        if not cfg.lora_rank:
            return AutoModelForCausalLM.from_pretrained(checkpoint or cfg.model, dtype=torch.float32)
        from peft import LoraConfig, PeftModel, get_peft_model

        base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        if checkpoint:
            return PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        return get_peft_model(base, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets,
                                               lora_dropout=0.0, bias="none"))

    @property
    def weight_format(self) -> int:
        return events_pb2.WeightUpdate.FORMAT_LORA if self.cfg.lora_rank else events_pb2.WeightUpdate.FORMAT_FULL

    # -- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """Consume rollouts and/or feedback pairs and train until `stopping` is set or max_steps
        is reached (blocking)."""
        topics = Topics(self.bus.topic_prefix)
        use_rollouts = self.cfg.learn_from in ("rollouts", "both")
        use_labels = self.cfg.learn_from in ("labels", "both")
        consumer = Consumer(self.bus, topics.rollouts, events_pb2.Rollout, group_id=self.cfg.group_id,
                            client_id="trainer", id_of=lambda r: r.rollout_id) if use_rollouts else None
        labels = Consumer(self.bus, topics.labels, events_pb2.Label, group_id=f"{self.cfg.group_id}-labels",
                          client_id="trainer-labels", id_of=lambda x: x.label_id) if use_labels else None
        if self.resumed_from is not None:
            if consumer is not None:
                consumer.seek(self.offsets)
                consumer.remember(self.trained_ids)
            if labels is not None:
                labels.seek(self.label_offsets)
                labels.remember(self.trained_labels)
        producer = Producer(self.bus, client_id="trainer")
        if self.resumed_from is not None:
            st = self.resumed_from
            if self.version == st.version:
                self._announce(producer, topics.weights, st.version, st.weights_path, st.weights_sha256)
            else:  # versions after the state were published before a crash: serve the state's weights again
                log.warning("continuing from the training state of step %d (v%d); versions up to v%d were published "
                            "after it and are left behind", st.step, st.version, self.version)
                with self._state_lock:
                    self._publish(producer, topics.weights, self.version + 1, "resume")
        reward = RewardClient(self.cfg.reward_addr, retry_s=self.cfg.rpc_retry_s, tls_ca_file=self.cfg.tls_ca_file)
        reference = ReferenceClient(self.cfg.reference_addr, retry_s=self.cfg.rpc_retry_s,
                                    tls_ca_file=self.cfg.tls_ca_file)
        self.evaluator = self._make_evaluator(reward)
        buf = GroupBuffer(self.taken_prompts)
        pairs = PairBuffer(self.tokenizer, self.cfg.max_pair_tokens)
        rl_steps_since_labels = 0
        try:
            while not self.stopping.is_set():
                if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                    break
                if self.paused.is_set():
                    time.sleep(0.1)
                    continue
                if use_labels and len(pairs.pending) >= self.cfg.preference_batch and (
                        not use_rollouts or rl_steps_since_labels >= self.cfg.label_step_every):
                    with self._state_lock:
                        self.save_and_publish(producer, topics.weights, self.label_step(pairs, reference))
                    labels.commit_offsets(self.label_offsets)
                    rl_steps_since_labels = 0
                    self.progress = self._progress()
                    continue
                if not use_rollouts:
                    self._read_labels(labels, pairs, timeout_ms=200)
                    self._save_if_idle()
                    continue
                t_wait = time.perf_counter()
                while (len(buf.complete) < self.cfg.groups_per_step and not self.stopping.is_set()
                       and not self.paused.is_set()):
                    self._save_if_idle()
                    dup_before, rep_before = consumer.duplicates, buf.repeated
                    for rec in consumer.poll(timeout_ms=200):
                        buf.add(rec)
                    self.metrics.duplicates.inc(consumer.duplicates - dup_before)
                    self.metrics.repeated_groups.inc(buf.repeated - rep_before)
                    if buf.repeated_groups:  # dropped groups count as consumed, for the policy's pacing
                        self.groups_consumed += buf.repeated_groups
                        buf.repeated_groups = 0
                        self._announce_progress(producer, topics.weights)
                    if labels is not None:
                        self._read_labels(labels, pairs, timeout_ms=0)
                if self.stopping.is_set():
                    break
                if self.paused.is_set():  # paused while waiting: no step is taken from now on
                    continue
                self.metrics.phase_seconds.labels("wait").observe(time.perf_counter() - t_wait)
                groups = buf.take(self.cfg.groups_per_step)
                taken = [r for g in groups for r in g]
                n_groups = len(groups)  # dead-lettered ones count as consumed, for the policy's pacing
                groups = self._drop_invalid(groups, consumer)
                fresh = [r.record for g in groups if self.version - g[0].record.policy_version
                         <= self.cfg.max_staleness for r in g]
                self.metrics.stale.inc(len(taken) - len(fresh))
                if self.evaluator is not None:
                    kept = [r for r in fresh if r.prompt_text not in self.evaluator.heldout]
                    self.metrics.heldout_skipped.inc(len(fresh) - len(kept))
                    fresh = kept
                self.groups_consumed += n_groups
                self.offsets.update(buf.safe_offsets(taken))
                self.trained_ids.extend(r.record.rollout_id for r in taken)
                self.taken_prompts.extend(g[0].record.prompt_id for g in groups)
                if labels is not None:
                    self.label_offsets.update(pairs.safe_offsets())
                if fresh:
                    with self._state_lock:
                        try:
                            stats = self.train_step(fresh, reward, reference)
                        except grpc.RpcError as e:
                            if e.code() in TRANSIENT:
                                raise
                            fresh = self._drop_refused(groups, fresh, reward, reference, consumer)
                            stats = self.train_step(fresh, reward, reference) if fresh else None
                        if stats is not None:
                            self.save_and_publish(producer, topics.weights, stats)
                    rl_steps_since_labels += 1
                    if self.evaluator is not None and self.step % self.cfg.eval_every == 0:
                        self.run_eval(reward, reference)
                failpoints.reached("trainer.weights_published")
                t_commit = time.perf_counter()
                consumer.commit_offsets(self.offsets)
                self.metrics.phase_seconds.labels("kafka").observe(time.perf_counter() - t_commit)
                self.progress = self._progress()
            if self.step > self.state_step:  # stopping, or max_steps reached
                with self._state_lock:
                    self._save_state("stop")
        finally:
            for c in (consumer, labels):
                if c is not None:
                    c.close()
            producer.close()
            reward.close()
            reference.close()

    def _read_labels(self, labels: Consumer, pairs: PairBuffer, timeout_ms: int) -> None:
        for rec in labels.poll(timeout_ms=timeout_ms):
            if pairs.add(rec):
                self.metrics.label_pairs.labels("read").inc()

    def label_step(self, pairs: PairBuffer, reference: ReferenceClient) -> StepStats:
        """One preference-loss step on a batch of feedback pairs (caller holds the state lock)."""
        t0 = time.perf_counter()
        batch = pairs.take(self.cfg.preference_batch)
        prompts = [p.prompt for p in batch]
        t = time.perf_counter()
        ref = [sum(x) for x in reference.logprobs(prompts + prompts, [p.chosen for p in batch]
                                                  + [p.rejected for p in batch])]
        self.metrics.phase_seconds.labels("scoring").observe(time.perf_counter() - t)
        t = time.perf_counter()
        out = self.learner.preference_step(PreferenceBatch(prompts, [p.chosen for p in batch],
                                                           [p.rejected for p in batch], ref[:len(batch)],
                                                           ref[len(batch):]),
                                           self.cfg.preference_loss, self.cfg.preference_beta)
        self.metrics.phase_seconds.labels("training").observe(time.perf_counter() - t)
        self.step += 1
        ids = tuple(p.label_id for p in batch)
        self.trained_labels.extend(ids)
        self.label_pairs_trained += len(batch)
        self.label_offsets.update(pairs.safe_offsets())
        m = self.metrics
        m.label_pairs.labels("trained").inc(len(batch))
        m.preference_loss.set(out["loss"])
        m.preference_accuracy.set(out["accuracy"])
        m.step.set(self.step)
        n_tokens = sum(len(p.chosen) + len(p.rejected) for p in batch)
        m.tokens.inc(n_tokens)
        return StepStats(
            step=self.step, version=self.version + 1, reward_mean=out["chosen_reward"] - out["rejected_reward"],
            reward_std=0.0, kl=float("nan"), loss=out["loss"], clip_fraction=0.0, entropy=float("nan"),
            value_loss=0.0, kl_beta=self.cfg.preference_beta, response_length_mean=n_tokens / (2 * len(batch)),
            version_lag_mean=0.0, step_seconds=time.perf_counter() - t0, rollouts=0, kind="labels", label_ids=ids)

    def _timed(self, scorer: str, call, *args):
        t = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.metrics.scorer_seconds.labels(scorer).observe(time.perf_counter() - t)

    def _drop_invalid(self, groups: list[list[Received]], consumer: Consumer) -> list[list[Received]]:
        """Dead-letter every group holding a rollout that cannot be trained on as it stands
        (token ids outside the vocabulary, log-probs that do not match the tokens); keep the rest."""
        vocab = self.model.get_input_embeddings().num_embeddings
        kept = []
        for g in groups:
            why = next((w for r in g if (w := rollout_problem(r.record, vocab)) is not None), None)
            if why is None:
                kept.append(g)
                continue
            for r in g:
                consumer.reject(r, InvalidInput(f"group of prompt {r.record.prompt_id}: {why}"))
            self.metrics.dead_lettered.inc(len(g))
        return kept

    def _drop_refused(self, groups: list[list[Received]], fresh: list[events_pb2.Rollout], reward: RewardClient,
                      reference: ReferenceClient, consumer: Consumer) -> list[events_pb2.Rollout]:
        """After a batch was refused by the reward or reference service for a reason of its
        own (not a transient failure): find the groups refused, one by one, and dead-letter
        them with that reason; the rest are returned to train on."""
        def refusal(rs: list[events_pb2.Rollout]) -> str | None:
            rs = [r for r in rs if len(r.response_token_ids) > 0]
            if not rs:
                return None
            try:
                reward.score([(r.prompt_text, r.response_text) for r in rs])
                reference.logprobs([list(r.prompt_token_ids) for r in rs], [list(r.response_token_ids) for r in rs])
            except grpc.RpcError as e:
                if e.code() in TRANSIENT:
                    raise
                return f"{e.code().name}: {e.details()}"
            return None

        keep_ids = set()
        for g in groups:
            why = refusal([r.record for r in g])
            if why is None:
                keep_ids.update(r.record.rollout_id for r in g)
                continue
            for r in g:
                consumer.reject(r, InvalidInput(f"refused by a scorer: {why}"))
            self.metrics.dead_lettered.inc(len(g))
        return [r for r in fresh if r.rollout_id in keep_ids]

    def train_step(self, rollouts: list[events_pb2.Rollout], reward: RewardClient,
                   reference: ReferenceClient) -> StepStats:
        t0 = time.perf_counter()
        rollouts = [r for r in rollouts if len(r.response_token_ids) > 0]
        prompts = [list(r.prompt_token_ids) for r in rollouts]
        responses = [list(r.response_token_ids) for r in rollouts]

        t = time.perf_counter()
        # Both services at once: the reference's call runs on a thread while the reward's
        # runs here (each client retries transient failures by itself).
        ref_call = self._calls.submit(self._timed, "reference", reference.logprobs, prompts, responses)
        try:
            scores, reward_version = self._timed("reward", reward.score,
                                                 [(r.prompt_text, r.response_text) for r in rollouts])
        except BaseException:
            concurrent.futures.wait([ref_call])
            raise
        ref_lps = ref_call.result()
        # Nothing is changed before both calls have answered, so a refused batch can be retried.
        learn_scores = self.whitener(scores, reward_version) if self.cfg.reward_whiten else scores
        self.metrics.phase_seconds.labels("scoring").observe(time.perf_counter() - t)

        t = time.perf_counter()
        res = self.learner.step(RolloutBatch(
            prompts=prompts, responses=responses,
            behaviour_logprobs=[list(r.behaviour_logprobs) for r in rollouts],
            ref_logprobs=ref_lps, scores=learn_scores, group_ids=[r.prompt_id for r in rollouts],
        ))
        self.metrics.phase_seconds.labels("training").observe(time.perf_counter() - t)

        self.step += 1
        lags = [self.version - r.policy_version for r in rollouts]
        for lag in lags:
            self.metrics.version_lag.observe(lag)
        on_policy = [d for d, lag in zip(res.logprob_diff, lags) if lag == 0]
        if on_policy:
            self.metrics.engine_logprob_diff.set(sum(on_policy) / len(on_policy))
        rewards = torch.tensor(scores)
        n_tokens = sum(len(r) for r in responses)
        stats = StepStats(
            step=self.step, version=self.version + 1, reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0, kl=res.kl, loss=res.loss,
            clip_fraction=res.clip_fraction, entropy=res.entropy, value_loss=res.value_loss, kl_beta=res.beta,
            response_length_mean=n_tokens / max(1, len(rollouts)), version_lag_mean=sum(lags) / max(1, len(lags)),
            step_seconds=time.perf_counter() - t0, rollouts=len(rollouts),
        )
        self.rollouts_consumed += len(rollouts)
        m = self.metrics
        m.rollouts.inc(len(rollouts))
        m.tokens.inc(n_tokens)
        m.reward_mean.set(stats.reward_mean)
        m.reward_std.set(stats.reward_std)
        m.kl.set(stats.kl)
        m.loss.set(stats.loss)
        m.entropy.set(stats.entropy)
        m.clip_fraction.set(stats.clip_fraction)
        m.value_loss.set(stats.value_loss)
        m.kl_beta.set(self.learner.kl_ctl.beta)
        m.is_weight.set(res.is_weight_mean)
        m.response_length.set(stats.response_length_mean)
        m.step.set(self.step)
        return stats

    def _progress(self) -> Progress:
        return Progress(self.step, self.version, self.rollouts_consumed, self.groups_consumed)

    def _make_evaluator(self, reward: RewardClient):
        if not self.cfg.eval_every:
            return None
        from transformers import AutoModelForCausalLM

        from rlhf_common.jsonl import read_prompts

        from .evaluation import Evaluator

        # The baseline is the initial (SFT) policy, also after a resume.
        sft = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=torch.float32)
        ev = Evaluator(read_prompts(Path(self.cfg.eval_prompts)), self.tokenizer, sft, reward,
                       self.cfg.eval_max_tokens, self.store.local_file(f"{self.cfg.model_name}-eval.jsonl"),
                       seed=self.cfg.seed + 1234, kl_estimator=self.cfg.kl_estimator)
        log.info("evaluating every %d steps on %d held-out prompts", self.cfg.eval_every, len(ev.texts))
        return ev

    def run_eval(self, reward: RewardClient, reference: ReferenceClient) -> None:
        t = time.perf_counter()
        res = self.evaluator.evaluate(self.model, reward, reference, self.step, self.version)
        self.last_eval = res
        self.metrics.eval_win_rate.set(res.win_rate)
        self.metrics.eval_kl.set(res.kl)
        self.metrics.eval_length.set(res.response_length)
        self.metrics.phase_seconds.labels("eval").observe(time.perf_counter() - t)
        log.info("eval at step %d (v%d): win rate %.3f vs SFT, KL %.4f nats, length %.1f, reward %.4f (SFT %.4f)",
                 res.step, res.version, res.win_rate, res.kl, res.response_length, res.reward_mean,
                 res.baseline_reward_mean)

    def _state(self, version: int, path: str, sha256: str) -> TrainerState:
        return TrainerState(
            step=self.step, version=version, weights_path=path, weights_sha256=sha256,
            groups_consumed=self.groups_consumed, rollouts_consumed=self.rollouts_consumed,
            offsets=dict(self.offsets), trained_ids=list(self.trained_ids), learner=self.learner.state_dict(),
            torch_rng=torch.get_rng_state(),
            extra={"whitener": self.whitener.state_dict(), "label_offsets": dict(self.label_offsets),
                   "trained_labels": list(self.trained_labels), "label_pairs_trained": self.label_pairs_trained,
                   "done_prompts": list(self.taken_prompts)},
        )

    def _publish(self, producer: Producer, topic: str, version: int, kind: str, label_ids=()) -> float:
        """Save the model's weights as `version` (serving dtype) and announce it; save the
        training state too when one is due (caller holds the state lock). Returns the seconds
        spent in the phases observed on their own (checkpoint, kafka)."""
        ckpt = self.store.save(self.model, self.tokenizer, self.cfg.model_name, version, self.step,
                               extra={"groups_consumed": self.groups_consumed,
                                      "rollouts_consumed": self.rollouts_consumed, "step_kind": kind},
                               dtype=self.publish_dtype)
        if label_ids:  # which feedback went into this version, kept beyond pruning
            self.store.append_lineage(self.cfg.model_name, {"version": ckpt.version, "step": self.step,
                                                            "kind": kind, "label_ids": list(label_ids)})
        self.version = ckpt.version
        self._published = (ckpt.version, str(ckpt.path), ckpt.sha256)
        every_s = self.cfg.checkpoint_every_s
        nested = 0.0  # the checkpoint and kafka phases inside this one, observed on their own
        if (self.step - self.state_step >= self.cfg.checkpoint_every
                or (every_s and time.monotonic() - self.state_time >= every_s)):
            t = time.perf_counter()
            self._save_state("due")
            nested += time.perf_counter() - t
        t = time.perf_counter()
        self._announce(producer, topic, ckpt.version, str(ckpt.path), ckpt.sha256)
        announced = time.perf_counter() - t
        self.metrics.phase_seconds.labels("kafka").observe(announced)
        self.store.prune(self.cfg.model_name, self.cfg.keep_versions)
        return nested + announced

    def _save_if_idle(self) -> None:
        """Save the training state when steps were made since the last one and none for a while."""
        if (self.cfg.checkpoint_idle_s and self.step > self.state_step
                and time.monotonic() - self.last_step_time >= self.cfg.checkpoint_idle_s):
            with self._state_lock:
                self._save_state("idle")

    def _save_state(self, why: str) -> None:
        """Save the full training state now (caller holds the state lock)."""
        t = time.perf_counter()
        version, path, sha = self._published or (self.version, self.cfg.model, "")
        self.checkpoints.save(self._state(version, path, sha), model=self.model)
        self.state_step, self.state_time = self.step, time.monotonic()
        self.metrics.checkpoints.inc()
        self.metrics.phase_seconds.labels("checkpoint").observe(time.perf_counter() - t)
        log.info("training state saved at step %d (v%d, %s) in %.2fs", self.step, version, why,
                 time.perf_counter() - t)

    def save_and_publish(self, producer: Producer, topic: str, stats: StepStats) -> None:
        t = time.perf_counter()
        nested = self._publish(producer, topic, stats.version, stats.kind, stats.label_ids)
        self.last_step_time = time.monotonic()
        self.metrics.phase_seconds.labels("sync").observe(time.perf_counter() - t - nested)
        self.recent.append(stats)
        log.info("%s step %d -> v%d reward %.4f±%.4f kl %.5f (beta %.4f) loss %.4f lag %.2f (%d rollouts, %.2fs)",
                 stats.kind, stats.step, stats.version, stats.reward_mean, stats.reward_std, stats.kl, stats.kl_beta,
                 stats.loss, stats.version_lag_mean, stats.rollouts, stats.step_seconds)
        self.progress = self._progress()  # last: Status sees the whole step or none of it

    def _announce_progress(self, producer: Producer, topic: str) -> None:
        """Re-announce the served version with the groups consumed so far: a policy paced
        against this count would otherwise wait for ever on groups that were dropped."""
        if self._announced is not None:
            self._announce(producer, topic, *self._announced)

    def _announce(self, producer: Producer, topic: str, version: int, path: str, sha256: str) -> None:
        self._announced = (version, path, sha256)
        update = events_pb2.WeightUpdate(
            model_name=self.cfg.model_name, version=version, uri=path, format=self.weight_format,
            sha256=sha256, step=self.step, groups_consumed=self.groups_consumed, created_unix_ms=now_ms(),
        )
        producer.send(topic, self.cfg.model_name, update)
        self.metrics.version.set(version)

    def checkpoint_now(self) -> Path:
        """Save the full training state now (the Checkpoint RPC)."""
        with self._state_lock:
            return self._checkpoint_now()

    def _checkpoint_now(self) -> Path:
        if self._published is None:
            latest = self.store.latest(self.cfg.model_name)
            if latest is not None:
                self._published = (latest.version, str(latest.path), latest.sha256)
        self._save_state("requested")
        return self.checkpoints.folder(self.step)


class TrainingLoop(BackgroundLoop):
    """The trainer's loop as a background thread of the service."""

    def __init__(self, trainer: Trainer):
        super().__init__("trainer-loop")
        self.trainer = trainer
        self.stopping = trainer.stopping

    def loop_body(self) -> None:
        self.trainer.run()
