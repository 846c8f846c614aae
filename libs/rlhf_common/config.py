"""Typed configuration: one dataclass per service, from env vars and command-line flags.

Each field names its environment variable in its metadata. Precedence: flag > env var >
default. Validation runs in ``__post_init__`` and raises ``ConfigError`` that shows the
bad value and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin

from . import envs


class ConfigError(ValueError):
    pass


def _f(default, env: str, help: str, **kw):
    return field(default=default, metadata={"env": env, "help": help, **kw})


def _parse(raw: str, typ, name: str):
    origin = get_origin(typ)
    try:
        if origin is Literal:
            if raw not in get_args(typ):
                raise ValueError(f"must be one of {list(get_args(typ))}")
            return raw
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("must be a boolean (true/false)")
        return typ(raw)
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r}: {e}") from None


def _check(cond: bool, name: str, value, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {rule}")


class _Base:
    @classmethod
    def load(cls, argv: list[str] | None = None, **overrides):
        """Build from defaults, then env vars, then flags, then keyword overrides."""
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            raw = envs.get(f.metadata["env"])
            if raw is not None:
                values[f.name] = _parse(raw, hints[f.name], f.metadata["env"])
        if argv is not None:
            parser = argparse.ArgumentParser(description=cls.__doc__)
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                parser.add_argument(
                    "--" + f.name.replace("_", "-"),
                    dest=f.name,
                    default=None,
                    help=f"{f.metadata['help']} (env {f.metadata['env']}, default {f.default!r})",
                )
            ns = parser.parse_args(argv)
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                raw = getattr(ns, f.name)
                if raw is not None:
                    values[f.name] = _parse(raw, hints[f.name], "--" + f.name.replace("_", "-"))
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The env vars that reproduce this config (used to launch service processes)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.metadata["env"]] = str(v).lower() if isinstance(v, bool) else str(v)
        return out


def _check_port(name: str, port: int) -> None:
    _check(0 <= port <= 65535, name, port, "must be a TCP port in 0..65535")


@dataclass
class BusConfig(_Base):
    """Kafka connection shared by every service."""

    bootstrap: str = _f("127.0.0.1:9092", "RLHF_KAFKA_BOOTSTRAP", "Kafka bootstrap servers, host:port[,host:port]")
    topic_prefix: str = _f("rlhf", "RLHF_TOPIC_PREFIX", "Prefix of every topic name")
    partitions: int = _f(1, "RLHF_TOPIC_PARTITIONS", "Partitions of topics created by the services")

    def __post_init__(self):
        _check(":" in self.bootstrap, "RLHF_KAFKA_BOOTSTRAP", self.bootstrap, "must be host:port")
        _check(self.partitions >= 1, "RLHF_TOPIC_PARTITIONS", self.partitions, "must be >= 1")
        _check(bool(self.topic_prefix) and "." not in self.topic_prefix, "RLHF_TOPIC_PREFIX", self.topic_prefix,
               "must be a non-empty name without dots")


@dataclass
class PolicyConfig(_Base):
    """Policy service: vLLM generation, rollout worker, weight-update consumer."""

    model: str = _f("", "RLHF_POLICY_MODEL", "Path of the initial (version 0) HF model folder")
    host: str = _f("127.0.0.1", "RLHF_POLICY_HOST", "gRPC bind address")
    port: int = _f(50051, "RLHF_POLICY_PORT", "gRPC port")
    metrics_port: int = _f(9101, "RLHF_POLICY_METRICS_PORT", "Prometheus /metrics port (0 = off)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _f("auto", "RLHF_POLICY_DTYPE", "Weights dtype")
    max_model_len: int = _f(512, "RLHF_POLICY_MAX_MODEL_LEN", "Context length given to vLLM")
    kv_cache_gib: int = _f(1, "RLHF_POLICY_KV_CACHE_GIB", "KV-cache size on CPU (GiB)")
    max_tokens: int = _f(32, "RLHF_POLICY_MAX_TOKENS", "Default max new tokens per completion")
    rollout_n: int = _f(4, "RLHF_POLICY_ROLLOUT_N", "Samples per prompt in the rollout worker (GRPO group)")
    rollout_temperature: float = _f(1.0, "RLHF_POLICY_ROLLOUT_TEMPERATURE", "Sampling temperature of rollouts")
    rollout_enabled: bool = _f(True, "RLHF_POLICY_ROLLOUT_ENABLED", "Run the rollout worker")
    max_groups_ahead: int = _f(4, "RLHF_POLICY_MAX_GROUPS_AHEAD",
                               "Back-pressure: the worker stops taking prompts while it is this many groups "
                               "ahead of what the trainer reports consumed")
    model_name: str = _f("policy", "RLHF_POLICY_MODEL_NAME", "Name of the model in rlhf.weights records")
    record_generations: bool = _f(True, "RLHF_POLICY_RECORD_GENERATIONS",
                                  "Write every answer served through the API to rlhf.generations")
    seed: int = _f(0, "RLHF_POLICY_SEED", "vLLM seed")
    max_in_flight: int = _f(256, "RLHF_POLICY_MAX_IN_FLIGHT",
                            "API requests in flight at most; more are refused with RESOURCE_EXHAUSTED "
                            "(rollouts are paced, not limited)")
    lora_preload: bool = _f(False, "RLHF_POLICY_LORA_PRELOAD",
                            "Read the base weights that LoRA adapters merge onto at start, so the first "
                            "adapter update is as fast as later ones (costs one more copy of the weights)")
    weights_fetch_wait_ms: int = _f(50, "RLHF_POLICY_WEIGHTS_FETCH_WAIT_MS",
                                    "Longest the broker holds a fetch of rlhf.weights open; bounds how late "
                                    "a weight update is seen")

    def __post_init__(self):
        _check(bool(self.model), "RLHF_POLICY_MODEL", self.model, "must name a model folder")
        _check_port("RLHF_POLICY_PORT", self.port)
        _check_port("RLHF_POLICY_METRICS_PORT", self.metrics_port)
        _check(self.max_tokens >= 1, "RLHF_POLICY_MAX_TOKENS", self.max_tokens, "must be >= 1")
        _check(self.max_tokens < self.max_model_len, "RLHF_POLICY_MAX_TOKENS", self.max_tokens,
               f"must be below RLHF_POLICY_MAX_MODEL_LEN={self.max_model_len}")
        _check(self.rollout_n >= 1, "RLHF_POLICY_ROLLOUT_N", self.rollout_n, "must be >= 1")
        _check(self.rollout_temperature > 0, "RLHF_POLICY_ROLLOUT_TEMPERATURE", self.rollout_temperature,
               "must be > 0 (rollouts are sampled)")
        _check(self.max_groups_ahead >= 1, "RLHF_POLICY_MAX_GROUPS_AHEAD", self.max_groups_ahead, "must be >= 1")
        _check(self.kv_cache_gib >= 1, "RLHF_POLICY_KV_CACHE_GIB", self.kv_cache_gib, "must be >= 1")
        _check(self.max_in_flight >= 1, "RLHF_POLICY_MAX_IN_FLIGHT", self.max_in_flight, "must be >= 1")
        _check(1 <= self.weights_fetch_wait_ms <= 10_000, "RLHF_POLICY_WEIGHTS_FETCH_WAIT_MS",
               self.weights_fetch_wait_ms, "must be in [1, 10000]")


@dataclass
class RewardConfig(_Base):
    """Reward service: a sequence-classification model with one logit, over gRPC and REST."""

    model: str = _f("", "RLHF_REWARD_MODEL", "Path of the reward model folder")
    host: str = _f("127.0.0.1", "RLHF_REWARD_HOST", "gRPC and REST bind address")
    port: int = _f(50052, "RLHF_REWARD_PORT", "gRPC port")
    http_port: int = _f(8002, "RLHF_REWARD_HTTP_PORT", "REST (FastAPI) port; 0 = no REST server")
    metrics_port: int = _f(9102, "RLHF_REWARD_METRICS_PORT", "Prometheus /metrics port (0 = off)")
    max_length: int = _f(512, "RLHF_REWARD_MAX_LENGTH",
                         "Token limit (capped at the model's own); longer inputs are truncated and flagged")
    max_batch_items: int = _f(256, "RLHF_REWARD_MAX_BATCH_ITEMS", "Most items in one Score request")
    max_batch_size: int = _f(32, "RLHF_REWARD_MAX_BATCH_SIZE",
                             "Dynamic batching: most items in one model forward pass, across requests")
    max_wait_ms: float = _f(5.0, "RLHF_REWARD_MAX_WAIT_MS",
                            "Dynamic batching: longest a request waits for others to join its batch")
    max_queue_items: int = _f(4096, "RLHF_REWARD_MAX_QUEUE_ITEMS",
                              "Items waiting to be scored before new requests are refused as overloaded")
    max_body_bytes: int = _f(1 << 20, "RLHF_REWARD_MAX_BODY_BYTES",
                             "REST: largest request body accepted; larger ones get 413")
    api_keys: str = field(default="", repr=False, metadata={
        "env": "RLHF_REWARD_API_KEYS",
        "help": "Comma-separated API keys; when set, REST needs 'Authorization: Bearer <key>' and gRPC the "
                "same 'authorization' metadata (health and /metrics stay open)"})
    shadow_model: str = _f("", "RLHF_REWARD_SHADOW_MODEL",
                           "Optional second model folder scored beside the live one, for comparison only")
    model_name: str = _f("reward", "RLHF_REWARD_MODEL_NAME", "Name of the model in rlhf.weights records")
    subscribe_weights: bool = _f(True, "RLHF_REWARD_SUBSCRIBE_WEIGHTS",
                                 "Hot-swap to newer versions announced on rlhf.weights")
    torch_threads: int = _f(1, "RLHF_REWARD_TORCH_THREADS", "torch intra-op threads")

    def __post_init__(self):
        _check(bool(self.model), "RLHF_REWARD_MODEL", self.model, "must name a model folder")
        _check_port("RLHF_REWARD_PORT", self.port)
        _check_port("RLHF_REWARD_HTTP_PORT", self.http_port)
        _check_port("RLHF_REWARD_METRICS_PORT", self.metrics_port)
        _check(self.max_length >= 8, "RLHF_REWARD_MAX_LENGTH", self.max_length, "must be >= 8")
        _check(self.max_batch_items >= 1, "RLHF_REWARD_MAX_BATCH_ITEMS", self.max_batch_items, "must be >= 1")
        _check(self.max_batch_size >= 1, "RLHF_REWARD_MAX_BATCH_SIZE", self.max_batch_size, "must be >= 1")
        _check(0 <= self.max_wait_ms <= 1000, "RLHF_REWARD_MAX_WAIT_MS", self.max_wait_ms, "must be in [0, 1000]")
        _check(self.max_queue_items >= self.max_batch_items, "RLHF_REWARD_MAX_QUEUE_ITEMS", self.max_queue_items,
               f"must be >= RLHF_REWARD_MAX_BATCH_ITEMS={self.max_batch_items}")
        _check(self.max_body_bytes >= 1024, "RLHF_REWARD_MAX_BODY_BYTES", self.max_body_bytes, "must be >= 1024")
        _check(bool(self.model_name), "RLHF_REWARD_MODEL_NAME", self.model_name, "must not be empty")
        _check(self.torch_threads >= 1, "RLHF_REWARD_TORCH_THREADS", self.torch_threads, "must be >= 1")
        for k in self.api_key_list:
            # The key itself is never shown, only its position.
            _check(len(k) >= 8 and k.isprintable() and " " not in k, "RLHF_REWARD_API_KEYS",
                   f"<key #{self.api_key_list.index(k) + 1} of {len(self.api_key_list)}>",
                   "every key must be at least 8 printable characters without spaces")

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


@dataclass
class ReferenceConfig(_Base):
    """Reference service: frozen log-probs of the initial policy."""

    model: str = _f("", "RLHF_REFERENCE_MODEL", "Path of the reference model folder")
    host: str = _f("127.0.0.1", "RLHF_REFERENCE_HOST", "gRPC bind address")
    port: int = _f(50053, "RLHF_REFERENCE_PORT", "gRPC port")
    metrics_port: int = _f(9103, "RLHF_REFERENCE_METRICS_PORT", "Prometheus /metrics port (0 = off)")
    max_batch_items: int = _f(256, "RLHF_REFERENCE_MAX_BATCH_ITEMS", "Most items in one LogProbs request")
    torch_threads: int = _f(1, "RLHF_REFERENCE_TORCH_THREADS", "torch intra-op threads")
    subscribe: bool = _f(True, "RLHF_REFERENCE_SUBSCRIBE",
                         "Follow rlhf.weights (refresh events; needs Kafka at RLHF_KAFKA_BOOTSTRAP)")
    refresh_every: int = _f(0, "RLHF_REFERENCE_REFRESH_EVERY",
                            "Move to the newest policy weights once they are this many versions ahead (0 = never)")
    policy_model_name: str = _f("policy", "RLHF_REFERENCE_POLICY_MODEL_NAME", "Policy name in rlhf.weights")

    def __post_init__(self):
        _check(bool(self.model), "RLHF_REFERENCE_MODEL", self.model, "must name a model folder")
        _check(self.refresh_every >= 0, "RLHF_REFERENCE_REFRESH_EVERY", self.refresh_every, "must be >= 0")
        _check_port("RLHF_REFERENCE_PORT", self.port)
        _check_port("RLHF_REFERENCE_METRICS_PORT", self.metrics_port)
        _check(self.max_batch_items >= 1, "RLHF_REFERENCE_MAX_BATCH_ITEMS", self.max_batch_items, "must be >= 1")
        _check(self.torch_threads >= 1, "RLHF_REFERENCE_TORCH_THREADS", self.torch_threads, "must be >= 1")


@dataclass
class TrainerConfig(_Base):
    """Trainer: consumes rollouts, scores them, updates the policy, publishes weights."""

    model: str = _f("", "RLHF_TRAINER_MODEL", "Path of the initial policy folder (version 0)")
    weight_store: str = _f("", "RLHF_TRAINER_WEIGHT_STORE", "Directory where published checkpoints are written")
    keep_versions: int = _f(8, "RLHF_TRAINER_KEEP_VERSIONS",
                            "Published versions kept in the weight store; older ones are deleted (0 = keep all)")
    host: str = _f("127.0.0.1", "RLHF_TRAINER_HOST", "gRPC bind address")
    port: int = _f(50054, "RLHF_TRAINER_PORT", "gRPC port")
    metrics_port: int = _f(9104, "RLHF_TRAINER_METRICS_PORT", "Prometheus /metrics port (0 = off)")
    reward_addr: str = _f("127.0.0.1:50052", "RLHF_TRAINER_REWARD_ADDR", "RewardService address")
    reference_addr: str = _f("127.0.0.1:50053", "RLHF_TRAINER_REFERENCE_ADDR", "ReferenceService address")
    algorithm: Literal["grpo", "rloo", "ppo"] = _f("grpo", "RLHF_TRAINER_ALGORITHM",
                                                   "Policy optimisation: grpo, rloo or ppo (value head + GAE)")
    groups_per_step: int = _f(2, "RLHF_TRAINER_GROUPS_PER_STEP", "Prompt groups per optimisation step")
    lr: float = _f(1e-4, "RLHF_TRAINER_LR", "Adam learning rate")
    kl_beta: float = _f(0.05, "RLHF_TRAINER_KL_BETA", "KL penalty weight (initial value when adaptive)")
    kl_target: float = _f(0.0, "RLHF_TRAINER_KL_TARGET",
                          "Adaptive KL: per-token KL (nats) the controller steers to; 0 = fixed beta")
    kl_estimator: Literal["k1", "k2", "k3"] = _f("k3", "RLHF_TRAINER_KL_ESTIMATOR", "Per-token KL estimator")
    kl_in: Literal["loss", "reward"] = _f("loss", "RLHF_TRAINER_KL_IN",
                                          "Apply the KL penalty in the loss or fold it into the reward")
    clip_eps: float = _f(0.2, "RLHF_TRAINER_CLIP_EPS", "PPO-style ratio clip")
    epochs: int = _f(1, "RLHF_TRAINER_EPOCHS", "Passes over each batch")
    minibatch_size: int = _f(0, "RLHF_TRAINER_MINIBATCH_SIZE", "Samples per minibatch (0 = whole batch)")
    gamma: float = _f(1.0, "RLHF_TRAINER_GAMMA", "PPO discount")
    lam: float = _f(0.95, "RLHF_TRAINER_LAMBDA", "PPO GAE lambda")
    vf_coef: float = _f(0.1, "RLHF_TRAINER_VF_COEF", "PPO value-loss weight")
    entropy_coef: float = _f(0.0, "RLHF_TRAINER_ENTROPY_COEF", "Entropy bonus weight")
    is_cap: float = _f(2.0, "RLHF_TRAINER_IS_CAP", "Truncated importance-sampling cap (behaviour vs trainer)")
    max_staleness: int = _f(4, "RLHF_TRAINER_MAX_STALENESS",
                            "Skip rollout groups more than this many versions old (counted in a metric)")
    max_grad_norm: float = _f(1.0, "RLHF_TRAINER_MAX_GRAD_NORM", "Gradient clipping norm")
    lora_rank: int = _f(0, "RLHF_TRAINER_LORA_RANK",
                        "Train a LoRA adapter of this rank and publish adapter-only updates (0 = full weights)")
    lora_alpha: float = _f(16.0, "RLHF_TRAINER_LORA_ALPHA", "LoRA alpha (scale = alpha / rank)")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "RLHF_TRAINER_LORA_TARGETS",
                           "Comma-separated module names the adapter wraps")
    max_steps: int = _f(0, "RLHF_TRAINER_MAX_STEPS", "Stop consuming after this many steps (0 = no limit)")
    eval_prompts: str = _f("", "RLHF_TRAINER_EVAL_PROMPTS",
                           "Held-out prompts (one per line, or JSONL with 'prompt'); never trained on")
    eval_every: int = _f(0, "RLHF_TRAINER_EVAL_EVERY", "Evaluate every N steps (0 = never)")
    eval_max_tokens: int = _f(32, "RLHF_TRAINER_EVAL_MAX_TOKENS", "New tokens per evaluation answer")
    checkpoint_every: int = _f(1, "RLHF_TRAINER_CHECKPOINT_EVERY",
                               "Save the full training state every N steps (weights are published every step)")
    keep_checkpoints: int = _f(2, "RLHF_TRAINER_KEEP_CHECKPOINTS", "Training-state checkpoints kept")
    model_name: str = _f("policy", "RLHF_TRAINER_MODEL_NAME", "Model name in published WeightUpdate records")
    group_id: str = _f("rlhf-trainer", "RLHF_TRAINER_GROUP_ID", "Kafka consumer group (offsets are committed here)")
    torch_threads: int = _f(1, "RLHF_TRAINER_TORCH_THREADS", "torch intra-op threads")
    seed: int = _f(0, "RLHF_TRAINER_SEED", "torch seed")

    def __post_init__(self):
        _check(bool(self.model), "RLHF_TRAINER_MODEL", self.model, "must name a model folder")
        _check(bool(self.weight_store), "RLHF_TRAINER_WEIGHT_STORE", self.weight_store, "must name a directory")
        _check_port("RLHF_TRAINER_PORT", self.port)
        _check_port("RLHF_TRAINER_METRICS_PORT", self.metrics_port)
        _check(self.groups_per_step >= 1, "RLHF_TRAINER_GROUPS_PER_STEP", self.groups_per_step, "must be >= 1")
        _check(self.lr > 0, "RLHF_TRAINER_LR", self.lr, "must be > 0")
        _check(self.kl_beta >= 0, "RLHF_TRAINER_KL_BETA", self.kl_beta, "must be >= 0")
        _check(0 < self.clip_eps < 1, "RLHF_TRAINER_CLIP_EPS", self.clip_eps, "must be in (0, 1)")
        _check(self.kl_target >= 0, "RLHF_TRAINER_KL_TARGET", self.kl_target, "must be >= 0 (0 = fixed beta)")
        _check(self.epochs >= 1, "RLHF_TRAINER_EPOCHS", self.epochs, "must be >= 1")
        _check(self.minibatch_size >= 0, "RLHF_TRAINER_MINIBATCH_SIZE", self.minibatch_size, "must be >= 0")
        _check(0 < self.gamma <= 1, "RLHF_TRAINER_GAMMA", self.gamma, "must be in (0, 1]")
        _check(0 <= self.lam <= 1, "RLHF_TRAINER_LAMBDA", self.lam, "must be in [0, 1]")
        _check(self.vf_coef >= 0, "RLHF_TRAINER_VF_COEF", self.vf_coef, "must be >= 0")
        _check(self.entropy_coef >= 0, "RLHF_TRAINER_ENTROPY_COEF", self.entropy_coef, "must be >= 0")
        _check(self.is_cap >= 1, "RLHF_TRAINER_IS_CAP", self.is_cap, "must be >= 1")
        _check(self.max_staleness >= 0, "RLHF_TRAINER_MAX_STALENESS", self.max_staleness, "must be >= 0")
        _check(self.max_grad_norm > 0, "RLHF_TRAINER_MAX_GRAD_NORM", self.max_grad_norm, "must be > 0")
        _check(self.keep_versions >= 0, "RLHF_TRAINER_KEEP_VERSIONS", self.keep_versions, "must be >= 0")
        _check(self.lora_rank >= 0, "RLHF_TRAINER_LORA_RANK", self.lora_rank, "must be >= 0")
        _check(self.lora_alpha > 0, "RLHF_TRAINER_LORA_ALPHA", self.lora_alpha, "must be > 0")
        _check(not self.lora_rank or bool(self.lora_targets.strip(",")), "RLHF_TRAINER_LORA_TARGETS",
               self.lora_targets, "must name at least one module when LoRA is on")
        _check(self.eval_every >= 0, "RLHF_TRAINER_EVAL_EVERY", self.eval_every, "must be >= 0")
        _check(not self.eval_every or bool(self.eval_prompts), "RLHF_TRAINER_EVAL_EVERY", self.eval_every,
               "needs RLHF_TRAINER_EVAL_PROMPTS")
        _check(self.eval_max_tokens >= 1, "RLHF_TRAINER_EVAL_MAX_TOKENS", self.eval_max_tokens, "must be >= 1")
        _check(self.checkpoint_every >= 1, "RLHF_TRAINER_CHECKPOINT_EVERY", self.checkpoint_every, "must be >= 1")
        _check(self.keep_versions == 0 or self.keep_versions > self.checkpoint_every, "RLHF_TRAINER_KEEP_VERSIONS",
               self.keep_versions, f"must be 0 or above RLHF_TRAINER_CHECKPOINT_EVERY={self.checkpoint_every}, "
               "so the weights a checkpoint names are never pruned")
        _check(self.keep_checkpoints >= 1, "RLHF_TRAINER_KEEP_CHECKPOINTS", self.keep_checkpoints, "must be >= 1")
        _check(self.max_steps >= 0, "RLHF_TRAINER_MAX_STEPS", self.max_steps, "must be >= 0")
        _check(self.torch_threads >= 1, "RLHF_TRAINER_TORCH_THREADS", self.torch_threads, "must be >= 1")
        for name, addr in (("RLHF_TRAINER_REWARD_ADDR", self.reward_addr),
                           ("RLHF_TRAINER_REFERENCE_ADDR", self.reference_addr)):
            _check(":" in addr, name, addr, "must be host:port")


ALL_CONFIGS = (BusConfig, PolicyConfig, RewardConfig, ReferenceConfig, TrainerConfig)


def markdown_table() -> str:
    """Every setting of every service as a Markdown table (README's configuration section)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for cls in ALL_CONFIGS:
        rows.append(f"| **{cls.__name__}** | | {(cls.__doc__ or '').strip()} |")
        for f in dataclasses.fields(cls):
            default = "(none)" if f.default == "" else f"`{str(f.default).lower() if isinstance(f.default, bool) else f.default}`"
            rows.append(f"| `{f.metadata['env']}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
