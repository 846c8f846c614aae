"""The one reader of JSONL data files (training data, preference pairs, held-out prompts).

Errors name the file and the line; no bad line is skipped silently.
"""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    pass


def _lines(path: Path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield i, line


def read_jsonl(path: Path, fields: tuple[str, ...], may_be_empty: tuple[str, ...] = ("prompt",)) -> list[dict]:
    """Rows that hold every field in `fields` as a string (non-blank unless in `may_be_empty`);
    other keys are kept as they are."""
    rows = []
    for i, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected an object with {list(fields)}")
        for f in fields:
            if f not in row:
                raise DataError(f"{path}:{i}: missing field {f!r}")
            if not isinstance(row[f], str):
                raise DataError(f"{path}:{i}: field {f!r} must be a string, got {type(row[f]).__name__}")
            if f not in may_be_empty and not row[f].strip():
                raise DataError(f"{path}:{i}: field {f!r} is empty")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_prompts(path: Path) -> list[str]:
    """Prompts, one per line, or JSONL objects with a "prompt" string."""
    out = []
    for i, line in _lines(path):
        line = line.strip()
        if not line.startswith("{"):
            out.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(row.get("prompt"), str):
            raise DataError(f"{path}:{i}: expected a JSON object with a 'prompt' string")
        out.append(row["prompt"])
    if not out:
        raise DataError(f"{path}: no prompts")
    return out
