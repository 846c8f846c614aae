"""Starting the reward service as a real process for the reward integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rlhf_common.config import BusConfig
from rlhf_reward.config import RewardConfig
from rlhf_devstack.stack import wait_healthy


def start_reward(cfg: RewardConfig, log_path: Path, bus: BusConfig | None = None) -> subprocess.Popen:
    env = {**os.environ, **cfg.to_env(), "PYTHONUNBUFFERED": "1"}
    if bus is not None:
        env.update(bus.to_env())
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_reward"], env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_healthy(f"127.0.0.1:{cfg.server.port}", 120, proc, log_path)
    deadline = time.monotonic() + 30
    while True:  # REST starts before gRPC, so this is normally immediate
        try:
            if httpx.get(f"http://127.0.0.1:{cfg.http_port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise TimeoutError(f"REST on {cfg.http_port} not healthy:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(30)
