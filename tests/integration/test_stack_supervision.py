"""The local stack supervises its services the way Kubernetes would: a service that dies is
started again (up to a limit), and a stack stopped during its start leaves no process behind."""

from __future__ import annotations

import os
import time

import pytest

from rlhf_devstack.stack import Stack, StackSpec

pytestmark = pytest.mark.integration


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_service_is_restarted_until_the_limit(tmp_path):
    spec = StackSpec(run_dir=tmp_path, services=("reward",), supervise=True, restart_limit=2, restart_window_s=600)
    with Stack(spec) as st:
        first = st.procs["reward"].pid
        st.kill("reward")
        st.wait_healthy("reward", 120)
        assert st.procs["reward"].pid != first and len(st.restarts["reward"]) == 1
        st.kill("reward")
        st.wait_healthy("reward", 120)
        st.kill("reward")  # the third exit within the window: left down, and said so
        deadline = time.monotonic() + 10
        while "reward" not in st.failed and time.monotonic() < deadline:
            time.sleep(0.2)
        assert st.failed == {"reward"} and len(st.restarts["reward"]) == 2
        assert st.procs["reward"].poll() is not None


class RecordingStack(Stack):
    """Remembers every process group it started."""

    def _spawn(self, name: str) -> None:
        super()._spawn(name)
        self.started = [*getattr(self, "started", []), self.procs[name].pid]


@pytest.mark.slow
def test_a_start_that_times_out_leaves_no_process(tmp_path):
    st = RecordingStack(StackSpec(run_dir=tmp_path, services=("policy",), rollout_enabled=False))
    with pytest.raises(TimeoutError):
        st.start(health_timeout_s=40)  # vLLM is still starting: its engine process is up by now
    assert not st.procs and st.started
    for pgid in st.started:  # the service and whatever it started (vLLM's engine core)
        assert _gone(pgid), pgid
