"""Running mean and standard deviation (Welford), mergeable across batches and threads."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class StatsSnapshot:
    count: int
    mean: float
    # Sample standard deviation (n - 1 in the denominator); 0 for fewer than two values.
    std: float


class RunningStats:
    """Welford's algorithm, with Chan et al.'s merge for adding a whole batch at once.

    Numerically stable for long streams (no sum of squares). Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0

    def update(self, values: Iterable[float]) -> None:
        # Welford over the batch, then merge the batch into the running totals.
        n_b, mean_b, m2_b = 0, 0.0, 0.0
        for x in values:
            x = float(x)
            if not math.isfinite(x):
                continue
            n_b += 1
            d = x - mean_b
            mean_b += d / n_b
            m2_b += d * (x - mean_b)
        if n_b == 0:
            return
        with self._lock:
            n_a = self._n
            n = n_a + n_b
            delta = mean_b - self._mean
            self._mean += delta * n_b / n
            self._m2 += m2_b + delta * delta * n_a * n_b / n
            self._n = n

    def reset(self) -> None:
        with self._lock:
            self._n, self._mean, self._m2 = 0, 0.0, 0.0

    def state_dict(self) -> dict:
        with self._lock:
            return {"n": self._n, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._n, self._mean, self._m2 = int(state["n"]), float(state["mean"]), float(state["m2"])

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            std = math.sqrt(self._m2 / (self._n - 1)) if self._n > 1 else 0.0
            return StatsSnapshot(self._n, self._mean, std)
