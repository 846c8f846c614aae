from __future__ import annotations

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from rlhf_common import errors, fsutil, objstore
from rlhf_common.fsutil import publish_dir
from rlhf_common.weights import WeightStore, digest, fetch, local_path, verify
from rlhf_trainer.metrics import TrainerMetrics


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).reshape(2, 3))

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        save_file({"w": self.w.detach().contiguous()}, str(path / "model.safetensors"))


def test_store_save_versions_and_digest(tmp_path):
    store = WeightStore(tmp_path)
    m = _Tiny()
    c1 = store.save(m, None, "policy", 1, step=10)
    with torch.no_grad():
        m.w.add_(1.0)
    c2 = store.save(m, None, "policy", 2, step=20)
    assert store.versions("policy") == [1, 2]
    assert c1.sha256 != c2.sha256
    assert store.load_manifest("policy", 2) == c2
    assert digest(c2.path) == c2.sha256
    assert not list(tmp_path.glob("policy/*.tmp-*"))


def test_latest_skips_incomplete_versions_and_keeps_extra(tmp_path):
    store = WeightStore(tmp_path)
    assert store.latest("policy") is None
    store.save(_Tiny(), None, "policy", 1, step=4, extra={"groups_consumed": 8})
    (tmp_path / "policy" / "v00000002").mkdir()  # a version folder without a manifest
    latest = store.latest("policy")
    assert latest.version == 1 and latest.step == 4 and latest.extra == {"groups_consumed": 8}


def test_prune_keeps_newest(tmp_path):
    store = WeightStore(tmp_path)
    for v in range(1, 6):
        store.save(_Tiny(), None, "policy", v, step=v)
    assert store.prune("policy", 0) == []
    assert store.prune("policy", 2) == [1, 2, 3]
    assert store.versions("policy") == [4, 5]


def test_verify_detects_corruption(tmp_path):
    c = WeightStore(tmp_path).save(_Tiny(), None, "policy", 1, step=1)
    f = c.path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(errors.WeightsCorrupt, match=c.sha256):
        verify(c.path, c.sha256)


def test_local_path_rejects_unknown_schemes():
    assert str(local_path("file:///a/b")) == "/a/b"
    with pytest.raises(ValueError, match="s3://x"):
        local_path("s3://x")


def test_fetch_uses_a_local_folder_in_place(tmp_path):
    c = WeightStore(f"file://{tmp_path}").save(_Tiny(), None, "policy", 1, step=1)
    assert c.path == tmp_path / "policy" / "v00000001"
    assert fetch(str(c.path), c.sha256) == c.path and fetch(f"file://{c.path}") == c.path
    store = WeightStore(tmp_path)
    assert store.child("policy-trainer-state") == tmp_path / "policy-trainer-state"
    assert store.local_file("policy-eval.jsonl") == tmp_path / "policy-eval.jsonl"


def test_an_object_store_without_its_package_names_the_package():
    # gcsfs and adlfs are not dependencies: the error says what to install.
    for url, package in (("gs://bucket/rlhf", "gcsfs"), ("az://container/rlhf", "adlfs")):
        with pytest.raises(ValueError, match=f"needs the {package} package"):
            WeightStore(url)
    with pytest.raises(ValueError, match="Protocol not known"):
        WeightStore("nosuch://bucket/rlhf")


def test_urls_in_messages_lose_their_credentials():
    assert objstore.redact("s3://key:secret@bucket/rlhf") == "s3://bucket/rlhf"
    assert objstore.redact("s3://bucket/a@b") == "s3://bucket/a@b"
    with pytest.raises(ValueError) as err:
        local_path("s3://key:secret@bucket/x")
    assert "secret" not in str(err.value)
    assert objstore.join("s3://b/rlhf/", "policy") == "s3://b/rlhf/policy"
    assert objstore.join("file:///w", "policy") == "/w/policy"


