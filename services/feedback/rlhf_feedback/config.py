"""The feedback service's configuration (RLHF_FEEDBACK_*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from rlhf_common.auth import KEY_RULE, bad_key, parse_keys
from rlhf_common.config import BaseConfig, ServerConfig, partition_list, section, setting

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
    max_body_bytes: int = setting(1 << 20, "MAX_BODY_BYTES",
                                  "Largest request accepted, in bytes: a REST body (413 beyond) or a gRPC message "
                                  "(RESOURCE_EXHAUSTED beyond)")
    max_text_chars: int = setting(16_384, "MAX_TEXT_CHARS", "Longest edited response or comment, in characters")
    broker_timeout_s: float = setting(10.0, "BROKER_TIMEOUT_S",
                                      "Longest a request waits for the broker to acknowledge its items; then 503")
    join_enabled: bool = setting(True, "JOIN_ENABLED",
                                 "Run the join of rlhf.feedback to rlhf.generations in this process")
    join_partitions: str = setting("", "JOIN_PARTITIONS",
                                   "Partitions of rlhf.generations and rlhf.feedback this replica joins, e.g. '0,2' "
                                   "(empty: all); give each replica its own set")
    join_fetch_wait_ms: int = setting(50, "JOIN_FETCH_WAIT_MS",
                                      "Longest the broker holds the join's fetch of an idle topic (Kafka "
                                      "fetch.max.wait.ms); lower: labels sooner, more idle polling of the broker")
    join_poll_ms: int = setting(20, "JOIN_POLL_MS",
                                "Longest the join waits on one of its two topics (generations, feedback) before "
                                "it looks at the other")
    join_max_records: int = setting(64, "JOIN_MAX_RECORDS",
                                    "Most records the join takes from one topic per poll (one database "
                                    "transaction per poll)")
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
    rate_enabled: bool = setting(True, "RATE_ENABLED",
                                 "Serve the rating page (/rate) and keep its queue of answer pairs (needs the join "
                                 "in this process and the REST server)")
    rate_pairs: Literal["samples", "versions", "both"] = setting(
        "both", "RATE_PAIRS", "Which answers to one prompt make a pair: 'samples' (the same policy version), "
                              "'versions' (the newest against an earlier version: a live A/B of versions), 'both'")
    rate_strategy: Literal["random", "uncertainty", "disagreement"] = setting(
        "random", "RATE_STRATEGY", "Order of the rating queue: 'random'; 'uncertainty' (P(preferred) of the reward "
                                   "ensemble nearest 0.5 first); 'disagreement' (spread of the ensemble first)")
    rate_reward_addrs: str = setting("", "RATE_REWARD_ADDRS",
                                     "Comma-separated reward services (host:port, gRPC) that score the queue's pairs: "
                                     "one for 'uncertainty', two or more (e.g. the live and the previous version) "
                                     "for 'disagreement'")
    rate_reward_api_key: str = setting("", "RATE_REWARD_API_KEY", "Bearer key for the reward services", secret=True)
    rate_rank_every_s: float = setting(5.0, "RATE_RANK_EVERY_S", "How often the queue's unrated pairs are re-ranked")
    rate_rank_max: int = setting(256, "RATE_RANK_MAX", "Most pairs scored per ranking pass (least recently first)")
    rate_repeat_share: float = setting(0.1, "RATE_REPEAT_SHARE",
                                       "Share of pairs shown that repeat one the rater answered before, to measure "
                                       "each rater's self-agreement")
    rate_max_pairs: int = setting(10_000, "RATE_MAX_PAIRS", "Most pairs kept in the queue; the oldest unrated go first")
    rate_seed: int = setting(0, "RATE_SEED", "Seed of the side randomisation, repeats and the random strategy")
    policy_addr: str = setting("", "POLICY_ADDR",
                               "Policy service (host:port, gRPC) that answers prompts for new pairs and the AI "
                               "labeller's judge prompts")
    policy_api_key: str = setting("", "POLICY_API_KEY", "Bearer key for the policy service", secret=True)
    rate_prompts_file: str = setting("", "RATE_PROMPTS_FILE",
                                     "Prompts (one per line) the queue asks the policy about while it has fewer than "
                                     "RATE_MIN_OPEN open pairs; empty: only served answers make pairs")
    rate_min_open: int = setting(16, "RATE_MIN_OPEN", "Fewest open pairs before the queue asks the policy for more")
    rate_temperature: float = setting(1.0, "RATE_TEMPERATURE", "Sampling temperature of the queue's own answers")
    rate_max_tokens: int = setting(256, "RATE_MAX_TOKENS", "Token limit of the queue's own answers")
    judge_enabled: bool = setting(False, "JUDGE_ENABLED",
                                  "Run the AI labeller: a judge model labels pairs of the queue that no human has "
                                  "rated (source 'ai') and judges human-rated ones to measure its agreement")
    judge_backend: Literal["policy", "folder"] = setting(
        "policy", "JUDGE_BACKEND", "'policy': the judge prompt goes to POLICY_ADDR; 'folder': a causal LM loaded "
                                   "from JUDGE_MODEL in this process")
    judge_model: str = setting("", "JUDGE_MODEL", "The judge's model folder (backend 'folder')")
    judge_every_s: float = setting(5.0, "JUDGE_EVERY_S", "How often the AI labeller looks for pairs to judge")
    judge_batch: int = setting(8, "JUDGE_BATCH", "Most pairs judged per pass")
    judge_max_chars: int = setting(2000, "JUDGE_MAX_CHARS", "Longer prompts and answers are cut to this in the judge prompt")

    def validate(self) -> None:
        self.check(bool(self.state_dir), "state_dir", "must name a directory")
        self.check_port("http_port")
        self.check(1 <= self.max_items <= 10_000, "max_items", "must be in [1, 10000]")
        self.check(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        self.check(self.max_text_chars >= 1, "max_text_chars", "must be >= 1")
        self.check(self.broker_timeout_s > 0, "broker_timeout_s", "must be > 0")
        self.check(1 <= self.join_fetch_wait_ms <= 60_000, "join_fetch_wait_ms", "must be in [1, 60000]")
        self.check(1 <= self.join_poll_ms <= 60_000, "join_poll_ms", "must be in [1, 60000]")
        self.check(1 <= self.join_max_records <= 100_000, "join_max_records", "must be in [1, 100000]")
        self.check(self.wait_s > 0, "wait_s", "must be > 0")
        self.check(self.retention_s >= self.wait_s, "retention_s", f"must be >= {self.env_of('wait_s')}={self.wait_s}")
        self.check(self.max_generations >= 1, "max_generations", "must be >= 1")
        try:
            parts = self.partition_list
        except ValueError:
            parts = None
        self.check(parts is not None, "join_partitions",
                   "must be empty or comma-separated partition numbers")
        self.check(0 <= self.prompt_sample_rate <= 1, "prompt_sample_rate", "must be in [0, 1]")
        self.check(self.prompt_max_chars >= 1, "prompt_max_chars", "must be >= 1")
        try:
            load_filter(self.prompt_filter)
            filter_error = ""
        except (ImportError, ValueError) as e:
            filter_error = str(e)
        self.check(not filter_error, "prompt_filter", f"cannot be loaded: {filter_error}")
        self.check(self.rate_strategy in ("random", "uncertainty", "disagreement"), "rate_strategy",
                   "must be 'random', 'uncertainty' or 'disagreement'")
        self.check(self.rate_pairs in ("samples", "versions", "both"), "rate_pairs",
                   "must be 'samples', 'versions' or 'both'")
        need = {"random": 0, "uncertainty": 1, "disagreement": 2}.get(self.rate_strategy, 0)
        self.check(len(self.reward_addr_list) >= need, "rate_reward_addrs",
                   f"must name at least {need} reward service(s) for {self.env_of('rate_strategy')}="
                   f"{self.rate_strategy}")
        self.check(self.rate_rank_every_s > 0, "rate_rank_every_s", "must be > 0")
        self.check(self.rate_rank_max >= 1, "rate_rank_max", "must be >= 1")
        self.check(0 <= self.rate_repeat_share < 1, "rate_repeat_share", "must be in [0, 1)")
        self.check(self.rate_max_pairs >= 1, "rate_max_pairs", "must be >= 1")
        self.check(not self.rate_prompts_file or bool(self.policy_addr), "rate_prompts_file",
                   f"needs {self.env_of('policy_addr')} to answer the prompts")
        self.check(self.rate_min_open >= 1, "rate_min_open", "must be >= 1")
        self.check(self.rate_temperature >= 0, "rate_temperature", "must be >= 0")
        self.check(self.rate_max_tokens >= 1, "rate_max_tokens", "must be >= 1")
        self.check(self.judge_backend in ("policy", "folder"), "judge_backend", "must be 'policy' or 'folder'")
        self.check(not self.judge_enabled or self.judge_backend != "policy" or bool(self.policy_addr),
                   "judge_enabled", f"the 'policy' judge needs {self.env_of('policy_addr')}")
        self.check(not self.judge_enabled or self.judge_backend != "folder" or bool(self.judge_model),
                   "judge_model", "must name a model folder for the 'folder' judge")
        self.check(self.judge_every_s > 0, "judge_every_s", "must be > 0")
        self.check(self.judge_batch >= 1, "judge_batch", "must be >= 1")
        self.check(self.judge_max_chars >= 100, "judge_max_chars", "must be >= 100")
        bad = bad_key(self.api_key_list)
        self.check(bad is None, "api_keys", KEY_RULE, shown=bad)

    @property
    def api_key_list(self) -> list[str]:
        return parse_keys(self.api_keys)

    @property
    def reward_addr_list(self) -> list[str]:
        return [a.strip() for a in self.rate_reward_addrs.split(",") if a.strip()]

    @property
    def partition_list(self) -> list[int]:
        """The partitions to join; empty means all."""
        return partition_list(self.join_partitions)
