"""A folder tree on a local file system or on object storage, for the weight store and the
trainer's state: `open_tree(url)` gives one interface over two backends.

- `LocalTree` (a path or a file:// URL, on a volume every reader mounts): a folder is built
  under a temporary name beside its final place (`<name>.tmp-<pid>`) and published by an
  atomic rename (`fsutil.publish_dir`), so a reader sees the old folder or the new one.
- `RemoteTree` (any fsspec URL: s3:// through s3fs, which the library installs; gs:// and
  az:// once gcsfs or adlfs is installed). Object stores have no rename, so a folder is built
  in a local temporary folder, its files are uploaded, and its marker (the manifest,
  `rlhf_manifest.json`) is uploaded LAST: a folder exists for readers only once its marker
  exists. Listings skip folders without one, and an upload killed half-way leaves a
  marker-less folder that the writer removes at its next start (`unfinished`). Replacing or
  deleting a folder removes its marker first, so it is invisible while it changes.

Readers never read a remote folder in place: `download_to` copies it into a local folder
under a temporary name, checks it, and renames it into place (weights.fetch, the trainer's
state). `WeightCacheConfig` says where those copies live.

Credentials and endpoints come from the object store's own standard variables, read by its
client library (S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or
AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for S3-compatible stores such as MinIO, which
botocore honours). URLs in messages have any user:password part removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from .config import BaseConfig, setting
from .fsutil import publish_dir, remove_unfinished


@dataclass
class WeightCacheConfig(BaseConfig):
    """Local copies of weight versions read from object storage (every service that loads weights)."""

    ENV: ClassVar[str] = "RLHF"
    cache_dir: str = setting("", "WEIGHT_CACHE_DIR",
                             "Folder for verified local copies of versions (and training state) read from an "
                             "object-storage weight store; empty: the system temp dir's rlhf-weight-cache. Unused "
                             "with a path or file:// store")
    cache_keep: int = setting(3, "WEIGHT_CACHE_KEEP",
                              "Downloaded versions kept in the weight cache; the least recently used go")

    def validate(self) -> None:
        self.check(self.cache_keep >= 1, "cache_keep", "must be >= 1")

    def folder(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(tempfile.gettempdir()) / "rlhf-weight-cache"


def is_remote(url: str | Path) -> bool:
    """True for an fsspec URL other than file:// (s3://, gs://, az://, ...)."""
    s = str(url)
    return "://" in s and not s.startswith("file://")


def redact(url: str) -> str:
    """The URL without a user:password part (never shown in logs or errors)."""
    return re.sub(r"^([A-Za-z0-9+.-]+://)[^/@]*@", r"\1", str(url))


def local_path(url: str | Path) -> Path:
    """The path of a local URL (a path or file:// URL); a remote URL is refused."""
    s = str(url)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if "://" in s:
        raise ValueError(f"{redact(s)!r} is not a local path or file:// URL")
    return Path(s)


def join(url: str | Path, *parts: str) -> str:
    """`url` with path parts added, as a string (a path stays a path)."""
    if is_remote(url):
        return "/".join([str(url).rstrip("/"), *parts])
    return str(local_path(url).joinpath(*parts))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalTree:
    """A folder tree on a local or mounted file system; folders published by atomic rename."""

    remote = False

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def where(self, rel: str = "") -> Path:
        """What callers keep and announce: the folder's path."""
        return self._p(rel)

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def read_text(self, rel: str) -> str:
        return self._p(rel).read_text(encoding="utf-8")

    def append_line(self, rel: str, line: str) -> None:
        path = self._p(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a crash mid-line: start the next entry on its own line
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n" if torn else "") + line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def folders(self, rel: str, pattern: re.Pattern, marker: str) -> list[str]:
        """Names of the published folders under `rel` whose name matches `pattern` (a renamed
        folder is complete: the marker is not needed here)."""
        d = self._p(rel)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and pattern.fullmatch(p.name))

    def unfinished(self, rel: str, pattern: re.Pattern, marker: str) -> list[Path]:
        """Delete the `*.tmp-<pid>` folders a killed writer left under `rel`; returns them."""
        return remove_unfinished(self._p(rel))

    def staging(self, rel: str) -> Path:
        """An empty folder to build `rel` in: beside it, so the rename is atomic."""
        final = self._p(rel)
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, staged: Path, rel: str, marker: str) -> None:
        publish_dir(staged, self._p(rel))

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def remove(self, rel: str, marker: str) -> None:
        shutil.rmtree(self._p(rel), ignore_errors=True)


