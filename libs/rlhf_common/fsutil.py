"""Publishing a folder atomically: a reader sees the old folder or the new one, never neither."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an existing `final` atomically.

    A missing `final` is a plain rename. An existing one is swapped with `tmp` in one step
    (renameat2), then the old contents are deleted. Where the kernel or file system cannot
    swap, the old folder is first renamed aside and is only deleted after the new one is in
    place, so a crash in between leaves it on disk (as `<name>.old-<pid>`), never lost.
    """
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        aside = final.with_name(f"{final.name}.old-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(final.parent)


def remove_unfinished(folder: Path) -> list[Path]:
    """Delete the `*.tmp-<pid>` folders a killed writer left in `folder`; returns them.
    Only a model's one writer calls this, at its start, when no save of its own is running."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = [p for p in folder.iterdir() if p.is_dir() and ".tmp-" in p.name]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
