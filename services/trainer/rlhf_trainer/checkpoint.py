"""Training-state checkpoints: everything needed to continue exactly after a crash.

A checkpoint is a folder `<root>/step-<step:08d>/state.pt` holding the learner state
(optimizer, value head, KL controller, Python RNG), torch's RNG state, the counters, the
Kafka offsets to continue from, and the ids of recently trained rollouts (for dedup). The
model weights are the published version folder the state names. Folders are written under
a temporary name and renamed into place (an existing one is swapped atomically), so a crash
leaves either the old or the new one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_common.fsutil import publish_dir, remove_unfinished


@dataclass
class TrainerState:
    step: int
    version: int
    weights_path: str
    weights_sha256: str
    groups_consumed: int
    rollouts_consumed: int
    offsets: dict[int, int]  # partition -> next offset to read
    trained_ids: list[str]
    learner: dict
    torch_rng: torch.Tensor
    extra: dict = field(default_factory=dict)


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def remove_unfinished(self) -> list[Path]:
        """Delete training states a killed trainer never finished saving."""
        return remove_unfinished(self.root)

    def folder(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def save(self, state: TrainerState) -> Path:
        final = self.folder(state.step)
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state.__dict__, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
        publish_dir(tmp, final)
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.folder(old), ignore_errors=True)
        return final

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name[5:]) for p in self.root.iterdir()
                      if p.name.startswith("step-") and p.name[5:].isdigit() and (p / "state.pt").exists())

    def latest(self) -> TrainerState | None:
        steps = self.steps()
        if not steps:
            return None
        # weights_only: tensors and plain containers only, never arbitrary pickled objects
        # (the store is shared, so its files are not trusted to run code).
        raw = torch.load(self.folder(steps[-1]) / "state.pt", weights_only=True)
        return TrainerState(**raw)
