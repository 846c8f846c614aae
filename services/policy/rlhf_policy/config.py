"""The policy service's configuration (RLHF_POLICY_*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from rlhf_common import envs
from rlhf_common.config import BaseConfig, ServerConfig, partition_list, section, setting


@dataclass
class PolicyConfig(BaseConfig):
    """Policy service: vLLM generation, rollout worker, weight-update consumer."""

    ENV: ClassVar[str] = "RLHF_POLICY"
    server: ServerConfig = section(ServerConfig, port=50051, metrics_port=9101)
    model: str = setting("", "MODEL", "Path of the initial (version 0) HF model folder")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = setting("auto", "DTYPE", "Weights dtype")
    max_model_len: int = setting(512, "MAX_MODEL_LEN", "Context length given to vLLM")
    kv_cache_gib: int = setting(1, "KV_CACHE_GIB",
                                "KV-cache size on CPU (GiB); an existing VLLM_CPU_KVCACHE_SPACE must agree")
    max_tokens: int = setting(32, "MAX_TOKENS", "Default max new tokens per completion")
    rollout_n: int = setting(4, "ROLLOUT_N", "Samples per prompt in the rollout worker (GRPO group)")
    rollout_temperature: float = setting(1.0, "ROLLOUT_TEMPERATURE", "Sampling temperature of rollouts")
    rollout_enabled: bool = setting(True, "ROLLOUT_ENABLED", "Run the rollout worker")
    rollout_partitions: str = setting("", "ROLLOUT_PARTITIONS",
                                      "Partitions of rlhf.prompts this replica's rollout worker reads, comma-separated "
                                      "(empty = all); replicas must cover every partition exactly once")
    max_groups_ahead: int = setting(4, "MAX_GROUPS_AHEAD",
                                    "Back-pressure: the worker stops taking prompts while it is this many groups "
                                    "ahead of what the trainer reports consumed")
    model_name: str = setting("policy", "MODEL_NAME", "Name of the model in rlhf.weights records")
    record_generations: bool = setting(True, "RECORD_GENERATIONS",
                                       "Write every answer served through the API to rlhf.generations")
    seed: int = setting(0, "SEED", "vLLM seed")
    max_prompt_chars: int = setting(65536, "MAX_PROMPT_CHARS",
                                    "Most characters of an API prompt (or all its messages), refused before "
                                    "tokenizing so one request cannot hold the tokenizer")
    max_in_flight: int = setting(256, "MAX_IN_FLIGHT",
                                 "API requests in flight at most; more are refused with RESOURCE_EXHAUSTED "
                                 "(rollouts are paced, not limited)")
    lora_preload: bool = setting(False, "LORA_PRELOAD",
                                 "Read the base weights that LoRA adapters merge onto at start, so the first "
                                 "adapter update is as fast as later ones (costs one more copy of the weights)")
    weights_fetch_wait_ms: int = setting(50, "WEIGHTS_FETCH_WAIT_MS",
                                         "Longest the broker holds a fetch of rlhf.weights open; bounds how late "
                                         "a weight update is seen")
    update_timeout_s: float = setting(600.0, "UPDATE_TIMEOUT_S",
                                      "Longest one weight update may take; past it the service stops (exit 1) "
                                      "so that its supervisor restarts it")

    def validate(self) -> None:
        self.check(bool(self.model), "model", "must name a model folder")
        self.check(self.max_prompt_chars >= 1, "max_prompt_chars", "must be >= 1")
        try:
            partition_list(self.rollout_partitions)
        except ValueError:
            self.check(False, "rollout_partitions", "must be empty or comma-separated partition numbers")
        self.check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        self.check(self.max_tokens < self.max_model_len, "max_tokens",
                   f"must be below {self.env_of('max_model_len')}={self.max_model_len}")
        self.check(self.rollout_n >= 1, "rollout_n", "must be >= 1")
        self.check(self.rollout_temperature > 0, "rollout_temperature", "must be > 0 (rollouts are sampled)")
        self.check(self.max_groups_ahead >= 1, "max_groups_ahead", "must be >= 1")
        self.check(self.kv_cache_gib >= 1, "kv_cache_gib", "must be >= 1")
        vllm_kv = envs.get("VLLM_CPU_KVCACHE_SPACE")
        self.check(vllm_kv is None or vllm_kv.strip() == str(self.kv_cache_gib), "kv_cache_gib",
                   f"disagrees with VLLM_CPU_KVCACHE_SPACE={vllm_kv!r}, which vLLM reads; set one of them")
        self.check(self.max_in_flight >= 1, "max_in_flight", "must be >= 1")
        self.check(1 <= self.weights_fetch_wait_ms <= 10_000, "weights_fetch_wait_ms", "must be in [1, 10000]")
        self.check(self.update_timeout_s > 0, "update_timeout_s", "must be > 0")