@pytest.mark.parametrize("exc,code,status", [
    (errors.InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.NotReady("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (errors.Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED, 401),
    (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS, 409),
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL, 500),
])
def test_error_map(exc, code, status):
    assert errors.to_grpc(exc)[0] == code
    assert errors.to_http(exc)[0] == status


def test_trainer_metrics_use_injected_registry():
    reg = CollectorRegistry()
    m = TrainerMetrics(reg)
    m.rollouts.inc(3)
    m.version_lag.observe(1)
    m.phase_seconds.labels("training").observe(0.2)
    assert reg.get_sample_value("rlhf_trainer_rollouts_consumed_total") == 3
    assert reg.get_sample_value("rlhf_trainer_rollout_version_lag_bucket", {"le": "1.0"}) == 1
    assert reg.get_sample_value("rlhf_trainer_phase_seconds_count", {"phase": "training"}) == 1
    # the metrics live in the given registry: registering them there again collides, while a
    # second registry gets its own, independent ones
    with pytest.raises(ValueError, match="Duplicated"):
        TrainerMetrics(reg)
    other = CollectorRegistry()
    TrainerMetrics(other).rollouts.inc()
    assert other.get_sample_value("rlhf_trainer_rollouts_consumed_total") == 1
    assert reg.get_sample_value("rlhf_trainer_rollouts_consumed_total") == 3


def test_publishing_over_an_existing_folder_swaps_it_atomically(tmp_path):
    final = tmp_path / "v00000001"
    final.mkdir()
    (final / "a.txt").write_text("old")
    tmp = tmp_path / "v00000001.tmp"
    tmp.mkdir()
    (tmp / "a.txt").write_text("new")
    assert fsutil._exchange(tmp_path / "missing-a", tmp_path / "missing-b") is False  # errors are reported
    publish_dir(tmp, final)
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000001"]


def test_a_crash_while_publishing_never_loses_the_old_folder(tmp_path, monkeypatch):
    """Where folders cannot be swapped, the old one is renamed aside first: a crash before the
    new one is in place leaves the old contents on disk instead of deleting them."""
    final, tmp = tmp_path / "step-00000003", tmp_path / "step-00000003.tmp"
    for d, text in ((final, "old"), (tmp, "new")):
        d.mkdir()
        (d / "state.pt").write_text(text)
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    real_replace = fsutil.os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("crash")
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="crash"):
        publish_dir(tmp, final)
    kept = [p for p in tmp_path.iterdir() if (p / "state.pt").exists() and (p / "state.pt").read_text() == "old"]
    assert kept and kept[0].name.startswith("step-00000003.old-")
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    publish_dir(tmp, final)  # the next try completes
    assert (final / "state.pt").read_text() == "new"


def test_store_save_over_an_existing_version_keeps_a_complete_folder(tmp_path):
    model = _Tiny()
    store = WeightStore(tmp_path / "store")
    first = store.save(model, None, "policy", 1, step=1)
    with torch.no_grad():
        model.w.add_(1.0)
    second = store.save(model, None, "policy", 1, step=2)
    assert second.sha256 != first.sha256
    assert store.load_manifest("policy", 1).step == 2 and digest(second.path) == second.sha256
    assert [p.name for p in (tmp_path / "store" / "policy").iterdir()] == ["v00000001"]


def test_lineage_is_append_only_survives_pruning_and_skips_a_torn_line(tmp_path):
    store = WeightStore(tmp_path)
    for v in (1, 2, 3):
        store.save(_Tiny(), None, "policy", v, step=v)
        store.append_lineage("policy", {"version": v, "label_ids": [f"lbl-{v}"]})
    store.prune("policy", keep=1)
    assert store.versions("policy") == [3]
    with open(tmp_path / "policy" / "lineage.jsonl", "a") as f:
        f.write('{"version": 4, "label_')  # a crash mid-write
    assert [e["version"] for e in store.lineage("policy")] == [1, 2, 3]
    store.append_lineage("policy", {"version": 4, "label_ids": ["lbl-4"]})  # after the torn line, whole
    assert [e["version"] for e in store.lineage("policy")] == [1, 2, 3, 4]
    assert store.lineage("reward") == []
