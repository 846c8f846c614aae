"""The trainer service's configuration (RLHF_TRAINER_*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from rlhf_common.algos.registry import ALGORITHMS, PREFERENCE_LOSSES
from rlhf_common.config import BaseConfig, ServerConfig, section, setting


@dataclass
class TrainerConfig(BaseConfig):
    """Trainer: consumes rollouts, scores them, updates the policy, publishes weights."""

    ENV: ClassVar[str] = "RLHF_TRAINER"
    server: ServerConfig = section(ServerConfig, port=50054, metrics_port=9104)
    model: str = setting("", "MODEL", "Path of the initial policy folder (version 0)")
    weight_store: str = setting("", "WEIGHT_STORE",
                                "Where published checkpoints and the training state are written: a directory, "
                                "file:// URL, or object-storage URL (s3://bucket/prefix; gs://, az:// with gcsfs, "
                                "adlfs installed)")
    keep_versions: int = setting(8, "KEEP_VERSIONS",
                                 "Published versions kept in the weight store; older ones are deleted (0 = keep all)")
    reward_addr: str = setting("127.0.0.1:50052", "REWARD_ADDR", "RewardService address")
    reference_addr: str = setting("127.0.0.1:50053", "REFERENCE_ADDR", "ReferenceService address")
    rpc_retry_s: float = setting(300.0, "RPC_RETRY_S",
                                 "How long transient reward/reference errors (UNAVAILABLE, DEADLINE_EXCEEDED, "
                                 "RESOURCE_EXHAUSTED) are retried with back-off before the trainer exits")
    tls_ca_file: str = setting("", "TLS_CA_FILE", "PEM CA that signs the reward and reference services' TLS "
                               "certificates (empty = plaintext gRPC)")
    algorithm: str = setting("grpo", "ALGORITHM",
                             f"Policy optimisation, a registered algorithm: {', '.join(ALGORITHMS.names())} "
                             "(ppo: value head + GAE)")
    groups_per_step: int = setting(2, "GROUPS_PER_STEP", "Prompt groups per optimisation step")
    learn_from: Literal["rollouts", "labels", "both"] = setting(
        "rollouts", "LEARN_FROM", "What the policy learns from: RL steps on rollouts, preference-loss steps on "
        "feedback pairs from rlhf.labels (A/B choices and edits), or both interleaved")
    label_step_every: int = setting(1, "LABEL_STEP_EVERY",
                                    "With 'both': one step on feedback pairs after every N steps on rollouts, "
                                    "when a batch of pairs is ready")
    preference_loss: str = setting("dpo", "PREFERENCE_LOSS", "Loss of the steps on feedback pairs, a registered "
                                   "preference loss (dpo, ipo); its reference log-probs come from the reference "
                                   "service")
    preference_beta: float = setting(0.1, "PREFERENCE_BETA", "beta of the preference loss")
    preference_batch: int = setting(8, "PREFERENCE_BATCH", "Feedback pairs per step")
    max_pair_tokens: int = setting(256, "MAX_PAIR_TOKENS", "Token limit of a feedback pair's prompt and each answer")
    reward_whiten: bool = setting(True, "REWARD_WHITEN",
                                  "Learn from rewards whitened with running statistics of the reward-model version in "
                                  "service (restarted when it changes), so a new reward scale does not jolt the "
                                  "policy; metrics show raw rewards")
    lr: float = setting(1e-4, "LR", "Adam learning rate")
    kl_beta: float = setting(0.05, "KL_BETA", "KL penalty weight (initial value when adaptive)")
    kl_target: float = setting(0.0, "KL_TARGET",
                               "Adaptive KL: per-token KL (nats) the controller steers to; 0 = fixed beta")
    kl_estimator: Literal["k1", "k2", "k3"] = setting(
        "k3", "KL_ESTIMATOR", "Per-token KL estimator, used in training and in the KL metrics and evaluation")
    kl_in: Literal["loss", "reward"] = setting("loss", "KL_IN",
                                               "Apply the KL penalty in the loss or fold it into the reward")
    clip_eps: float = setting(0.2, "CLIP_EPS", "PPO-style ratio clip")
    epochs: int = setting(1, "EPOCHS", "Passes over each batch")
    minibatch_size: int = setting(0, "MINIBATCH_SIZE", "Samples per minibatch (0 = whole batch)")
    gamma: float = setting(1.0, "GAMMA", "PPO discount")
    lam: float = setting(0.95, "LAMBDA", "PPO GAE lambda")
    vf_coef: float = setting(0.1, "VF_COEF", "PPO value-loss weight")
    entropy_coef: float = setting(0.0, "ENTROPY_COEF", "Entropy bonus weight")
    is_cap: float = setting(2.0, "IS_CAP", "Truncated importance-sampling cap (behaviour vs trainer)")
    max_staleness: int = setting(4, "MAX_STALENESS",
                                 "Skip rollout groups more than this many versions old (counted in a metric)")
    max_grad_norm: float = setting(1.0, "MAX_GRAD_NORM", "Gradient clipping norm")
    lora_rank: int = setting(0, "LORA_RANK",
                             "Train a LoRA adapter of this rank and publish adapter-only updates (0 = full weights)")
    lora_alpha: float = setting(16.0, "LORA_ALPHA", "LoRA alpha (scale = alpha / rank)")
    lora_targets: str = setting("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "LORA_TARGETS",
                                "Comma-separated module names the adapter wraps")
    max_steps: int = setting(0, "MAX_STEPS", "Stop consuming after this many steps (0 = no limit)")
    eval_prompts: str = setting("", "EVAL_PROMPTS",
                                "Held-out prompts (one per line, or JSONL with 'prompt'); never trained on")
    eval_every: int = setting(0, "EVAL_EVERY", "Evaluate every N steps (0 = never)")
    eval_max_tokens: int = setting(32, "EVAL_MAX_TOKENS", "New tokens per evaluation answer")
    checkpoint_every: int = setting(
        50, "CHECKPOINT_EVERY", "Save the full training state (weights in full precision, optimizer, offsets) every N "
        "steps; weights are published every step. A crash costs the steps since the last state (they are trained "
        "again from the same rollouts)")
    checkpoint_every_s: float = setting(300.0, "CHECKPOINT_EVERY_S",
                                        "Also save it when this many seconds have passed since the last one (0 = off)")
    checkpoint_idle_s: float = setting(
        10.0, "CHECKPOINT_IDLE_S", "Also save it when no batch has been ready for this many seconds after a step, so an "
        "idle trainer loses nothing (0 = off); and always when the service stops")
    publish_dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "PUBLISH_DTYPE", "dtype of the full weights published every step (auto: the initial model's own "
        "dtype, which the policy serves); training stays in float32")
    keep_checkpoints: int = setting(2, "KEEP_CHECKPOINTS", "Training-state checkpoints kept")
    model_name: str = setting("policy", "MODEL_NAME", "Model name in published WeightUpdate records")
    group_id: str = setting("rlhf-trainer", "GROUP_ID", "Kafka consumer group (offsets are committed here)")
    torch_threads: int = setting(0, "TORCH_THREADS", "torch intra-op threads (0 = one per core)")
    seed: int = setting(0, "SEED", "torch seed")

    def validate(self) -> None:
        self.check(bool(self.model), "model", "must name a model folder")
        self.check(bool(self.weight_store), "weight_store", "must name a directory")
        self.check(self.rpc_retry_s >= 0, "rpc_retry_s", "must be >= 0")
        self.check_file("tls_ca_file")
        self.check(self.algorithm in ALGORITHMS.names(), "algorithm", f"must be one of {ALGORITHMS.names()}")
        self.check(self.groups_per_step >= 1, "groups_per_step", "must be >= 1")
        self.check(self.label_step_every >= 1, "label_step_every", "must be >= 1")
        self.check(self.preference_loss in PREFERENCE_LOSSES.names(), "preference_loss",
                   f"must be one of {PREFERENCE_LOSSES.names()}")
        self.check(self.preference_beta > 0, "preference_beta", "must be > 0")
        self.check(self.preference_batch >= 1, "preference_batch", "must be >= 1")
        self.check(self.max_pair_tokens >= 8, "max_pair_tokens", "must be >= 8")
        self.check(self.lr > 0, "lr", "must be > 0")
        self.check(self.kl_beta >= 0, "kl_beta", "must be >= 0")
        self.check(0 < self.clip_eps < 1, "clip_eps", "must be in (0, 1)")
        self.check(self.kl_target >= 0, "kl_target", "must be >= 0 (0 = fixed beta)")
        self.check(self.epochs >= 1, "epochs", "must be >= 1")
        self.check(self.minibatch_size >= 0, "minibatch_size", "must be >= 0")
        self.check(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        self.check(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        self.check(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        self.check(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        self.check(self.is_cap >= 1, "is_cap", "must be >= 1")
        self.check(self.max_staleness >= 0, "max_staleness", "must be >= 0")
        self.check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        self.check(self.keep_versions >= 0, "keep_versions", "must be >= 0")
        self.check(self.lora_rank >= 0, "lora_rank", "must be >= 0")
        self.check(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        self.check(not self.lora_rank or bool(self.lora_targets.strip(",")), "lora_targets",
                   "must name at least one module when LoRA is on")
        self.check(self.eval_every >= 0, "eval_every", "must be >= 0")
        self.check(not self.eval_every or bool(self.eval_prompts), "eval_every",
                   f"needs {self.env_of('eval_prompts')}")
        self.check(self.eval_max_tokens >= 1, "eval_max_tokens", "must be >= 1")
        self.check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        self.check(self.checkpoint_every_s >= 0, "checkpoint_every_s", "must be >= 0")
        self.check(self.checkpoint_idle_s >= 0, "checkpoint_idle_s", "must be >= 0")
        self.check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        self.check(self.max_steps >= 0, "max_steps", "must be >= 0")
        self.check(self.torch_threads >= 0, "torch_threads", "must be >= 0")
        for name in ("reward_addr", "reference_addr"):
            self.check(":" in getattr(self, name), name, "must be host:port")
