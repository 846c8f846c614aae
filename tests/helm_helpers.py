"""Helpers shared by the Helm chart's unit tests and the live Prometheus test."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "k8s" / "rlhf-stack"

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """(metric name, label names it matches on) for every series selector of a PromQL expression."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?", " ", s)
    out = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", s):
        name, matchers, call = m.groups()
        if call or name in KEYWORDS:
            continue
        out.append((name, re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or "")))
    return out


def dashboard_queries(namespace: str) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, PromQL) for every target of the chart's Grafana
    dashboards, with the dashboards' `$namespace` variable set."""
    out = []
    for path in sorted((CHART / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                out.append((dash["uid"], panel["title"], t["expr"].replace("$namespace", namespace)))
    return out
