"""rlhfctl as an operator runs it, against a real stack (broker, policy on vLLM, reward,
reference, trainer, feedback) found through its stack.json: status and its versions, pause
and resume, a rollback the policy serves, tail, the trace of an answer with feedback, and
clear errors for addresses where nothing answers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from rlhf.events.v1 import events_pb2
from rlhf.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf_common.trace import label_id
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.stack import Stack, StackSpec, free_port, seed_prompts

pytestmark = pytest.mark.integration

SERVICES = ("reward", "reference", "trainer", "feedback", "policy")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    policy_model, reward_model = tiny_models
    run_dir = tmp_path_factory.mktemp("ctl-stack")
    spec = StackSpec(run_dir=run_dir, policy_model=policy_model, reward_model=reward_model, services=SERVICES,
                     rollout_n=2, max_tokens=8, groups_per_step=1, max_groups_ahead=2)
    st = Stack(spec).start(detach=True)  # detach: writes stack.json, as `make up` does
    try:
        yield st
    finally:
        st.stop()


def ctl(*args: str, run_dir=None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run rlhfctl; the environment names no stack, so what it finds comes from the run dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    where = ["--run-dir", str(run_dir)] if run_dir is not None else []
    return subprocess.run([sys.executable, "-m", "rlhf_devstack.ctl", *args, *where], env=env,
                          capture_output=True, text=True, timeout=timeout)


def status(st) -> dict:
    out = ctl("status", "--json", "--window", "0", run_dir=st.spec.run_dir)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_status(st, cond, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not cond(s := status(st)):
        assert time.monotonic() < deadline, s
        time.sleep(0.5)
    return s


def test_status_shows_versions_and_advances_after_a_step(stack):
    s = status(stack)
    assert {n: r["health"] for n, r in s["services"].items()} == {
        "policy": "SERVING", "reward": "SERVING", "reference": "SERVING", "trainer": "SERVING",
        "feedback": "SERVING", "reward_learner": "not configured"}
    assert s["services"]["policy"]["version"] == 0 and s["services"]["trainer"]["step"] == 0
    assert s["lag"]["policy_versions_behind"] == 0 and s["kafka"]["reachable"]
    seed_prompts(stack.bus, tiny_prompts(4, seed=11))
    s = wait_status(stack, lambda s: s["services"]["trainer"]["step"] >= 2 and s["services"]["policy"]["version"] >= 2)
    trainer = s["services"]["trainer"]
    assert trainer["version"] >= 2 and not trainer["paused"] and trainer["last_step"]["kind"] == "rollouts"
    assert s["metrics"]["trainer"]["step"] >= 2 and "KL nats" in s["metrics"]["trainer"]
    assert s["lag"]["trainer_rollouts"] is not None
    text = ctl("status", "--window", "1", run_dir=stack.spec.run_dir)
    assert text.returncode == 0, text.stderr
    row = next(ln for ln in text.stdout.splitlines() if ln.startswith("trainer "))
    assert "SERVING" in row and re.search(r"step \d+, running, grpo", row)
    assert re.search(r"policy serves v\d+, trainer published v\d+", text.stdout)
    assert re.search(r"policy +version \d+, tokens/s [\d.]+", text.stdout)  # a rate between two scrapes


def test_pause_stops_steps_and_resume_restarts_them(stack):
    out = ctl("pause", run_dir=stack.spec.run_dir)
    assert out.returncode == 0 and out.stdout.startswith("trainer paused at step"), out.stderr
    paused = status(stack)["services"]["trainer"]
    assert paused["paused"]
    seed_prompts(stack.bus, tiny_prompts(4, seed=12))
    # the step the trainer was gathering rollouts for when paused may still be made; then none
    time.sleep(5.0)
    held = status(stack)
    assert held["services"]["trainer"]["step"] <= paused["step"] + 1
    assert held["lag"]["trainer_rollouts"] > 0  # rollouts wait for it
    time.sleep(4.0)
    assert status(stack)["services"]["trainer"]["step"] == held["services"]["trainer"]["step"]
    out = ctl("resume", run_dir=stack.spec.run_dir)
    assert out.returncode == 0 and out.stdout.startswith("trainer running"), out.stderr
    wait_status(stack, lambda s: s["services"]["trainer"]["step"] > paused["step"])


def test_rollback_makes_the_policy_serve_an_older_version(stack):
    assert ctl("pause", run_dir=stack.spec.run_dir).returncode == 0
    time.sleep(2.0)
    s = wait_status(stack, lambda s: s["services"]["policy"]["version"] == s["services"]["trainer"]["version"])
    latest = s["services"]["trainer"]["version"]
    assert latest >= 3
    target = latest - 2
    out = ctl("rollback", str(target), "--wait", "60", run_dir=stack.spec.run_dir, timeout=90)
    assert out.returncode == 0, out.stderr
    assert f"published rollback of 'policy' to version {target}" in out.stdout
    assert f"serves v{target}" in out.stdout
    policy = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(stack.addrs["policy"]))
    r = policy.Generate(policy_pb2.GenerateRequest(prompt="Tell me about the cat.", sampling=policy_pb2.SamplingParams(
        temperature=0.0, max_tokens=4)))
    assert r.policy_version == target
    s = status(stack)
    assert s["services"]["policy"]["version"] == target and s["lag"]["policy_versions_behind"] == 2
    out = ctl("rollback", "999", run_dir=stack.spec.run_dir)
    assert out.returncode == 2 and "version 999 of 'policy' is not in" in out.stderr
    assert ctl("resume", run_dir=stack.spec.run_dir).returncode == 0


def test_tail_prints_records(stack):
    out = ctl("tail", "rollouts", "-n", "3", run_dir=stack.spec.run_dir)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    assert all(re.match(r"\d\d:\d\d:\d\d  [0-9a-f]{32}  v\d+  prompt \w+ [12]/2  \d+ tokens  \"", ln) for ln in lines)
    out = ctl("tail", "weights", "-n", "50", run_dir=stack.spec.run_dir)
    assert re.search(r"  policy  v\d+  full  ROLLBACK  ", out.stdout), out.stdout
    # --follow prints what arrives after it started, until interrupted
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    follow = subprocess.Popen([sys.executable, "-m", "rlhf_devstack.ctl", "tail", "generations", "-n", "0",
                               "--follow", "--run-dir", str(stack.spec.run_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # connected and at the end of the topic
        policy = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(stack.addrs["policy"]))
        r = policy.Generate(policy_pb2.GenerateRequest(prompt="Explain why the sun.", sampling=policy_pb2.SamplingParams(
            temperature=0.0, max_tokens=4)))
        line = follow.stdout.readline()
        assert line.split()[1] == r.completions[0].generation_id and f"v{r.policy_version}" in line
    finally:
        follow.send_signal(signal.SIGINT)
        _, err = follow.communicate(timeout=20)
    assert follow.returncode == 0 and "Traceback" not in err


def test_trace_tells_the_story_of_an_answer_with_feedback(stack):
    policy = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(stack.addrs["policy"]))
    r = policy.Generate(policy_pb2.GenerateRequest(prompt="Write a short poem about the dog.",
                                                   sampling=policy_pb2.SamplingParams(temperature=1.0, max_tokens=6,
                                                                                      n=2, seed=5)))
    a, b = r.completions
    fids = [f"ctl-{uuid.uuid4().hex}", f"ctl-{uuid.uuid4().hex}"]
    fb = feedback_pb2_grpc.FeedbackServiceStub(grpc.insecure_channel(stack.addrs["feedback"]))
    fb.Submit(feedback_pb2.SubmitRequest(items=[
        feedback_pb2.FeedbackItem(feedback_id=fids[0], generation_id=a.generation_id, thumb=events_pb2.THUMB_UP),
        feedback_pb2.FeedbackItem(feedback_id=fids[1], generation_id=a.generation_id, pairwise=events_pb2.Pairwise(
            other_generation_id=b.generation_id, choice=events_pb2.CHOICE_A))]), timeout=30)
    deadline = time.monotonic() + 60
    while True:  # the join makes the labels shortly after the feedback arrives
        out = ctl("trace", a.generation_id, "--json", run_dir=stack.spec.run_dir)
        assert out.returncode == 0, out.stderr
        t = json.loads(out.stdout)
        if len(t["labels"]) == 2 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert t["generation"]["generation_id"] == a.generation_id
    assert int(t["generation"].get("policy_version", 0)) == r.policy_version
    assert [f["feedback_id"] for f in t["feedback"]] == fids
    assert {x["label_id"] for x in t["labels"]} == {label_id(f) for f in fids}
    text = ctl("trace", a.generation_id, run_dir=stack.spec.run_dir).stdout
    assert f"generation {a.generation_id}\n  policy version {r.policy_version}" in text
    assert f"  {fids[1]}  pairwise:" in text and "labels (2)" in text
    # the feedback service's own command gives the same story
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}, **stack.bus.to_env()}
    same = subprocess.run([sys.executable, "-m", "rlhf_feedback.trace", a.generation_id, "--json", "--weight-store",
                           str(stack.spec.run_dir / "weights")], env=env, capture_output=True, text=True, timeout=60)
    assert same.returncode == 0 and json.loads(same.stdout) == t, same.stderr
    missing = ctl("trace", "never-served", run_dir=stack.spec.run_dir)
    assert missing.returncode == 1 and "not found on the generations topic" in missing.stdout


def test_unreachable_addresses_give_a_clear_error_and_exit_code(stack, tmp_path):
    port = free_port()
    out = ctl("pause", "--trainer", f"127.0.0.1:{port}", run_dir=stack.spec.run_dir)
    assert (out.returncode, out.stderr) == (1, f"error: trainer at 127.0.0.1:{port} unreachable (UNAVAILABLE)\n")
    out = ctl("status", "--reward", f"127.0.0.1:{port}", "--window", "0", run_dir=stack.spec.run_dir)
    assert out.returncode == 1 and f"error: reward at 127.0.0.1:{port}: unreachable" in out.stderr
    assert re.search(rf"reward +127\.0\.0\.1:{port} +unreachable", out.stdout)  # the rest still shown
    out = ctl("tail", "labels", "--kafka", f"127.0.0.1:{port}", "--timeout-s", "2", run_dir=stack.spec.run_dir)
    assert out.returncode == 1 and out.stderr.startswith(f"error: Kafka at 127.0.0.1:{port} unreachable")
    out = ctl("status", run_dir=tmp_path)
    assert out.returncode == 2 and out.stderr == (f"error: no stack.json in {tmp_path} (start a stack with "
                                                  "`make up`, or give addresses)\n")
