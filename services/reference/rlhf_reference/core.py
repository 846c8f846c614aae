"""Reference log-probs, independent of gRPC."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from rlhf_common import weights
from rlhf_common.algos.logprobs import response_logprobs
from rlhf_common.errors import InvalidInput
from rlhf_common.text import pad_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogProbsItem:
    prompt_token_ids: list[int]
    response_token_ids: list[int]


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class ReferenceModel:
    def __init__(self, model_dir: str, max_batch_items: int, version: int = 0):
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.model = _load(model_dir)
        self.pad_id = pad_id(AutoTokenizer.from_pretrained(model_dir))
        self.vocab_size = self.model.config.vocab_size
        self.max_positions = getattr(self.model.config, "max_position_embeddings", 1 << 30)
        self.max_batch_items = max_batch_items
        self.version = version
        self._lock = threading.Lock()

    def validate(self, items: list[LogProbsItem]) -> None:
        if not items:
            raise InvalidInput("items: at least one item is required")
        if len(items) > self.max_batch_items:
            raise InvalidInput(f"items: {len(items)} items exceed the limit of {self.max_batch_items}")
        for i, it in enumerate(items):
            if not it.prompt_token_ids:
                raise InvalidInput(f"items[{i}].prompt_token_ids: must not be empty")
            if not it.response_token_ids:
                raise InvalidInput(f"items[{i}].response_token_ids: must not be empty")
            bad = [t for t in (*it.prompt_token_ids, *it.response_token_ids) if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidInput(f"items[{i}]: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
            n = len(it.prompt_token_ids) + len(it.response_token_ids)
            if n > self.max_positions:
                raise InvalidInput(f"items[{i}]: {n} tokens exceed the model's {self.max_positions} positions")

    def logprobs(self, items: list[LogProbsItem]) -> tuple[list[list[float]], int]:
        """Blocking: run it in an executor from async code. Returns (log-probs, version)."""
        self.validate(items)
        with self._lock, torch.inference_mode():
            return response_logprobs(self.model, [i.prompt_token_ids for i in items],
                                     [i.response_token_ids for i in items], self.pad_id), self.version

    def refresh(self, uri: str, version: int, sha256: str = "") -> bool:
        """Load a newer checkpoint and swap it in. Blocking. False when `version` is not newer."""
        if version <= self.version:
            return False
        try:
            path = weights.fetch(uri, sha256)
        except ValueError as e:
            raise InvalidInput(f"uri: {e}") from None
        if not (path / "config.json").exists():
            raise InvalidInput(f"uri: {uri!r} is not a model folder (no config.json)")
        if sha256:
            weights.verify(path, sha256)
        model = _load(str(path))  # off the lock: requests keep being served meanwhile
        if model.config.vocab_size != self.vocab_size:
            raise InvalidInput(f"uri: {uri!r} has vocab size {model.config.vocab_size}, the reference has "
                               f"{self.vocab_size}")
        with self._lock:
            if version <= self.version:
                return False
            self.model, self.model_dir, self.version = model, str(path), version
        log.info("reference refreshed to v%d from %s", version, path)
        return True
