"""The whole loop: broker + policy (vLLM) + reward + reference + trainer on loopback."""

from __future__ import annotations

import math
import time

import grpc
import pytest
import torch

from rlhf.events.v1 import events_pb2
from rlhf.policy.v1 import policy_pb2
from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.stack import Stack, StackSpec, seed_prompts
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore
from rlhf_trainer.checkpoint import CheckpointStore

from tests.helpers import metric_value, read_topic, run_until_steps, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_PROMPTS = 8
HELDOUT = tiny_prompts(4, seed=555)
GROUP = 4
GROUPS_PER_STEP = 2
EXPECTED_STEPS = N_PROMPTS // GROUPS_PER_STEP


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stack")
    (run_dir / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")
    spec = StackSpec(run_dir=run_dir, rollout_n=GROUP, max_tokens=16, groups_per_step=GROUPS_PER_STEP,
                     max_groups_ahead=4, trainer_lr=1e-4, eval_prompts=run_dir / "heldout.txt", eval_every=2)
    with Stack(spec) as st:
        bad_ids = seed_prompts(st.bus, ["cat " * 600])  # too long for the model: dead-lettered, not fatal
        prompt_ids = seed_prompts(st.bus, tiny_prompts(N_PROMPTS, seed=7))
        status, trainer, policy = run_until_steps(st, EXPECTED_STEPS)
        st.bad_prompt_ids = bad_ids
        yield st, prompt_ids, status, trainer, policy


def test_every_prompt_answered_by_a_full_group(loop_run):
    st, prompt_ids, status, _, _ = loop_run
    expected = N_PROMPTS * GROUP
    rollouts = read_topic(st.bus, Topics().rollouts, events_pb2.Rollout,
                          until=lambda rs: len({r.rollout_id for r in rs}) >= expected)
    by_prompt: dict[str, set[int]] = {}
    for r in {r.rollout_id: r for r in rollouts}.values():
        by_prompt.setdefault(r.prompt_id, set()).add(r.group_index)
        assert len(r.behaviour_logprobs) == len(r.response_token_ids) > 0
    assert set(by_prompt) == set(prompt_ids)
    assert all(idx == set(range(GROUP)) for idx in by_prompt.values())
    assert status.rollouts_consumed == expected
    assert status.step == EXPECTED_STEPS


def test_bad_prompt_goes_to_the_dead_letter_topic(loop_run):
    st, _, _, _, _ = loop_run
    letters = read_topic(st.bus, Topics().dlq, events_pb2.DeadLetter, until=lambda ds: len(ds) >= 1)
    assert len(letters) == 1 and letters[0].key.decode() == st.bad_prompt_ids[0]
    assert letters[0].topic == Topics().prompts and "exceed the context length" in letters[0].error
    bad = events_pb2.Prompt()
    bad.ParseFromString(letters[0].value)
    assert bad.prompt_id == st.bad_prompt_ids[0]


def test_versions_published_and_applied(loop_run):
    st, _, status, _, policy = loop_run
    updates = read_topic(st.bus, Topics().weights, events_pb2.WeightUpdate,
                         until=lambda us: len(us) >= EXPECTED_STEPS)
    versions = [u.version for u in updates]
    assert versions == list(range(1, EXPECTED_STEPS + 1))
    assert len(versions) >= 3
    served = policy.GetVersion(policy_pb2.GetVersionRequest())
    assert served.version == versions[-1]
    assert served.sha256 == updates[-1].sha256
    text = scrape(st.metrics_ports["policy"])
    assert metric_value(text, "rlhf_policy_weight_updates_total", {"outcome": "applied"}) == len(versions)
    assert metric_value(text, "rlhf_policy_version") == versions[-1]


def test_rollouts_after_an_update_carry_the_new_version(loop_run):
    st, _, _, _, _ = loop_run
    rollouts = read_topic(st.bus, Topics().rollouts, events_pb2.Rollout,
                          until=lambda rs: len(rs) >= N_PROMPTS * GROUP)
    versions_in_order = [r.policy_version for r in rollouts]
    # generation is paced by the trainer, so later prompts are answered by later weights
    assert len(rollouts) == N_PROMPTS * GROUP, versions_in_order
    assert versions_in_order == sorted(versions_in_order), versions_in_order
    assert len(set(versions_in_order)) >= 3, versions_in_order
    assert max(versions_in_order) >= 2, versions_in_order


def test_trainer_kl_finite_and_nonzero_after_first_update(loop_run):
    _, _, status, _, _ = loop_run
    steps = {s.step: s for s in status.recent}
    assert steps[1].kl == pytest.approx(0.0, abs=1e-5)  # policy == reference before any update
    for step in range(2, EXPECTED_STEPS + 1):
        assert math.isfinite(steps[step].kl) and steps[step].kl > 0


def test_policy_after_update_equals_transformers_on_saved_weights(loop_run):
    from transformers import AutoModelForCausalLM

    st, _, status, _, policy = loop_run
    store = WeightStore(st.spec.run_dir / "weights")
    checked = 0
    for prompt in tiny_prompts(4, seed=123):
        resp = policy.Generate(policy_pb2.GenerateRequest(
            prompt=prompt, sampling=policy_pb2.SamplingParams(temperature=0.0, max_tokens=16, logprobs=True)))
        assert resp.policy_version == status.version >= 3
        ckpt = store.load_manifest("policy", resp.policy_version)
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
        c = resp.completions[0]
        prompt_ids = list(resp.prompt_token_ids)
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False,
                                pad_token_id=model.config.pad_token_id)[0, len(prompt_ids):].tolist()
            ids = torch.tensor([prompt_ids + list(c.token_ids)])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        assert list(c.token_ids) == hf[: len(c.token_ids)]
        ref = [logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
        assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-3
        checked += 1
    assert checked == 4


@pytest.mark.parametrize("sampling,needle", [
    (policy_pb2.SamplingParams(temperature=-1.0), "temperature=-1.0"),
    (policy_pb2.SamplingParams(max_tokens=100000), "max_tokens=100000"),
    (policy_pb2.SamplingParams(n=65), "n=65"),
    (policy_pb2.SamplingParams(top_k=-3), "top_k=-3"),
])
def test_policy_rejects_bad_sampling_and_keeps_serving(loop_run, sampling, needle):
    _, _, _, _, policy = loop_run
    with pytest.raises(grpc.RpcError) as e:
        policy.Generate(policy_pb2.GenerateRequest(prompt="Hello", sampling=sampling))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()
    ok = policy.Generate(policy_pb2.GenerateRequest(prompt="Hello", sampling=policy_pb2.SamplingParams(max_tokens=2)))
    assert len(ok.completions) == 1 and len(ok.completions[0].token_ids) >= 1


def test_policy_rejects_empty_prompt(loop_run):
    _, _, _, _, policy = loop_run
    with pytest.raises(grpc.RpcError) as e:
        policy.Generate(policy_pb2.GenerateRequest(prompt=""))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_trainer_metrics_describe_the_run(loop_run):
    st, _, status, _, _ = loop_run
    text = scrape(st.metrics_ports["trainer"])
    assert metric_value(text, "rlhf_trainer_step") == EXPECTED_STEPS
    assert metric_value(text, "rlhf_trainer_published_version") == status.version
    assert metric_value(text, "rlhf_trainer_rollouts_consumed_total") == N_PROMPTS * GROUP
    assert metric_value(text, "rlhf_trainer_rollout_version_lag_count") == N_PROMPTS * GROUP
    assert metric_value(text, "rlhf_trainer_kl_nats") == pytest.approx(status.recent[-1].kl)
    # vLLM (float32) and the trainer's transformers agree on the log-probs of on-policy rollouts
    assert 0 <= metric_value(text, "rlhf_trainer_engine_logprob_diff") < 1e-3  # NaN (never measured) fails
    for phase in ("wait", "scoring", "training", "sync"):
        assert metric_value(text, "rlhf_trainer_phase_seconds_count", {"phase": phase}) == EXPECTED_STEPS
    # each step announces its version and commits its offsets, each observed as kafka time
    assert metric_value(text, "rlhf_trainer_phase_seconds_count", {"phase": "kafka"}) >= 2 * EXPECTED_STEPS
    for scorer in ("reward", "reference"):  # one call each per step, as the trainer timed it
        assert metric_value(text, "rlhf_trainer_scorer_call_seconds_count", {"scorer": scorer}) == EXPECTED_STEPS
        assert metric_value(text, "rlhf_trainer_scorer_call_seconds_sum", {"scorer": scorer}) > 0
    policy_text = scrape(st.metrics_ports["policy"])
    for phase in ("generate", "kafka"):  # the rollout worker timed every batch of prompts it took
        assert metric_value(policy_text, "rlhf_policy_rollout_seconds_count", {"phase": phase}) >= 1
    assert metric_value(policy_text, "rlhf_policy_rollout_seconds_sum", {"phase": "generate"}) > 0


def test_heldout_evaluation_reported(loop_run):
    import json

    st, _, _, trainer, _ = loop_run
    deadline = time.monotonic() + 60
    status = trainer.Status(trainer_pb2.StatusRequest())
    while status.last_eval.step < EXPECTED_STEPS and time.monotonic() < deadline:  # eval follows the step
        time.sleep(0.2)
        status = trainer.Status(trainer_pb2.StatusRequest())
    e = status.last_eval
    assert status.HasField("last_eval") and e.step == EXPECTED_STEPS and e.version == status.version
    assert e.prompts == len(HELDOUT) and 0.0 <= e.win_rate <= 1.0
    assert math.isfinite(e.kl) and e.kl > 0 and e.response_length > 0
    lines = [json.loads(x) for x in (st.spec.run_dir / "weights" / "policy-eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    text = scrape(st.metrics_ports["trainer"])
    assert metric_value(text, "rlhf_trainer_eval_win_rate") == pytest.approx(e.win_rate)
    assert metric_value(text, "rlhf_trainer_eval_kl_nats") == pytest.approx(e.kl)


@pytest.mark.last
def test_trainer_killed_and_restarted_continues_exactly(loop_run):
    """Marked `last` (run after the module's other tests): it changes the shared stack. kill -9 the trainer when idle and again in the
    middle of training, restart it each time; nothing may be lost or trained twice."""
    st, _, status, _, policy = loop_run
    # The full training state is saved every 50 steps, and when the trainer has been idle
    # for 10 s: a kill when idle loses nothing.
    states = CheckpointStore(st.spec.run_dir / "weights" / "policy-trainer-state")
    deadline = time.monotonic() + 60
    while (states.steps() or [0])[-1] < status.step and time.monotonic() < deadline:
        time.sleep(0.5)
    assert states.steps()[-1] == status.step
    assert st.kill("trainer") == -9
    st.restart("trainer")
    trainer = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(st.addrs["trainer"]))
    after = trainer.Status(trainer_pb2.StatusRequest())
    # the state equals the one saved after the last step
    assert (after.version, after.step, after.groups_consumed, after.rollouts_consumed) == (
        status.version, status.step, status.groups_consumed, status.rollouts_consumed)

    heldout = seed_prompts(st.bus, HELDOUT[:1])  # answered by the policy, never trained on
    more = seed_prompts(st.bus, tiny_prompts(2 * GROUPS_PER_STEP, seed=99))
    deadline = time.monotonic() + 120
    while after.step < EXPECTED_STEPS + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = trainer.Status(trainer_pb2.StatusRequest())
    assert after.step == EXPECTED_STEPS + 1
    # mid-run, one step after the last training state: that step is lost and made again
    assert st.kill("trainer") == -9
    st.restart("trainer")
    trainer = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(st.addrs["trainer"]))
    after = trainer.Status(trainer_pb2.StatusRequest())
    while after.step < EXPECTED_STEPS + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        after = trainer.Status(trainer_pb2.StatusRequest())
    assert after.step == EXPECTED_STEPS + 2 and after.version >= status.version + 2
    # nothing lost and nothing trained twice: every rollout of every prompt, once. The
    # held-out group shares the first batch with more[0], so more[-1] is still waiting.
    assert after.rollouts_consumed == (N_PROMPTS + len(more) - 1) * GROUP
    assert after.groups_consumed == N_PROMPTS + len(more)
    while policy.GetVersion(policy_pb2.GetVersionRequest()).version < after.version and time.monotonic() < deadline:
        time.sleep(0.2)
    assert policy.GetVersion(policy_pb2.GetVersionRequest()).version == after.version
    rollouts = read_topic(st.bus, Topics().rollouts, events_pb2.Rollout,
                          until=lambda rs: len(rs) >= (N_PROMPTS + len(more) + 1) * GROUP)
    assert {r.prompt_id for r in rollouts} >= set(heldout)
    new = [r for r in rollouts if r.prompt_id in set(more)]
    assert len({(r.prompt_id, r.group_index) for r in new}) == len(more) * GROUP
    assert all(r.policy_version >= status.version for r in new)
    updates = read_topic(st.bus, Topics().weights, events_pb2.WeightUpdate,
                         until=lambda us: any(u.version == after.version for u in us))
    versions = [u.version for u in updates]
    # numbers are never reused; the first restart announced its state's version once more
    assert versions == sorted(versions) and versions[-1] == after.version
    assert set(range(1, EXPECTED_STEPS + 2)) <= set(versions)
    assert [u.version for u in updates].count(EXPECTED_STEPS) == 2
    # The second restart continued from the state of step EXPECTED_STEPS: version
    # EXPECTED_STEPS + 1 (step EXPECTED_STEPS + 1) was left behind, the state's weights were
    # published as the next version, and step EXPECTED_STEPS + 1 was made again.
    steps = [(u.version, u.step) for u in updates if u.version > EXPECTED_STEPS]
    assert steps[:3] == [(EXPECTED_STEPS + 1, EXPECTED_STEPS + 1), (EXPECTED_STEPS + 2, EXPECTED_STEPS),
                         (EXPECTED_STEPS + 3, EXPECTED_STEPS + 1)], steps
