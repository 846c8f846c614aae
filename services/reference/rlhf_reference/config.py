"""The reference service's configuration (RLHF_REFERENCE_*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf_common.config import BaseConfig, ServerConfig, section, setting


@dataclass
class ReferenceConfig(BaseConfig):
    """Reference service: frozen log-probs of the initial policy."""

    ENV: ClassVar[str] = "RLHF_REFERENCE"
    server: ServerConfig = section(ServerConfig, port=50053, metrics_port=9103)
    model: str = setting("", "MODEL", "Path of the reference model folder")
    max_batch_items: int = setting(256, "MAX_BATCH_ITEMS", "Most items in one LogProbs request")
    torch_threads: int = setting(1, "TORCH_THREADS", "torch intra-op threads")
    subscribe: bool = setting(True, "SUBSCRIBE",
                              "Follow rlhf.weights (refresh events; needs Kafka at RLHF_KAFKA_BOOTSTRAP)")
    refresh_every: int = setting(0, "REFRESH_EVERY",
                                 "Move to the newest policy weights once they are this many versions ahead "
                                 "(0 = never)")
    policy_model_name: str = setting("policy", "POLICY_MODEL_NAME", "Policy name in rlhf.weights")

    def validate(self) -> None:
        self.check(bool(self.model), "model", "must name a model folder")
        self.check(self.refresh_every >= 0, "refresh_every", "must be >= 0")
        self.check(self.max_batch_items >= 1, "max_batch_items", "must be >= 1")
        self.check(self.torch_threads >= 1, "torch_threads", "must be >= 1")
