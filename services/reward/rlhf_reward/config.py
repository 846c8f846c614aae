"""The reward service's configuration (RLHF_REWARD_*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf_common.auth import KEY_RULE, bad_key, parse_keys
from rlhf_common.config import BaseConfig, ServerConfig, section, setting


@dataclass
class RewardConfig(BaseConfig):
    """Reward service: a sequence-classification model with one logit, over gRPC and REST."""

    ENV: ClassVar[str] = "RLHF_REWARD"
    server: ServerConfig = section(ServerConfig, port=50052, metrics_port=9102)
    model: str = setting("", "MODEL", "Path of the reward model folder")
    http_port: int = setting(8002, "HTTP_PORT", "REST (FastAPI) port; 0 = no REST server")
    max_length: int = setting(512, "MAX_LENGTH",
                              "Token limit (capped at the model's own); longer inputs are truncated and flagged")
    packed: bool = setting(True, "PACKED",
                           "Run BERT-family models on packed tokens: the same scores, no padding computed in the "
                           "dense layers, one forward pass per batch; false = padded passes of similar length")
    max_batch_items: int = setting(256, "MAX_BATCH_ITEMS", "Most items in one Score request")
    max_batch_size: int = setting(32, "MAX_BATCH_SIZE",
                                  "Dynamic batching: most items in one model forward pass, across requests")
    max_wait_ms: float = setting(5.0, "MAX_WAIT_MS",
                                 "Dynamic batching: longest a request waits for others to join its batch")
    max_queue_items: int = setting(4096, "MAX_QUEUE_ITEMS",
                                   "Items waiting to be scored before new requests are refused as overloaded")
    max_body_bytes: int = setting(1 << 20, "MAX_BODY_BYTES",
                                  "Largest request accepted, in bytes: a REST body (413 beyond) or a gRPC message "
                                  "(RESOURCE_EXHAUSTED beyond)")
    max_item_chars: int = setting(16384, "MAX_ITEM_CHARS",
                                  "Most characters of prompt and response in one item, refused before tokenizing")
    max_request_tokens: int = setting(65536, "MAX_REQUEST_TOKENS",
                                      "Most tokens of one request after truncation (all its items together)")
    api_keys: str = setting("", "API_KEYS",
                            "Comma-separated API keys; when set, REST needs 'Authorization: Bearer <key>' and gRPC "
                            "the same 'authorization' metadata (health and /metrics stay open)", secret=True)
    shadow_model: str = setting("", "SHADOW_MODEL",
                                "Optional second model folder scored beside the live one, for comparison only")
    model_name: str = setting("reward", "MODEL_NAME", "Name of the model in rlhf.weights records")
    subscribe_weights: bool = setting(True, "SUBSCRIBE_WEIGHTS", "Hot-swap to newer versions announced on rlhf.weights")
    torch_threads: int = setting(1, "TORCH_THREADS", "torch intra-op threads of each model thread")
    model_workers: int = setting(1, "MODEL_WORKERS",
                                 "Model threads, each scoring its own batch; on a CPU, workers x torch threads = "
                                 "cores (several one-thread workers stall less when other threads share the cores)")

    def validate(self) -> None:
        self.check(bool(self.model), "model", "must name a model folder")
        self.check_port("http_port")
        self.check(self.max_length >= 8, "max_length", "must be >= 8")
        self.check(self.max_batch_items >= 1, "max_batch_items", "must be >= 1")
        self.check(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        self.check(0 <= self.max_wait_ms <= 1000, "max_wait_ms", "must be in [0, 1000]")
        self.check(self.max_queue_items >= self.max_batch_items, "max_queue_items",
                   f"must be >= {self.env_of('max_batch_items')}={self.max_batch_items}")
        self.check(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        self.check(self.max_item_chars >= 1, "max_item_chars", "must be >= 1")
        self.check(self.max_request_tokens >= self.max_length, "max_request_tokens",
                   f"must be >= {self.env_of('max_length')}={self.max_length}")
        self.check(bool(self.model_name), "model_name", "must not be empty")
        self.check(self.torch_threads >= 1, "torch_threads", "must be >= 1")
        self.check(self.model_workers >= 1, "model_workers", "must be >= 1")
        bad = bad_key(self.api_key_list)
        self.check(bad is None, "api_keys", KEY_RULE, shown=bad)

    @property
    def api_key_list(self) -> list[str]:
        return parse_keys(self.api_keys)
