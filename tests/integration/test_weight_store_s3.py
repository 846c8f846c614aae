"""The weight store and the trainer's state on object storage, against a real S3-protocol
server: moto's server as a process on loopback, with IAM authentication on, so every request
must be signed with the credentials the environment gives (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL), as on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import torch

from rlhf.events.v1 import events_pb2
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf_common import objstore
from rlhf_common.bus import Producer, now_ms
from rlhf_common.errors import WeightsCorrupt
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore, digest, fetch
from rlhf_devstack.stack import free_port
from rlhf_reward.config import RewardConfig
from rlhf_trainer.checkpoint import CheckpointStore, TrainerState

from tests.helpers import metric_value, scrape
from tests.integration.reward_helpers import start_reward, stop

pytestmark = pytest.mark.integration

BUCKET = "rlhf-weights"


class _Tiny(torch.nn.Module):
    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3) + shift)

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        save_file({"w": self.w.detach().contiguous()}, str(path / "model.safetensors"))
        (path / "config.json").write_text("{}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with IAM auth: an IAM user with an access key, and a bucket."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    # The first three requests (making the user, its policy and its key) go unauthenticated;
    # every later one must carry a valid signature.
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=log,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.05)
    boot = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="boot",
                aws_secret_access_key="boot")
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="rlhf")
    iam.put_user_policy(UserName="rlhf", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="rlhf")["AccessKey"]
    creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    client.create_bucket(Bucket=BUCKET)
    yield creds, client
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def store_url(s3, monkeypatch, tmp_path, request):
    """Credentials in the environment, a fresh prefix and weight cache per test."""
    creds, _ = s3
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RLHF_WEIGHT_CACHE_DIR", str(tmp_path / "cache"))
    return f"s3://{BUCKET}/{request.node.name}"


def _keys(client, prefix: str) -> list[str]:
    out = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []))


def _prefix(url: str) -> str:
    return url.split(f"s3://{BUCKET}/", 1)[1]


def test_versions_latest_prune_and_lineage_on_s3(store_url, s3):
    _, client = s3
    store = WeightStore(store_url)
    assert store.latest("policy") is None and store.versions("policy") == [] and store.lineage("policy") == []
    saved = [store.save(_Tiny(v), None, "policy", v, step=10 * v, extra={"groups_consumed": v}) for v in (1, 2, 3)]
    assert saved[2].path == f"{store_url}/policy/v00000003"  # what a WeightUpdate announces
    assert len({c.sha256 for c in saved}) == 3
    assert store.versions("policy") == [1, 2, 3]
    assert store.latest("policy") == saved[2] and store.latest("policy").extra == {"groups_consumed": 3}
    assert store.load_manifest("policy", 1) == saved[0]
    p = _prefix(store_url)
    # The objects are really on the server, the manifest beside the files.
    assert _keys(client, f"{p}/policy/v00000001/") == [f"{p}/policy/v00000001/{n}" for n in
                                                      ("config.json", "model.safetensors", "rlhf_manifest.json")]
    for v in (1, 2, 3):
        store.append_lineage("policy", {"version": v, "label_ids": [f"lbl-{v}"]})
    assert store.prune("policy", 0) == []
    assert store.prune("policy", 2) == [1]
    assert store.versions("policy") == [2, 3]
    assert _keys(client, f"{p}/policy/v00000001/") == []
    assert [e["version"] for e in store.lineage("policy")] == [1, 2, 3]  # the lineage outlives pruning
    # Saving over an existing version replaces it whole.
    again = store.save(_Tiny(9), None, "policy", 3, step=99)
    assert again.sha256 != saved[2].sha256 and store.latest("policy").step == 99
    # The trainer's state lives beside the versions, not among them.
    assert store.child("policy-trainer-state") == f"{store_url}/policy-trainer-state"


def test_a_version_without_manifest_is_invisible_and_removed_by_its_writer(store_url, s3):
    _, client = s3
    store = WeightStore(store_url)
    done = store.save(_Tiny(1), None, "reward", 1, step=1)
    p = _prefix(store_url)
    # What an upload killed before its manifest leaves: the files of v2, no manifest.
    client.put_object(Bucket=BUCKET, Key=f"{p}/reward/v00000002/model.safetensors", Body=b"half")
    client.put_object(Bucket=BUCKET, Key=f"{p}/reward/v00000002/config.json", Body=b"{}")
    assert store.versions("reward") == [1]
    assert store.latest("reward") == done
    assert store.remove_unfinished("reward") == [f"{store_url}/reward/v00000002"]
    assert _keys(client, f"{p}/reward/v00000002/") == []
    assert store.versions("reward") == [1] and _keys(client, f"{p}/reward/v00000001/")
    assert store.remove_unfinished("reward") == []


def test_fetch_downloads_verifies_and_reuses_a_copy(store_url, s3, tmp_path, monkeypatch):
    _, client = s3
    store = WeightStore(store_url)
    c1 = store.save(_Tiny(1), None, "policy", 1, step=1)
    path = fetch(c1.path, c1.sha256)
    assert path.is_relative_to(tmp_path / "cache") and path.name == "v00000001"
    assert digest(path) == c1.sha256 and (path / "config.json").is_file()
    # A verified copy is reused: it is found even once the version is gone from the store.
    store.tree.remove("policy/v00000001", "rlhf_manifest.json")
    assert fetch(c1.path, c1.sha256) == path
    with pytest.raises(FileNotFoundError):
        fetch(c1.path, "0" * 64)  # another announcement of that URI is not served from the copy
    # No sha256 given: the version's manifest names it.
    c2 = store.save(_Tiny(2), None, "policy", 2, step=2)
    assert digest(fetch(c2.path)) == c2.sha256
    # Only the most recently used copies stay.
    monkeypatch.setenv("RLHF_WEIGHT_CACHE_KEEP", "2")
    c3 = store.save(_Tiny(3), None, "policy", 3, step=3)
    p3 = fetch(c3.path, c3.sha256)
    slots = sorted(p.name for p in (tmp_path / "cache" / "weights").iterdir())
    assert len(slots) == 2 and p3.parent.name in slots and path.parent.name not in slots


def test_fetch_refuses_a_tampered_object_and_leaves_nothing(store_url, s3, tmp_path):
    creds, client = s3
    store = WeightStore(store_url)
    c = store.save(_Tiny(1), None, "policy", 1, step=1)
    key = f"{_prefix(store_url)}/policy/v00000001/model.safetensors"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(WeightsCorrupt, match=c.sha256) as err:
        fetch(c.path, c.sha256)
    assert creds["AWS_SECRET_ACCESS_KEY"] not in str(err.value)
    cache = tmp_path / "cache" / "weights"
    assert list(cache.iterdir()) == []  # no copy, no half-written temporary folder
    # Without an announced sha256 the manifest's is checked just the same.
    with pytest.raises(WeightsCorrupt):
        fetch(c.path)
    assert list(cache.iterdir()) == []


def test_wrong_credentials_are_refused_without_showing_them(store_url, s3, monkeypatch):
    store = WeightStore(store_url)
    c = store.save(_Tiny(1), None, "policy", 1, step=1)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    with pytest.raises(PermissionError) as err:
        fetch(c.path, c.sha256)
    assert "not-the-secret-123" not in str(err.value)
    with pytest.raises(PermissionError):
        WeightStore(store_url).versions("policy")


def _state(step: int, weights: str, sha: str) -> TrainerState:
    return TrainerState(step=step, version=step, weights_path=weights, weights_sha256=sha, groups_consumed=2 * step,
                        rollouts_consumed=8 * step, offsets={0: 4 * step}, trained_ids=[f"r{step}"],
                        learner={"beta": torch.tensor([0.1 * step])}, torch_rng=torch.get_rng_state(),
                        extra={"label_offsets": {0: step}})


def test_training_state_round_trip_on_s3(store_url, s3, tmp_path):
    _, client = s3
    weights = WeightStore(store_url)
    c = weights.save(_Tiny(1), None, "policy", 1, step=1)
    states = CheckpointStore(weights.child("policy-trainer-state"), keep=2)
    assert states.latest() is None
    for step in (1, 2, 3):
        assert states.save(_state(step, str(c.path), c.sha256)) == f"{store_url}/policy-trainer-state/step-{step:08d}"
    assert states.steps() == [2, 3]
    # Another trainer (a pod started elsewhere: another cache) finds the newest state.
    back = CheckpointStore(weights.child("policy-trainer-state"), keep=2).latest()
    assert (back.step, back.offsets, back.trained_ids, back.extra) == (3, {0: 12}, ["r3"], {"label_offsets": {0: 3}})
    assert torch.equal(back.learner["beta"], torch.tensor([0.3]))
    assert digest(back.weights_folder()) == c.sha256  # the weights it names, fetched and checked
    # A state whose upload died before its manifest does not exist, and the trainer removes it.
    p = _prefix(store_url)
    client.put_object(Bucket=BUCKET, Key=f"{p}/policy-trainer-state/step-00000004/state.pt", Body=b"half")
    assert states.steps() == [2, 3] and states.latest().step == 3
    assert states.remove_unfinished() == [f"{store_url}/policy-trainer-state/step-00000004"]
    # A state changed on the store is refused before torch reads it.
    key = f"{p}/policy-trainer-state/step-00000003/state.pt"
    client.put_object(Bucket=BUCKET, Key=key, Body=client.get_object(Bucket=BUCKET, Key=key)["Body"].read() + b"x")
    with pytest.raises(WeightsCorrupt, match="state.pt"):
        states.latest()
    assert not [p for p in (tmp_path / "cache" / "trainer-state").rglob("*") if p.name.startswith(".tmp-")]


def test_the_reward_service_loads_a_version_from_s3(store_url, s3, bus, tiny_models, tmp_path):
    """A real reward process, with the store's credentials only in its environment, swaps to a
    version announced with an s3:// URI, and refuses one whose announced sha256 is wrong."""
    creds, _ = s3
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_devstack.models import make_tiny_reward_model

    policy, reward_v0 = tiny_models
    src = make_tiny_reward_model(tmp_path / "reward-new", policy, seed=7)
    ckpt = WeightStore(store_url).save(AutoModelForSequenceClassification.from_pretrained(src),
                                       AutoTokenizer.from_pretrained(src), "reward", 1, step=3)
    assert ckpt.path.startswith("s3://")
    cfg = RewardConfig(server={"port": free_port(), "metrics_port": free_port()}, model=str(reward_v0),
                       http_port=free_port(), max_batch_size=4, max_wait_ms=2)
    log_path = tmp_path / "reward.log"
    proc = start_reward(cfg, log_path, bus=bus)
    producer = Producer(bus, client_id="test-weights")
    topic = Topics(bus.topic_prefix).weights
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{cfg.server.port}"))
    try:
        producer.send(topic, "reward", events_pb2.WeightUpdate(
            model_name="reward", version=1, uri=ckpt.path, format=events_pb2.WeightUpdate.FORMAT_FULL,
            sha256=ckpt.sha256, step=ckpt.step, created_unix_ms=now_ms()))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = stub.GetModelInfo(reward_pb2.GetModelInfoRequest())
            if info.version_number == 1:
                break
            time.sleep(0.2)
        assert info.version_number == 1 and info.sha256 == ckpt.sha256
        resp = stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="Hi", response=" there")]))
        assert resp.model_version == "v00000001"
        (copy,) = (tmp_path / "cache" / "weights").glob("*/v00000001")  # the service's verified copy
        assert digest(copy) == ckpt.sha256
        # The same URI announced with another sha256: refused, v1 still served.
        producer.send(topic, "reward", events_pb2.WeightUpdate(
            model_name="reward", version=2, uri=ckpt.path, sha256="f" * 64, created_unix_ms=now_ms()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not metric_value(
                scrape(cfg.server.metrics_port), "rlhf_reward_model_swaps_total", {"outcome": "corrupt"}):
            time.sleep(0.2)
        assert metric_value(scrape(cfg.server.metrics_port), "rlhf_reward_model_swaps_total",
                            {"outcome": "corrupt"}) == 1
        assert stub.GetModelInfo(reward_pb2.GetModelInfoRequest()).version_number == 1
    finally:
        producer.close()
        assert stop(proc) == 0
    assert creds["AWS_SECRET_ACCESS_KEY"] not in log_path.read_text()
    assert objstore.is_remote(ckpt.path)
