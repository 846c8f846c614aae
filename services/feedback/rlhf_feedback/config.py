"""The feedback service's configuration (RLHF_FEEDBACK_*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf_common.auth import KEY_RULE, bad_key, parse_keys
from rlhf_common.config import BaseConfig, ServerConfig, section, setting

from .prompts import load_filter


@dataclass
class FeedbackConfig(BaseConfig):
    """Feedback service: users' feedback on served answers in, joined labels out."""

    ENV: ClassVar[str] = "RLHF_FEEDBACK"
    server: ServerConfig = section(ServerConfig, port=50055, metrics_port=9105)
    state_dir: str = setting("", "STATE_DIR",
                             "Directory of the service's embedded databases (accepted feedback ids, the join); "
                             "a persistent volume in production")
    http_port: int = setting(8005, "HTTP_PORT", "REST (FastAPI) port; 0 = no REST server")
    api_keys: str = setting("", "API_KEYS",
                            "Comma-separated API keys; when set, REST needs 'Authorization: Bearer <key>' and gRPC "
                            "the same 'authorization' metadata (health and /metrics stay open)", secret=True)
    max_items: int = setting(256, "MAX_ITEMS", "Most feedback items in one request")
    max_body_bytes: int = setting(1 << 20, "MAX_BODY_BYTES", "REST: largest request body accepted; larger ones get 413")
    max_text_chars: int = setting(16_384, "MAX_TEXT_CHARS", "Longest edited response or comment, in characters")
    broker_timeout_s: float = setting(10.0, "BROKER_TIMEOUT_S",
                                      "Longest a request waits for the broker to acknowledge its items; then 503")
    join_enabled: bool = setting(True, "JOIN_ENABLED",
                                 "Run the join of rlhf.feedback to rlhf.generations in this process")
    join_partitions: str = setting("", "JOIN_PARTITIONS",
                                   "Partitions of rlhf.generations and rlhf.feedback this replica joins, e.g. '0,2' "
                                   "(empty: all); give each replica its own set")
    wait_s: float = setting(600.0, "WAIT_S", "How long feedback waits for its generation before it is dead-lettered")
    retention_s: float = setting(7 * 86400.0, "RETENTION_S",
                                 "How long served answers are kept for joining late feedback")
    max_generations: int = setting(1_000_000, "MAX_GENERATIONS",
                                   "Most served answers kept for joining; the oldest go first")
    prompt_sample_rate: float = setting(0.0, "PROMPT_SAMPLE_RATE",
                                        "Share of served requests whose prompt goes to rlhf.prompts for RL rollouts "
                                        "(0 = none, 1 = all); decided per request id")
    prompt_filter: str = setting("", "PROMPT_FILTER",
                                 "Optional 'module:function' that gets a sampled prompt's text and returns whether "
                                 "it may be trained on")
    prompt_max_chars: int = setting(4000, "PROMPT_MAX_CHARS", "Longer sampled prompts are left out")

    def validate(self) -> None:
        self.check(bool(self.state_dir), "state_dir", "must name a directory")
        self.check_port("http_port")
        self.check(1 <= self.max_items <= 10_000, "max_items", "must be in [1, 10000]")
        self.check(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        self.check(self.max_text_chars >= 1, "max_text_chars", "must be >= 1")
        self.check(self.broker_timeout_s > 0, "broker_timeout_s", "must be > 0")
        self.check(self.wait_s > 0, "wait_s", "must be > 0")
        self.check(self.retention_s >= self.wait_s, "retention_s", f"must be >= {self.env_of('wait_s')}={self.wait_s}")
        self.check(self.max_generations >= 1, "max_generations", "must be >= 1")
        try:
            parts = self.partition_list
        except ValueError:
            parts = None
        self.check(parts is not None and all(p >= 0 for p in parts), "join_partitions",
                   "must be empty or comma-separated partition numbers")
        self.check(0 <= self.prompt_sample_rate <= 1, "prompt_sample_rate", "must be in [0, 1]")
        self.check(self.prompt_max_chars >= 1, "prompt_max_chars", "must be >= 1")
        try:
            load_filter(self.prompt_filter)
            filter_error = ""
        except (ImportError, ValueError) as e:
            filter_error = str(e)
        self.check(not filter_error, "prompt_filter", f"cannot be loaded: {filter_error}")
        bad = bad_key(self.api_key_list)
        self.check(bad is None, "api_keys", KEY_RULE, shown=bad)

    @property
    def api_key_list(self) -> list[str]:
        return parse_keys(self.api_keys)

    @property
    def partition_list(self) -> list[int]:
        """The partitions to join; empty means all."""
        return sorted({int(p) for p in self.join_partitions.split(",") if p.strip()})
