"""Training-state checkpoints restore the learner exactly."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

from prometheus_client import CollectorRegistry

from rlhf_devstack.models import make_tiny_llama
from rlhf_trainer.checkpoint import CheckpointStore, TrainerState
from rlhf_trainer.learner import LearnerConfig, PolicyLearner, RolloutBatch
from rlhf_trainer.metrics import TrainerMetrics
from rlhf_trainer.rewards import RewardWhitener


def _batch() -> RolloutBatch:
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
    responses = [[10, 11], [12], [13, 14, 15], [16]]
    return RolloutBatch(prompts, responses, [[-3.0] * len(r) for r in responses],
                        [[-3.0] * len(r) for r in responses], [1.0, 0.0, 0.5, 0.2], ["a", "a", "b", "b"])


def test_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    path = make_tiny_llama(tmp_path / "m")
    cfg = LearnerConfig(algorithm="ppo", lr=1e-3, kl_target=0.1, epochs=2, minibatch_size=2)

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, PolicyLearner(model, cfg, pad_id=0)

    model_a, learner_a = fresh()
    learner_a.step(_batch())
    model_a.save_pretrained(tmp_path / "w1")
    store = CheckpointStore(tmp_path / "state", keep=2)
    store.save(TrainerState(step=1, version=1, weights_path=str(tmp_path / "w1"), weights_sha256="x",
                            groups_consumed=2, rollouts_consumed=4, offsets={0: 4}, trained_ids=["r1", "r2"],
                            learner=learner_a.state_dict(), torch_rng=torch.get_rng_state()))
    st = store.latest()
    assert (st.step, st.offsets, st.trained_ids) == (1, {0: 4}, ["r1", "r2"])

    model_b = AutoModelForCausalLM.from_pretrained(st.weights_path, dtype=torch.float32)
    learner_b = PolicyLearner(model_b, cfg, pad_id=0)
    learner_b.load_state_dict(st.learner)
    assert learner_b.kl_ctl.beta == learner_a.kl_ctl.beta != cfg.kl_beta  # adaptive beta moved and was kept
    for pa, pb in zip(learner_a.value_head.parameters(), learner_b.value_head.parameters()):
        assert torch.equal(pa, pb)
    # the next step from the restored state equals the next step of the original
    ra, rb = learner_a.step(_batch()), learner_b.step(_batch())
    assert ra.loss == rb.loss and ra.kl == rb.kl
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_store_keeps_newest_and_ignores_partial(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3):
        store.save(TrainerState(step=step, version=step, weights_path="w", weights_sha256="", groups_consumed=0,
                                rollouts_consumed=0, offsets={}, trained_ids=[], learner={},
                                torch_rng=torch.get_rng_state()))
    (tmp_path / "step-00000009.tmp-1").mkdir()  # a crash mid-save leaves only a temp folder
    assert store.steps() == [2, 3]
    assert store.latest().step == 3


class _Payload:
    """Anything but tensors and plain containers: loading it would run arbitrary code."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "state")
    folder = store.folder(1)
    folder.mkdir(parents=True)
    torch.save({"step": 1, "payload": _Payload()}, folder / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        store.latest()


def test_kl_metrics_name_the_configured_estimator():
    reg = CollectorRegistry()
    TrainerMetrics(reg, kl_estimator="k1")
    helps = {m.name: m.documentation for m in reg.collect()}
    assert "k1 estimator" in helps["rlhf_trainer_kl_nats"] and "k1 estimator" in helps["rlhf_trainer_eval_kl_nats"]
    assert "k3" not in helps["rlhf_trainer_kl_nats"]


def test_rewards_are_whitened_per_reward_version_and_the_state_survives_a_checkpoint(tmp_path):
    w = RewardWhitener()
    assert w([1.0], "v1") == [0.0]  # one score: no scale yet
    out = w([2.0, 3.0], "v1")
    assert out == pytest.approx([0.0, 1.0], abs=1e-5)  # mean 2, std 1 over {1, 2, 3}
    # a new reward version on another scale starts its statistics afresh
    assert w([100.0, 300.0], "v2") == pytest.approx([-0.7071, 0.7071], abs=1e-3) and w.resets == 1
    store = CheckpointStore(tmp_path / "state")
    store.save(TrainerState(step=1, version=1, weights_path="", weights_sha256="", groups_consumed=0,
                            rollouts_consumed=0, offsets={}, trained_ids=[], learner={},
                            torch_rng=torch.get_rng_state(), extra={"whitener": w.state_dict()}))
    back = RewardWhitener()
    back.load_state_dict(store.latest().extra["whitener"])
    assert back([200.0], "v2") == w([200.0], "v2") and back.resets == 1


def test_saves_a_killed_writer_left_unfinished_are_removed(tmp_path):
    from rlhf_common.weights import WeightStore

    store = CheckpointStore(tmp_path / "state")
    for name in ("step-00000003", "step-00000004.tmp-4242"):
        (store.root / name).mkdir(parents=True)
        (store.root / name / "state.pt").write_bytes(b"x")
    weights = WeightStore(tmp_path / "weights")
    (weights.root / "policy" / "v00000002.tmp-77").mkdir(parents=True)
    (weights.root / "policy" / "v00000001").mkdir()
    assert [p.name for p in store.remove_unfinished()] == ["step-00000004.tmp-4242"]
    assert [p.name for p in weights.remove_unfinished("policy")] == ["v00000002.tmp-77"]
    assert sorted(p.name for p in store.root.iterdir()) == ["step-00000003"]
    assert sorted(p.name for p in (weights.root / "policy").iterdir()) == ["v00000001"]
