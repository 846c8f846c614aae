"""Kafka topic names and the record type each carries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str = "rlhf"

    @property
    def prompts(self) -> str:
        return f"{self.prefix}.prompts"

    @property
    def rollouts(self) -> str:
        return f"{self.prefix}.rollouts"

    @property
    def weights(self) -> str:
        return f"{self.prefix}.weights"

    @property
    def generations(self) -> str:
        return f"{self.prefix}.generations"

    @property
    def feedback(self) -> str:
        return f"{self.prefix}.feedback"

    @property
    def labels(self) -> str:
        return f"{self.prefix}.labels"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def all(self) -> list[str]:
        return [self.prompts, self.rollouts, self.weights, self.generations, self.feedback, self.labels, self.dlq]

    def compacted(self) -> set[str]:
        return {self.weights}
