from __future__ import annotations

import os

# Keep torch from oversubscribing the two cores the tests run on.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `last` run after every other test of their module (their order kept)."""
    def module_end(item):
        return (item.module.__name__ if item.module else "", item.get_closest_marker("last") is not None)

    firsts: dict[str, int] = {}
    for i, item in enumerate(items):
        firsts.setdefault(module_end(item)[0], i)
    items.sort(key=lambda it: (firsts[module_end(it)[0]], module_end(it)[1]))
