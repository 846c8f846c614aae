"""Weight store: versioned safetensors checkpoint folders with a sha256 manifest.

Layout: <root>/<model_name>/v<version:08d>/{model.safetensors, config.json, tokenizer...,
rlhf_manifest.json}, and <root>/<model_name>/lineage.jsonl. The root is a path or file://
URL on storage every reader mounts, or an object-storage URL (s3://bucket/prefix, or any
fsspec URL whose package is installed); `objstore` holds the two backends.

A reader never sees a half-written checkpoint. On a file system a version is written under
a temporary name and renamed into place (an existing one is swapped atomically). On object
storage a version is staged in a local temporary folder, hashed, uploaded, and its manifest
is uploaded last: a version exists for readers only once its manifest does.

Readers turn an announced URI into a local folder with `fetch(uri, sha256)`: a local
folder is used in place; a remote one is downloaded into the weight cache
(RLHF_WEIGHT_CACHE_DIR), verified, and reused while it stays there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import objstore
from .errors import IncompatibleWeights, WeightsCorrupt

MANIFEST = "rlhf_manifest.json"
LINEAGE = "lineage.jsonl"
VERSION_NAME = re.compile(r"v\d{8,}")


def local_path(uri: str) -> Path:
    """Path of a local checkpoint URI: a plain path or a file:// URL on storage every reader
    mounts. An object-storage URL (s3://, gs://, ...) is refused: `fetch` reads those."""
    if objstore.is_remote(uri):
        raise ValueError(f"{objstore.redact(uri)!r} is on object storage, not a local path: read it with "
                         "weights.fetch")
    return objstore.local_path(uri)


def fetch(uri: str, sha256: str = "") -> Path:
    """A local folder with the checkpoint at `uri` (blocking: run it in an executor from async code).

    A path or file:// URL is returned as it is (callers verify it, as a shared volume can
    change under them). An object-storage URL is downloaded into the weight cache under a
    temporary name, its sha256 (`digest`) checked against `sha256` (or, when that is empty,
    against the version's manifest), and renamed into place; a verified copy already there
    is reused. A mismatch raises WeightsCorrupt and leaves nothing behind. The cache keeps the
    RLHF_WEIGHT_CACHE_KEEP most recently used versions."""
    if not objstore.is_remote(uri):
        return local_path(uri)
    cfg = objstore.WeightCacheConfig.load()
    cache = cfg.folder() / "weights"
    tree = objstore.open_tree(uri)
    name = tree.root.rsplit("/", 1)[-1] or "model"  # the version's folder name (v00000003) is kept
    want = sha256
    if not want and tree.exists(MANIFEST):
        want = json.loads(tree.read_text(MANIFEST)).get("sha256", "")
    key = objstore.url_key(uri)
    if want:
        slot = cache / f"{want[:24]}-{key}"
        if (slot / name).is_dir():
            os.utime(slot)
            return slot / name

    def settle(folder: Path) -> Path:
        actual = digest(folder)
        if want and actual != want:
            raise WeightsCorrupt(f"checkpoint {objstore.redact(uri)!r} has sha256 {actual}, announced {want}")
        return cache / f"{actual[:24]}-{key}"

    path = objstore.download_to(tree, "", cache, name, settle)
    objstore.evict(cache, cfg.cache_keep, protect=path.parent)
    return path


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


def write_full_weights(model, folder: Path, dtype=None) -> str:
    """Write an HF model's weights (in `dtype`, default their own) and config to `folder` as
    one model.safetensors; returns its `digest`. Tensors that share storage (tied
    embeddings) are written once, under the first name, as `save_pretrained` does."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        t = t.detach()
        tensors[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config = model.config
    saved_dtype = getattr(config, "dtype", None)
    if dtype is not None:
        config.dtype = dtype
    try:
        config.save_pretrained(folder)
    finally:
        if dtype is not None:
            config.dtype = saved_dtype
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    return digest(folder)  # read back from the page cache


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
    # A Path in a store on a file system, the version's URL on object storage: str(path) is
    # what a WeightUpdate announces, and `fetch` turns it into a local folder.
    path: Path | str
    sha256: str
    step: int
    # Free-form progress counters saved with the weights (e.g. groups consumed).
    extra: dict = field(default_factory=dict, compare=False)


class WeightStore:
    """The versions of each model under one root (a path, file:// URL or object-storage URL).
    Each model has one writer (the trainer, the reward learner); any number of readers."""

    def __init__(self, root: str | Path):
        self.tree = objstore.open_tree(str(root))
        self.root = self.tree.where()  # a Path, or the URL on object storage

    def folder(self, model_name: str, version: int) -> Path | str:
        return self.tree.where(self._rel(model_name, version))

    def child(self, name: str) -> Path | str:
        """Another folder under the root (e.g. the trainer's state), as a path or URL."""
        return self.tree.where(name)

    def local_file(self, name: str) -> Path:
        """A local file named `name` beside the store's contents: under the root on a file
        system; in the weight cache folder with an object-storage root (local to the pod)."""
        if self.tree.remote:
            folder = objstore.WeightCacheConfig.load().folder()
            folder.mkdir(parents=True, exist_ok=True)
            return folder / name
        return self.tree.where(name)

    @staticmethod
    def _rel(model_name: str, version: int) -> str:
        return f"{model_name}/v{version:08d}"

    def remove_unfinished(self, model_name: str) -> list[Path | str]:
        """Delete saves of `model_name` that a killed writer never finished (its one writer
        calls this at start): temporary folders on a file system, versions without a manifest
        on object storage."""
        return self.tree.unfinished(model_name, VERSION_NAME, MANIFEST)

    def save(self, model, tokenizer, model_name: str, version: int, step: int,
             extra: dict | None = None, dtype=None) -> Checkpoint:
        """Save an HF model (+ tokenizer) as a new version; returns its Checkpoint.

        `dtype` (a torch dtype): full weights are written in it (the serving dtype, e.g.
        bfloat16: half the bytes of float32 to write, hash and load). A LoRA adapter is
        saved as it is."""
        rel = self._rel(model_name, version)
        tmp = self.tree.staging(rel)
        try:
            if hasattr(model, "config") and not hasattr(model, "peft_config"):
                sha = write_full_weights(model, tmp, dtype)
            else:  # an adapter, or any model that saves itself
                model.save_pretrained(tmp, safe_serialization=True)
                sha = digest(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / MANIFEST).write_text(json.dumps(
                {"model_name": model_name, "version": version, "step": step, "sha256": sha,
                 "created_unix_ms": int(time.time() * 1000), "extra": extra or {}}, indent=2))
            self.tree.publish(tmp, rel, MANIFEST)
        except BaseException:
            self.tree.discard(tmp)
            raise
        return Checkpoint(model_name, version, self.folder(model_name, version), sha, step, extra or {})

    def append_lineage(self, model_name: str, entry: dict) -> None:
        """Add one line to the model's lineage: what a version learned from. The lineage is
        append-only and outlives pruned versions, so any version's story can still be told.
        (On object storage the file is read, extended and written back by the model's one writer.)"""
        self.tree.append_line(f"{model_name}/{LINEAGE}", json.dumps(entry, sort_keys=True))

    def lineage(self, model_name: str) -> list[dict]:
        """The lineage entries, oldest first (a torn last line from a crash is skipped)."""
        rel = f"{model_name}/{LINEAGE}"
        if not self.tree.exists(rel):
            return []
        out = []
        for line in self.tree.read_text(rel).splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def has_file(self, model_name: str, version: int, name: str) -> bool:
        return self.tree.exists(f"{self._rel(model_name, version)}/{name}")

    def load_manifest(self, model_name: str, version: int) -> Checkpoint:
        m = json.loads(self.tree.read_text(f"{self._rel(model_name, version)}/{MANIFEST}"))
        return Checkpoint(m["model_name"], m["version"], self.folder(model_name, version), m["sha256"], m["step"],
                          m.get("extra", {}))

    def prune(self, model_name: str, keep: int) -> list[int]:
        """Delete all but the newest `keep` versions (keep=0: delete nothing); returns the deleted."""
        if keep <= 0:
            return []
        old = self.versions(model_name)[:-keep]
        for v in old:
            self.tree.remove(self._rel(model_name, v), MANIFEST)
        return old

    def latest(self, model_name: str) -> Checkpoint | None:
        """The newest complete version (one with a manifest), or None."""
        for v in reversed(self.versions(model_name)):
            if self.has_file(model_name, v, MANIFEST):
                return self.load_manifest(model_name, v)
        return None

    def versions(self, model_name: str) -> list[int]:
        """The published versions, oldest first (on object storage: those with a manifest)."""
        return [int(n[1:]) for n in self.tree.folders(model_name, VERSION_NAME, MANIFEST)]
