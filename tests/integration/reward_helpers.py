"""Starting the reward service as a real process for the reward integration tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rlhf_common.config import BusConfig
from rlhf_reward.config import RewardConfig
from tests.helpers import start_service


def start_reward(cfg: RewardConfig, log_path: Path, bus: BusConfig | None = None) -> subprocess.Popen:
    return start_service("rlhf_reward", cfg, log_path, bus)


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(30)
