"""The local stack supervises its services the way Kubernetes would: a service that dies is
started again (up to a limit), and a stack stopped during its start leaves no process behind."""

from __future__ import annotations

import os
import socket
import time

import pytest

from rlhf_devstack.stack import Stack, StackSpec

pytestmark = pytest.mark.integration


def _gone(pgid: int, wait_s: float = 10.0) -> bool:
    """True once no process of the group is left (killed ones take a moment to be reaped)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


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


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, whichever of its threads started them."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(x) for x in open(f"/proc/{pid}/task/{task}/children").read().split()]
    except OSError:
        pass
    return out


@pytest.mark.slow
def test_a_start_that_times_out_leaves_no_process(tmp_path, monkeypatch):
    from rlhf_devstack import stack as stack_mod

    seen: dict[int, list[int]] = {}

    def times_out_once_vllm_runs(addr, timeout_s, proc=None, log=None):
        """The health wait runs out just after vLLM has started its engine process."""
        deadline = time.monotonic() + 180
        while not _children(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "vLLM started no engine process"
            time.sleep(0.2)
        seen[proc.pid] = _children(proc.pid)
        raise TimeoutError(f"service at {addr} not healthy after {timeout_s:.0f}s")

    monkeypatch.setattr(stack_mod, "wait_healthy", times_out_once_vllm_runs)
    st = Stack(StackSpec(run_dir=tmp_path, services=("policy",), rollout_enabled=False))
    with pytest.raises(TimeoutError):
        st.start()
    assert not st.procs and seen
    for pgid, children in seen.items():  # the service and what it started (vLLM's engine core)
        assert _gone(pgid), pgid
        for child in children:
            assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2:3], \
                child


def test_a_port_taken_before_the_service_binds_it_is_replaced(tmp_path, monkeypatch, capsys):
    from rlhf_devstack import stack as stack_mod

    real = stack_mod.free_port
    thief = socket.socket()
    thief.bind(("127.0.0.1", 0))
    thief.listen()
    taken = thief.getsockname()[1]
    picks = [taken]  # the first port picked (the reward's gRPC port) is taken before it binds
    monkeypatch.setattr(stack_mod, "free_port", lambda: picks.pop() if picks else real())
    try:
        with Stack(StackSpec(run_dir=tmp_path, services=("reward",))) as st:
            assert st.addrs["reward"] != f"127.0.0.1:{taken}"
            st.wait_healthy("reward", 60)
        out = capsys.readouterr().out
        assert "(its port was taken); starting again on other free ports" in out, out
    finally:
        thief.close()


def test_a_started_stack_used_in_a_with_block_is_not_started_twice(tmp_path):
    """`with Stack(spec).start() as st:` gives the started stack back, and stops it at the end
    of the block: nothing of it outlives the block."""
    started = Stack(StackSpec(run_dir=tmp_path, services=("reward",))).start()
    procs = dict(started.procs)
    broker = started.broker.proc
    with started as st:
        assert st is started and st.procs == procs and st.broker.proc is broker
    assert all(p.poll() is not None for p in procs.values()) and broker.poll() is not None
