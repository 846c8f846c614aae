"""Training-state checkpoints: everything needed to continue exactly after a crash.

A checkpoint is a folder `<root>/step-<step:08d>/` holding `state.pt` (the learner state:
optimizer, value head, KL controller, Python RNG; torch's RNG state, the counters, the Kafka
offsets to continue from, and the ids of recently trained rollouts, for dedup) and
`rlhf_manifest.json` (on object storage with the sha256 of every file in the folder), and
`model/`: the trained weights in full precision (or the LoRA adapter). Published versions
may be in a lower serving dtype and are pruned, so the state keeps its own copy; a state
without one (older layouts) names the published version it continues from.

The trainer saves a state every few steps or minutes, not at every step (a state holds the
optimizer: three times the weights in float32). A crash between two states costs the steps
since the last one: the trainer continues from it, reads the rollouts after its offsets
again and trains on each once more (see core.py).

The root lives in the weight store beside the model's versions (`<store>/<model>-trainer-state`),
on a file system or on object storage, so a trainer restarting on another node finds it. A
state is built in a local folder and published whole through the store's tree
(`rlhf_common.objstore`): renamed into place on a file system (an existing one is swapped
atomically), uploaded with its manifest last on object storage (a state without its manifest
does not exist, and the trainer removes it at its next start). `latest()` reads the newest
state in place on a file system, or downloads the whole folder into the weight cache and
checks every file against the manifest first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_common import objstore
from rlhf_common.errors import WeightsCorrupt
from rlhf_common.weights import fetch

STATE = "state.pt"
WEIGHTS = "model"
MANIFEST = "rlhf_manifest.json"
STEP_NAME = re.compile(r"step-\d{8,}")


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
    # Set on loading: the local folder of the state's own weights ("" when it has none).
    own_weights: str = ""

    def weights_folder(self) -> Path:
        """A local folder with the weights to continue from: the state's own copy, else the
        published version it names (`weights_path` may be a URL on object storage: it is
        fetched and checked against `weights_sha256`)."""
        if self.own_weights:
            return Path(self.own_weights)
        return fetch(self.weights_path, self.weights_sha256)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """Relative name -> sha256 of every file in `folder` but the manifest."""
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 2):
        self.tree = objstore.open_tree(str(root))
        self.root = self.tree.where()  # a Path, or the URL on object storage
        self.keep = keep

    def remove_unfinished(self) -> list[Path | str]:
        """Delete training states a killed trainer never finished saving."""
        return self.tree.unfinished("", STEP_NAME, MANIFEST)

    @staticmethod
    def _rel(step: int) -> str:
        return f"step-{step:08d}"

    def folder(self, step: int) -> Path | str:
        return self.tree.where(self._rel(step))

    def save(self, state: TrainerState, model=None) -> Path | str:
        """Write the state (and the model's weights as they are, when given) in a local
        folder and publish the whole folder; keep the newest `keep`."""
        rel = self._rel(state.step)
        tmp = self.tree.staging(rel)
        try:
            torch.save({**state.__dict__, "own_weights": ""}, tmp / STATE)
            if model is not None:
                model.save_pretrained(tmp / WEIGHTS, safe_serialization=True)
            for f in [tmp / STATE, *sorted((tmp / WEIGHTS).glob("*"))]:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            # A download is checked against the files' sha256; a rename on a file system needs no hashing.
            files = _files(tmp) if self.tree.remote else {}
            (tmp / MANIFEST).write_text(json.dumps({"step": state.step, "files": files}, indent=2))
            self.tree.publish(tmp, rel, MANIFEST)
        except BaseException:
            self.tree.discard(tmp)
            raise
        for old in self.steps()[:-self.keep]:
            self.tree.remove(self._rel(old), MANIFEST)
        return self.folder(state.step)

    def steps(self) -> list[int]:
        return [int(n[5:]) for n in self.tree.folders("", STEP_NAME, MANIFEST)]

    def local_folder(self, step: int) -> Path:
        """The state folder of `step` on local disk: in place on a file system; on object
        storage a fresh download into the weight cache, every file checked against the manifest."""
        rel = self._rel(step)
        if not self.tree.remote:
            return self.tree.where(rel)
        parent = objstore.WeightCacheConfig.load().folder() / "trainer-state" / objstore.url_key(self.tree.url)
        slot = parent / "latest"
        shutil.rmtree(slot, ignore_errors=True)

        def settle(folder: Path) -> Path:
            manifest = json.loads((folder / MANIFEST).read_text())
            have, want = _files(folder), manifest.get("files", {})
            if have != want:
                bad = sorted(n for n in have.keys() | want.keys() if have.get(n) != want.get(n))
                raise WeightsCorrupt(f"training state {objstore.redact(self.tree.where(rel))!r}: files {bad} "
                                     "do not match its manifest")
            return slot

        return objstore.download_to(self.tree, rel, parent, rel, settle)

    def latest(self) -> TrainerState | None:
        steps = self.steps()
        if not steps:
            return None
        # weights_only: tensors and plain containers only, never arbitrary pickled objects
        # (the store is shared, so its files are not trusted to run code).
        folder = self.local_folder(steps[-1])
        raw = torch.load(folder / STATE, weights_only=True)
        state = TrainerState(**raw)
        if (folder / WEIGHTS).is_dir():
            state.own_weights = str(folder / WEIGHTS)
        return state
