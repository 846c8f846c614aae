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


def test_server_section_reads_the_services_own_prefix(monkeypatch):
    monkeypatch.setenv("RLHF_REWARD_MODEL", "/r")
    monkeypatch.setenv("RLHF_REWARD_HOST", "0.0.0.0")
    monkeypatch.setenv("RLHF_POLICY_PORT", "6000")  # another service's: not read
    from rlhf_reward.config import RewardConfig

    cfg = RewardConfig.load(["--metrics-port", "9999"])
    assert (cfg.server.host, cfg.server.port, cfg.server.metrics_port) == ("0.0.0.0", 50052, 9999)
    assert cfg.to_env()["RLHF_REWARD_METRICS_PORT"] == "9999" and "RLHF_POLICY_PORT" not in cfg.to_env()
    # the section's defaults are the service's, and a dict overrides some of them
    t = TrainerConfig(model="/m", weight_store="/w", server={"port": 7001})
    assert (t.server.port, t.server.metrics_port) == (7001, 9104)
    assert TrainerConfig.default_of("metrics_port", "server") == 9104


def test_bad_server_values_name_the_services_variable():
    with pytest.raises(ConfigError, match=r"RLHF_TRAINER_METRICS_PORT=70000: must be a TCP port"):
        TrainerConfig(model="/m", weight_store="/w", server={"metrics_port": 70000})


def test_algorithm_must_be_registered():
    with pytest.raises(ConfigError, match=r"RLHF_TRAINER_ALGORITHM='a2c': must be one of \['grpo', 'ppo', 'rloo'\]"):
        TrainerConfig(model="/m", weight_store="/w", algorithm="a2c")


def test_kv_cache_setting_must_agree_with_vllms_own_variable(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    with pytest.raises(ConfigError, match=r"RLHF_POLICY_KV_CACHE_GIB=1: disagrees with VLLM_CPU_KVCACHE_SPACE='4'"):
        PolicyConfig(model="/m", kv_cache_gib=1)
    assert PolicyConfig(model="/m", kv_cache_gib=4).kv_cache_gib == 4
