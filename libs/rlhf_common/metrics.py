"""Prometheus metric definitions. Each class takes the registry to register into, so
tests use a fresh CollectorRegistry and read values with get_sample_value."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SYNC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
LAG_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32)


def serve(port: int, registry: CollectorRegistry) -> None:
    """Expose /metrics on the given port (0 = do not expose)."""
    if port:
        start_http_server(port, addr="0.0.0.0", registry=registry)


class RpcMetrics:
    """Request counts by method and status, and latency by method (every service)."""

    def __init__(self, prefix: str, registry: CollectorRegistry):
        self.requests = Counter(f"{prefix}_requests_total", "gRPC requests by method and status code",
                                ["method", "code"], registry=registry)
        self.latency = Histogram(f"{prefix}_request_seconds", "gRPC request latency", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=registry)


class PolicyMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__("rlhf_policy", registry)
        self.version = Gauge("rlhf_policy_version", "Weight version being served", registry=registry)
        self.generated_tokens = Counter("rlhf_policy_generated_tokens_total", "Tokens generated",
                                        ["kind"], registry=registry)
        self.rollouts = Counter("rlhf_policy_rollouts_total", "Rollouts produced", registry=registry)
        self.weight_sync = Histogram("rlhf_policy_weight_sync_seconds",
                                     "Seconds from WeightUpdate received to serving the new version",
                                     buckets=SYNC_BUCKETS, registry=registry)
        self.weight_event_to_serving = Histogram(
            "rlhf_policy_weight_event_to_serving_seconds",
            "Seconds from a WeightUpdate's creation (producer clock) to serving it, Kafka delivery included",
            buckets=SYNC_BUCKETS, registry=registry)
        self.weight_updates = Counter("rlhf_policy_weight_updates_total", "Weight updates by outcome",
                                      ["outcome"], registry=registry)
        self.ttft = Histogram("rlhf_policy_time_to_first_token_seconds",
                              "Streaming requests: seconds from request to the first chunk",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("rlhf_policy_requests_in_flight", "Generation requests accepted and not finished",
                               registry=registry)
        self.waiting = Gauge("rlhf_policy_requests_waiting_for_update",
                             "Generation requests held while a weight update is applied", registry=registry)
        self.groups_ahead = Gauge("rlhf_policy_rollout_groups_ahead",
                                  "Rollout groups produced but not yet consumed by the trainer",
                                  registry=registry)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
REWARD_DIFF_BUCKETS = (-4, -2, -1, -0.5, -0.25, -0.1, -0.05, 0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4)


class RewardMetrics(RpcMetrics):
    """gRPC metrics (from RpcMetrics), REST requests, batching, hot swaps, shadow scoring,
    and the running reward statistics of the live model."""

    def __init__(self, registry: CollectorRegistry):
        super().__init__("rlhf_reward", registry)
        self.items = Counter("rlhf_reward_scored_items_total", "Items scored", registry=registry)
        self.truncated = Counter("rlhf_reward_truncated_items_total", "Items truncated to the model limit",
                                 registry=registry)
        self.http_requests = Counter("rlhf_reward_http_requests_total", "REST requests by route and HTTP status",
                                     ["route", "status"], registry=registry)
        self.http_latency = Histogram("rlhf_reward_http_request_seconds", "REST request latency", ["route"],
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("rlhf_reward_batch_items", "Items per model forward pass (dynamic batching)",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.batch_seconds = Histogram("rlhf_reward_batch_seconds", "Seconds per model forward pass",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("rlhf_reward_queue_wait_seconds", "Seconds a request waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.queued_items = Gauge("rlhf_reward_queued_items", "Items waiting to be scored", registry=registry)
        self.swaps = Counter("rlhf_reward_model_swaps_total", "Reward-model updates by outcome",
                             ["outcome"], registry=registry)
        self.swap_seconds = Histogram("rlhf_reward_model_swap_seconds",
                                      "Seconds from WeightUpdate received to serving the new model",
                                      buckets=SYNC_BUCKETS, registry=registry)
        self.shadow_diff = Histogram("rlhf_reward_shadow_diff", "Live score minus shadow score, per item",
                                     buckets=REWARD_DIFF_BUCKETS, registry=registry)
        self.shadow_items = Counter("rlhf_reward_shadow_items_total", "Items scored by the shadow model, by outcome",
                                    ["outcome"], registry=registry)
        self.score_mean = Gauge("rlhf_reward_score_mean", "Running mean of live scores since the last swap",
                                registry=registry)
        self.score_std = Gauge("rlhf_reward_score_std", "Running std of live scores since the last swap",
                               registry=registry)
        self.score_count = Gauge("rlhf_reward_score_samples", "Live scores in the running statistics",
                                 registry=registry)


class ReferenceMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__("rlhf_reference", registry)
        self.tokens = Counter("rlhf_reference_scored_tokens_total", "Response tokens scored", registry=registry)
        self.version = Gauge("rlhf_reference_version", "Policy version the reference was taken from",
                             registry=registry)
        self.refreshes = Counter("rlhf_reference_refreshes_total", "Reference refreshes by trigger and outcome",
                                 ["trigger", "outcome"], registry=registry)


class TrainerMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__("rlhf_trainer", registry)
        self.step = Gauge("rlhf_trainer_step", "Optimisation steps done", registry=registry)
        self.version = Gauge("rlhf_trainer_published_version", "Last published weight version", registry=registry)
        self.reward_mean = Gauge("rlhf_trainer_reward_mean", "Mean reward of the last batch", registry=registry)
        self.reward_std = Gauge("rlhf_trainer_reward_std", "Reward std of the last batch", registry=registry)
        self.kl = Gauge("rlhf_trainer_kl_nats", "Mean per-token KL to the reference (k3), last batch",
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
        self.stale = Counter("rlhf_trainer_stale_rollouts_total", "Rollouts skipped for exceeding max staleness",
                             registry=registry)
        self.checkpoints = Counter("rlhf_trainer_checkpoints_total", "Training-state checkpoints saved",
                                   registry=registry)
        self.eval_win_rate = Gauge("rlhf_trainer_eval_win_rate",
                                   "Held-out win rate against the SFT policy, judged by the reward model",
                                   registry=registry)
        self.eval_kl = Gauge("rlhf_trainer_eval_kl_nats", "Held-out mean per-token KL to the reference",
                             registry=registry)
        self.eval_length = Gauge("rlhf_trainer_eval_response_length_mean", "Held-out mean answer length (tokens)",
                                 registry=registry)
        self.heldout_skipped = Counter("rlhf_trainer_heldout_rollouts_skipped_total",
                                       "Rollouts not trained on because their prompt is held out",
                                       registry=registry)
        self.rollouts = Counter("rlhf_trainer_rollouts_consumed_total", "Rollouts consumed", registry=registry)
        self.tokens = Counter("rlhf_trainer_trained_tokens_total", "Response tokens trained on", registry=registry)
        self.duplicates = Counter("rlhf_trainer_duplicate_rollouts_total", "Rollouts skipped as duplicates",
                                  registry=registry)
        self.phase_seconds = Histogram("rlhf_trainer_phase_seconds", "Step time by phase", ["phase"],
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.version_lag = Histogram("rlhf_trainer_rollout_version_lag",
                                     "Policy versions between a rollout's generation and its training step",
                                     buckets=LAG_BUCKETS, registry=registry)
