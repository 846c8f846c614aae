from __future__ import annotations

import pytest

from rlhf_common.config import BusConfig, ConfigError
from rlhf_policy.config import PolicyConfig
from rlhf_trainer.config import TrainerConfig


def test_env_then_flags_precedence(monkeypatch):
    monkeypatch.setenv("RLHF_POLICY_MODEL", "/m")
    monkeypatch.setenv("RLHF_POLICY_PORT", "6000")
    monkeypatch.setenv("RLHF_POLICY_ROLLOUT_ENABLED", "false")
    cfg = PolicyConfig.load(["--port", "7000"])
    assert cfg.model == "/m" and cfg.server.port == 7000 and cfg.rollout_enabled is False


@pytest.mark.parametrize("env,value,needle", [
    ("RLHF_POLICY_PORT", "70000", "RLHF_POLICY_PORT=70000"),
    ("RLHF_POLICY_PORT", "abc", "RLHF_POLICY_PORT='abc'"),
    ("RLHF_POLICY_DTYPE", "int4", "must be one of"),
    ("RLHF_POLICY_ROLLOUT_N", "0", "RLHF_POLICY_ROLLOUT_N=0"),
    ("RLHF_POLICY_MAX_TOKENS", "600", "below RLHF_POLICY_MAX_MODEL_LEN"),
    ("RLHF_POLICY_ROLLOUT_ENABLED", "perhaps", "boolean"),
])
def test_bad_values_are_shown(monkeypatch, env, value, needle):
    monkeypatch.setenv("RLHF_POLICY_MODEL", "/m")
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as e:
        PolicyConfig.load()
    assert needle in str(e.value)


def test_missing_model_is_reported():
    with pytest.raises(ConfigError, match="RLHF_TRAINER_MODEL"):
        TrainerConfig(weight_store="/w")


def test_bus_bootstrap_must_have_port():
    with pytest.raises(ConfigError, match="host:port"):
        BusConfig(bootstrap="localhost")


def test_to_env_round_trips(monkeypatch):
    cfg = TrainerConfig(model="/m", weight_store="/w", lr=3e-4, kl_beta=0.0)
    for k, v in cfg.to_env().items():
        monkeypatch.setenv(k, v)
    assert TrainerConfig.load() == cfg
