"""Weight store: versioned safetensors checkpoint folders with a sha256 manifest.

Layout: <root>/<model_name>/v<version:08d>/{model.safetensors, config.json, tokenizer...,
rlhf_manifest.json}. A version folder is written under a temporary name and renamed into
place (an existing one is swapped atomically), so a reader never sees a half-written
checkpoint. The root is a path or file:// URL on storage every reader mounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import IncompatibleWeights, WeightsCorrupt
from .fsutil import publish_dir, remove_unfinished

MANIFEST = "rlhf_manifest.json"
LINEAGE = "lineage.jsonl"


def local_path(uri: str) -> Path:
    """Path of a checkpoint URI: a plain path or a file:// URL on storage every reader mounts
    (a shared volume on Kubernetes). Other schemes (s3://, gs://, ...) are refused."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise ValueError(f"unsupported weight-store URL {uri!r}: use a path or file:// URL on a volume that "
                         "every service mounts")
    return Path(uri)


def digest(folder: str | Path) -> str:
    """sha256 over the names and bytes of every *.safetensors file, in name order."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {str(folder)!r}")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def verify(folder: str | Path, sha256: str) -> None:
    actual = digest(folder)
    if actual != sha256:
        raise WeightsCorrupt(f"checkpoint {str(folder)!r} has sha256 {actual}, announced {sha256}")


def tensor_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a folder's *.safetensors files (reads the headers only)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {str(folder)!r}")
    shapes = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    return shapes


def check_same_layout(folder: str | Path, ref: dict[str, tuple[int, ...]], model: str) -> None:
    """A full checkpoint must hold exactly the model's tensors (`ref`, from `tensor_shapes` of
    the model's folder), shape for shape.

    Loading one that lacks a tensor would leave that weight from the previous version, and
    one with other shapes would fail half-way: either way the served model would be a mix.
    """
    new = tensor_shapes(folder)
    missing = sorted(ref.keys() - new.keys())
    extra = sorted(new.keys() - ref.keys())
    reshaped = sorted(k for k in ref.keys() & new.keys() if ref[k] != new[k])
    if missing or extra or reshaped:
        parts = [f"{label} {names[:3]}{' ...' if len(names) > 3 else ''} ({len(names)})"
                 for label, names in (("missing", missing), ("unexpected", extra),
                                      ("other shapes", [f"{k}: {new[k]} vs {ref[k]}" for k in reshaped]))
                 if names]
        raise IncompatibleWeights(f"checkpoint {str(folder)!r} does not fit the model {model!r}: "
                                  + "; ".join(parts))


@dataclass(frozen=True)
class Checkpoint:
    model_name: str
    version: int
    path: Path
    sha256: str
    step: int
    # Free-form progress counters saved with the weights (e.g. groups consumed).
    extra: dict = field(default_factory=dict, compare=False)


class WeightStore:
    def __init__(self, root: str | Path):
        self.root = local_path(str(root))

    def folder(self, model_name: str, version: int) -> Path:
        return self.root / model_name / f"v{version:08d}"

    def remove_unfinished(self, model_name: str) -> list[Path]:
        """Delete saves of `model_name` that a killed writer never finished (its one writer
        calls this at start)."""
        return remove_unfinished(self.root / model_name)

    def save(self, model, tokenizer, model_name: str, version: int, step: int,
             extra: dict | None = None) -> Checkpoint:
        """Save an HF model (+ tokenizer) as a new version; returns its Checkpoint."""
        final = self.folder(model_name, version)
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        sha = digest(tmp)
        (tmp / MANIFEST).write_text(json.dumps(
            {"model_name": model_name, "version": version, "step": step, "sha256": sha,
             "created_unix_ms": int(time.time() * 1000), "extra": extra or {}}, indent=2))
        publish_dir(tmp, final)
        return Checkpoint(model_name, version, final, sha, step, extra or {})

    def append_lineage(self, model_name: str, entry: dict) -> None:
        """Add one line to the model's lineage: what a version learned from. The lineage is
        append-only and outlives pruned versions, so any version's story can still be told."""
        path = self.root / model_name / LINEAGE
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a crash mid-line: start the next entry on its own line
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def lineage(self, model_name: str) -> list[dict]:
        """The lineage entries, oldest first (a torn last line from a crash is skipped)."""
        path = self.root / model_name / LINEAGE
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def load_manifest(self, model_name: str, version: int) -> Checkpoint:
        folder = self.folder(model_name, version)
        m = json.loads((folder / MANIFEST).read_text())
        return Checkpoint(m["model_name"], m["version"], folder, m["sha256"], m["step"], m.get("extra", {}))

    def prune(self, model_name: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` versions (keep=0: delete nothing); returns the deleted."""
        if keep <= 0:
            return []
        old = self.versions(model_name)[:-keep]
        for v in old:
            shutil.rmtree(self.folder(model_name, v), ignore_errors=True)
        return old

    def latest(self, model_name: str) -> Checkpoint | None:
        """The newest complete version (one with a manifest), or None."""
        for v in reversed(self.versions(model_name)):
            if (self.folder(model_name, v) / MANIFEST).exists():
                return self.load_manifest(model_name, v)
        return None

    def versions(self, model_name: str) -> list[int]:
        d = self.root / model_name
        if not d.exists():
            return []
        return sorted(int(p.name[1:]) for p in d.iterdir() if p.name.startswith("v") and p.name[1:].isdigit())
