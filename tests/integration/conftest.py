from __future__ import annotations

import pytest

from rlhf_common.bus import ensure_topics
from rlhf_common.config import BusConfig
from rlhf_devstack.devbroker import DevBroker
from rlhf_devstack.models import make_tiny_llama, make_tiny_reward_model
from rlhf_devstack.stack import free_port


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    b = DevBroker(port=free_port(), log_path=tmp_path_factory.mktemp("broker") / "broker.log").start()
    yield b
    b.stop()


@pytest.fixture
def bus(broker, request) -> BusConfig:
    """A fresh topic prefix per test on the shared broker."""
    prefix = "t" + "".join(ch for ch in request.node.name if ch.isalnum())[:40]
    cfg = BusConfig(bootstrap=broker.bootstrap, topic_prefix=prefix)
    ensure_topics(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    policy = make_tiny_llama(root / "policy")
    reward = make_tiny_reward_model(root / "reward", policy)
    return policy, reward
