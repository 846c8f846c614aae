"""Named points where the fault suite can make a process die as `kill -9` would.

`RLHF_FAILPOINTS=policy.rollouts_written` makes a process that reaches that point exit at
once with status 137, without cleanups, flushes or commits. With no variable set (always,
outside the fault tests) a point costs one environment lookup. The points:

| name | where |
|---|---|
| `policy.rollouts_written` | the rollout worker has written a batch's rollouts, not yet committed its prompts |
| `trainer.weights_published` | the trainer has published a version, not yet committed its rollout offsets |
"""

from __future__ import annotations

import logging
import os

from . import envs

log = logging.getLogger(__name__)


def reached(name: str) -> None:
    armed = envs.get("RLHF_FAILPOINTS")
    if armed and name in armed.split(","):
        log.error("failpoint %s reached: exiting as if killed", name)
        logging.shutdown()
        os._exit(137)
