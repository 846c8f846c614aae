"""Reward scoring, independent of gRPC."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_common.errors import InvalidInput


@dataclass(frozen=True)
class ScoreItem:
    prompt: str
    response: str


@dataclass(frozen=True)
class ScoreResult:
    score: float
    truncated: bool


class RewardModel:
    """A transformers sequence-classification model with one output logit."""

    def __init__(self, model_dir: str, max_length: int, max_batch_items: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {model_dir!r} has num_labels={self.model.config.num_labels}, expected 1")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = max_length
        self.max_batch_items = max_batch_items
        self.version = Path(model_dir).name
        self._lock = threading.Lock()

    def validate(self, items: list[ScoreItem]) -> None:
        if not items:
            raise InvalidInput("items: at least one (prompt, response) item is required")
        if len(items) > self.max_batch_items:
            raise InvalidInput(f"items: {len(items)} items exceed the limit of {self.max_batch_items}")
        for i, it in enumerate(items):
            # An empty response is a legitimate answer to score (often a bad one);
            # an item with no text at all is not.
            if not it.prompt.strip() and not it.response.strip():
                raise InvalidInput(f"items[{i}]: prompt and response are both empty")

    def score(self, items: list[ScoreItem]) -> list[ScoreResult]:
        """Blocking: run it in an executor from async code."""
        self.validate(items)
        prompts = [it.prompt for it in items]
        responses = [it.response for it in items]
        # Pair encoding: BERT-style models get [CLS] p [SEP] r [SEP]; decoder models a plain join.
        full = self.tokenizer(prompts, responses)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        enc = self.tokenizer(prompts, responses, truncation="longest_first", max_length=self.max_length,
                             padding=True, return_tensors="pt")
        with self._lock, torch.inference_mode():
            logits = self.model(**enc).logits[:, 0]
        return [ScoreResult(float(s), t) for s, t in zip(logits.tolist(), truncated)]
