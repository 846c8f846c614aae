"""Named points where the fault suite can make a process die as `kill -9` would.

`RLHF_FAILPOINTS=policy.rollouts_written` makes a process that reaches that point exit at
once with status 137, without cleanups, flushes or commits. With `RLHF_FAILPOINTS_ONCE_DIR`
set, each point fires once: it leaves a file of its name there, and a restarted process
passes it. With no variable set (always, outside the fault tests) a point costs one
environment lookup. The points:

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
        once = envs.get("RLHF_FAILPOINTS_ONCE_DIR")
        if once is not None:
            marker = os.path.join(once, name)
            if os.path.exists(marker):
                return
            with open(marker, "w"):
                pass
        log.error("failpoint %s reached: exiting as if killed", name)
        logging.shutdown()
        os._exit(137)
