"""Prometheus metrics of the trainer service (prefix rlhf_trainer_), registered into a given registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rlhf_common.metrics import LAG_BUCKETS, LATENCY_BUCKETS, RpcMetrics


class TrainerMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry, kl_estimator: str = "k3"):
        super().__init__("rlhf_trainer", registry)
        self.step = Gauge("rlhf_trainer_step", "Optimisation steps done", registry=registry)
        self.version = Gauge("rlhf_trainer_published_version", "Last published weight version", registry=registry)
        self.reward_mean = Gauge("rlhf_trainer_reward_mean", "Mean reward of the last batch", registry=registry)
        self.reward_std = Gauge("rlhf_trainer_reward_std", "Reward std of the last batch", registry=registry)
        self.kl = Gauge("rlhf_trainer_kl_nats",
                        f"Mean per-token KL to the reference, last batch ({kl_estimator} estimator, as trained)",
                        registry=registry)
        self.loss = Gauge("rlhf_trainer_loss", "Loss of the last step", registry=registry)
        self.response_length = Gauge("rlhf_trainer_response_length_mean", "Mean response length (tokens)",
                                     registry=registry)
        self.entropy = Gauge("rlhf_trainer_entropy_nats", "Mean per-token policy entropy, last step", registry=registry)
        self.clip_fraction = Gauge("rlhf_trainer_clip_fraction", "Share of tokens with a clipped ratio, last step",
                                   registry=registry)
        self.value_loss = Gauge("rlhf_trainer_value_loss", "PPO value loss, last step", registry=registry)
        self.kl_beta = Gauge("rlhf_trainer_kl_beta", "KL penalty weight in force", registry=registry)
        self.is_weight = Gauge("rlhf_trainer_is_weight_mean",
                               "Mean truncated importance weight (trainer vs sampler log-probs), last step",
                               registry=registry)
        self.engine_logprob_diff = Gauge(
            "rlhf_trainer_engine_logprob_diff",
            "Mean |trainer - inference engine| per-token log-prob of the last step's rollouts made on the "
            "weights the trainer held (lag 0): the engine's numerical mismatch, in nats (NaN until one is seen)",
            registry=registry)
        self.engine_logprob_diff.set(float("nan"))
        self.preference_loss = Gauge("rlhf_trainer_preference_loss", "Preference loss of the last step on feedback "
                                     "pairs", registry=registry)
        self.preference_accuracy = Gauge("rlhf_trainer_preference_accuracy",
                                         "Share of the last feedback pairs whose implicit reward prefers the chosen "
                                         "answer (before the step)", registry=registry)
        self.label_pairs = Counter("rlhf_trainer_label_pairs_total",
                                   "Feedback pairs from rlhf.labels, by outcome (read, trained)", ["outcome"],
                                   registry=registry)
        self.stale = Counter("rlhf_trainer_stale_rollouts_total", "Rollouts skipped for exceeding max staleness",
                             registry=registry)
        self.checkpoints = Counter("rlhf_trainer_checkpoints_total", "Training-state checkpoints saved",
                                   registry=registry)
        self.eval_win_rate = Gauge("rlhf_trainer_eval_win_rate",
                                   "Held-out win rate against the SFT policy, judged by the reward model",
                                   registry=registry)
        self.eval_kl = Gauge("rlhf_trainer_eval_kl_nats",
                             f"Held-out mean per-token KL to the reference ({kl_estimator} estimator)",
                             registry=registry)
        self.eval_length = Gauge("rlhf_trainer_eval_response_length_mean", "Held-out mean answer length (tokens)",
                                 registry=registry)
        self.heldout_skipped = Counter("rlhf_trainer_heldout_rollouts_skipped_total",
                                       "Rollouts not trained on because their prompt is held out",
                                       registry=registry)
        self.rollouts = Counter("rlhf_trainer_rollouts_consumed_total", "Rollouts consumed", registry=registry)
        self.tokens = Counter("rlhf_trainer_trained_tokens_total", "Response tokens trained on", registry=registry)
        self.dead_lettered = Counter("rlhf_trainer_dead_lettered_rollouts_total",
                                     "Rollouts sent to the dead-letter topic (invalid, or refused by a scorer)",
                                     registry=registry)
        self.repeated_groups = Counter(
            "rlhf_trainer_repeated_group_rollouts_total",
            "Rollouts dropped because their prompt already had a complete group (a policy re-sampled it after a "
            "crash)", registry=registry)
        self.duplicates = Counter("rlhf_trainer_duplicate_rollouts_total", "Rollouts skipped as duplicates",
                                  registry=registry)
        self.phase_seconds = Histogram(
            "rlhf_trainer_phase_seconds",
            "Step time by phase, the phases disjoint: wait (for complete groups), scoring (reward and reference, "
            "at once), training, sync (weights written to the store), checkpoint (training state), kafka "
            "(weight update announced, offsets committed), eval", ["phase"], buckets=LATENCY_BUCKETS,
            registry=registry)
        self.scorer_seconds = Histogram("rlhf_trainer_scorer_call_seconds",
                                        "Seconds of one scoring call as the trainer sees it (gRPC included)",
                                        ["scorer"], buckets=LATENCY_BUCKETS, registry=registry)
        self.version_lag = Histogram("rlhf_trainer_rollout_version_lag",
                                     "Policy versions between a rollout's generation and its training step",
                                     buckets=LAG_BUCKETS, registry=registry)
