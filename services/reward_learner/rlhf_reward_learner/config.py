"""The reward learner's configuration (RLHF_REWARD_LEARNER_*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf_common.config import BaseConfig, ServerConfig, section, setting


@dataclass
class RewardLearnerConfig(BaseConfig):
    """Reward learner: online Bradley-Terry fine-tuning on rlhf.labels, gated on held-out accuracy."""

    ENV: ClassVar[str] = "RLHF_REWARD_LEARNER"
    server: ServerConfig = section(ServerConfig, port=50056, metrics_port=9106)
    model: str = setting("", "MODEL", "The reward model to start from when the weight store has no version yet")
    weight_store: str = setting("", "WEIGHT_STORE", "Weight store where versions are published: a directory, file:// "
                                "URL, or object-storage URL (s3://bucket/prefix; gs://, az:// with gcsfs, adlfs "
                                "installed)")
    model_name: str = setting("reward", "MODEL_NAME", "Name of the reward model in the weight store and rlhf.weights")
    train_every_labels: int = setting(256, "TRAIN_EVERY_LABELS", "Run a round once this many new examples came in")
    train_every_s: float = setting(600.0, "TRAIN_EVERY_S",
                                   "... or once this long has passed since the last round, if any came in")
    held_out_fraction: float = setting(0.2, "HELD_OUT_FRACTION",
                                       "Share of prompts whose examples are held out for the gate, never trained on")
    min_heldout_pairs: int = setting(16, "MIN_HELDOUT_PAIRS", "Fewest held-out pairs the gate needs to decide")
    min_rating_gap: float = setting(0.25, "MIN_RATING_GAP",
                                    "Two ratings of answers to one prompt make a pair when they differ by this much "
                                    "(as a share of the scale)")
    max_examples: int = setting(50_000, "MAX_EXAMPLES", "Most pairs (and pointwise examples) kept per split")
    lr: float = setting(2e-4, "LR", "Adam learning rate of a round")
    epochs: int = setting(2, "EPOCHS", "Passes over the training examples per round")
    batch_size: int = setting(16, "BATCH_SIZE", "Examples per optimisation step")
    point_weight: float = setting(0.25, "POINT_WEIGHT", "Weight of the pointwise term for unpaired thumbs")
    ai_weight: float = setting(0.5, "AI_WEIGHT",
                               "Weight of a pair labelled by the AI labeller (source 'ai') in the loss, against 1 "
                               "for a human label; 0 leaves AI labels out. AI labels never enter the held-out gate")
    max_length: int = setting(256, "MAX_LENGTH", "Token limit per (prompt, response)")
    keep_versions: int = setting(8, "KEEP_VERSIONS", "Published versions kept in the weight store (0 = all)")
    torch_threads: int = setting(1, "TORCH_THREADS", "torch intra-op threads")
    seed: int = setting(0, "SEED", "torch seed")

    def validate(self) -> None:
        self.check(bool(self.model), "model", "must name a reward model folder")
        self.check(bool(self.weight_store), "weight_store", "must name a directory")
        self.check(bool(self.model_name), "model_name", "must not be empty")
        self.check(self.train_every_labels >= 1, "train_every_labels", "must be >= 1")
        self.check(self.train_every_s > 0, "train_every_s", "must be > 0")
        self.check(0 < self.held_out_fraction < 1, "held_out_fraction", "must be in (0, 1)")
        self.check(self.min_heldout_pairs >= 1, "min_heldout_pairs", "must be >= 1")
        self.check(0 < self.min_rating_gap <= 1, "min_rating_gap", "must be in (0, 1]")
        self.check(self.max_examples >= 1, "max_examples", "must be >= 1")
        self.check(self.lr > 0, "lr", "must be > 0")
        self.check(self.epochs >= 1, "epochs", "must be >= 1")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.check(self.point_weight >= 0, "point_weight", "must be >= 0")
        self.check(0 <= self.ai_weight <= 1, "ai_weight", "must be in [0, 1]")
        self.check(self.max_length >= 8, "max_length", "must be >= 8")
        self.check(self.keep_versions >= 0, "keep_versions", "must be >= 0")
        self.check(self.torch_threads >= 1, "torch_threads", "must be >= 1")
