"""Samples grouped by prompt: the grouping GRPO and RLOO share."""

from __future__ import annotations


def group_indices(group_ids: list[str]) -> list[list[int]]:
    """Sample indices per group, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return list(groups.values())
