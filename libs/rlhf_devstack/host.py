"""What machine a run is on, for the results files of the benchmarks and the demo's report."""

from __future__ import annotations

import platform
from pathlib import Path


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc file; None where there is none."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), None)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    return _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def mem_gib() -> float:
    """Total memory in GiB (0 where /proc/meminfo is missing)."""
    total = _proc_field("/proc/meminfo", "MemTotal")
    return round(int(total.split()[0]) / 2 ** 20, 1) if total else 0.0