class RemoteTree:
    """A folder tree on object storage through fsspec; a folder is visible once its marker is."""

    remote = True

    def __init__(self, url: str):
        import fsspec
        from fsspec.registry import known_implementations

        self.url = url.rstrip("/")
        self.scheme = url.split("://", 1)[0]
        try:
            # No instance cache: a filesystem object keeps the endpoint and credentials it was
            # made with, and listings are read fresh (invalidate_cache) before every decision.
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        except ImportError as e:
            impl = known_implementations.get(self.scheme, {}).get("class", "")
            package = impl.split(".", 1)[0] or "its fsspec implementation"
            raise ValueError(f"weight store {redact(self.url)!r}: the {self.scheme}:// scheme needs the {package} "
                             f"package (pip install {package}): {e}") from None
        self.root = self.root.rstrip("/")

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def where(self, rel: str = "") -> str:
        """What callers keep and announce: the folder's URL (in the scheme it was given)."""
        return f"{self.scheme}://{self._p(rel)}"

    def _files(self, rel: str) -> list[str]:
        """Every object under `rel`/ (paths without the scheme)."""
        base = self._p(rel)
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        return sorted(f for f in found if f.startswith(base + "/"))

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self._p(rel))

    def read_text(self, rel: str) -> str:
        return self.fs.cat_file(self._p(rel)).decode("utf-8")

    def append_line(self, rel: str, line: str) -> None:
        """Read, add a line, write back: fine for a file with one writer (a model's lineage)."""
        old = self.read_text(rel) if self.exists(rel) else ""
        if old and not old.endswith("\n"):
            old += "\n"
        self.fs.pipe_file(self._p(rel), (old + line + "\n").encode("utf-8"))

    def _children(self, rel: str, pattern: re.Pattern, marker: str) -> dict[str, bool]:
        """Subfolder name -> whether its marker exists, for names matching `pattern`."""
        base = self._p(rel)
        out: dict[str, bool] = {}
        for f in self._files(rel):
            parts = f[len(base) + 1:].split("/")
            if len(parts) >= 2 and pattern.fullmatch(parts[0]):
                out[parts[0]] = out.get(parts[0], False) or (len(parts) == 2 and parts[1] == marker)
        return out

    def folders(self, rel: str, pattern: re.Pattern, marker: str) -> list[str]:
        """Names of the complete folders under `rel` (those whose marker exists)."""
        return sorted(n for n, done in self._children(rel, pattern, marker).items() if done)

    def unfinished(self, rel: str, pattern: re.Pattern, marker: str) -> list[str]:
        """Delete folders under `rel` that have no marker (uploads killed half-way, removals
        cut short); returns their URLs. Only the tree's one writer calls this, at its start."""
        gone = []
        for name, done in sorted(self._children(rel, pattern, marker).items()):
            if not done:
                sub = f"{rel}/{name}" if rel else name
                self.fs.rm(self._p(sub), recursive=True)
                gone.append(self.where(sub))
        return gone

    def staging(self, rel: str) -> Path:
        """An empty local folder (named like `rel`'s last part) to build `rel` in."""
        parent = Path(tempfile.mkdtemp(prefix="rlhf-stage-"))
        tmp = parent / (rel.rsplit("/", 1)[-1] or "root")
        tmp.mkdir()
        return tmp

    def publish(self, staged: Path, rel: str, marker: str) -> None:
        """Upload the folder `staged` as `rel`: its files, then `marker` last; any earlier
        folder of that name is made invisible (its marker deleted) and removed first."""
        if not (staged / marker).is_file():
            raise ValueError(f"{staged} has no {marker}: a folder is published with its marker")
        try:
            base = self._p(rel)
            if self.exists(f"{rel}/{marker}"):
                self.fs.rm_file(f"{base}/{marker}")
            old = self._files(rel)
            if old:
                self.fs.rm(old)
            files = [p for p in sorted(staged.rglob("*")) if p.is_file() and p != staged / marker]
            if files:
                self.fs.put([str(p) for p in files], [f"{base}/{p.relative_to(staged).as_posix()}" for p in files])
            self.fs.put_file(str(staged / marker), f"{base}/{marker}")
        finally:
            self.discard(staged)

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged.parent if staged.parent.name.startswith("rlhf-stage-") else staged, ignore_errors=True)

    def remove(self, rel: str, marker: str) -> None:
        """Delete a folder: its marker first (readers stop seeing it), then the rest."""
        base = self._p(rel)
        if self.exists(f"{rel}/{marker}"):
            self.fs.rm_file(f"{base}/{marker}")
        files = self._files(rel)
        if files:
            self.fs.rm(files)

    def download(self, rel: str, dest: Path) -> None:
        """Copy every object under `rel` into the local folder `dest` (created)."""
        base = self._p(rel)
        files = self._files(rel)
        if not files:
            raise FileNotFoundError(f"nothing at {redact(self.where(rel))}")
        local = [dest / f[len(base) + 1:] for f in files]
        for p in local:
            p.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(files, [str(p) for p in local])


Tree = LocalTree | RemoteTree


def open_tree(url: str | Path) -> Tree:
    """The tree at a path, a file:// URL or any fsspec URL (s3://bucket/prefix, ...)."""
    return RemoteTree(str(url)) if is_remote(url) else LocalTree(local_path(url))


def url_key(url: str) -> str:
    """A short stable name for a URL (cache folder names)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]


def download_to(tree: RemoteTree, rel: str, parent: Path, name: str, settle: Callable[[Path], Path]) -> Path:
    """Copy folder `rel` of a remote tree to `<slot>/<name>` under the local folder `parent`.

    It is downloaded into a temporary folder beside the slot; `settle(folder)` checks the
    copy (raising refuses it) and returns the slot it belongs in; the temporary folder is then
    renamed to the slot. Nothing half-written is left: a failed or refused copy is deleted.
    If another process settled the same slot meanwhile, its copy is kept."""
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(".tmp-*"):  # copies of processes that died mid-download
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tree.download(rel, tmp / name)
        slot = settle(tmp / name)
        try:
            os.rename(tmp, slot)
        except OSError:
            if not (slot / name).is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return slot / name


def evict(parent: Path, keep: int, protect: Path) -> list[Path]:
    """Delete all but the `keep` most recently used slots under `parent` (never `protect`)."""
    def used(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except FileNotFoundError:  # another process evicted it meanwhile
            return 0.0

    slots = sorted((p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=used, reverse=True)
    gone = [p for p in slots[keep:] if p != protect]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
