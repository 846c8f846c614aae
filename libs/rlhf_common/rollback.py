"""Rollback updates: a `WeightUpdate` with `rollback: true` that every policy replica applies.

A rollback names an earlier version, either one the weight store holds (its manifest gives the
folder and sha256) or a model folder (for example the initial model, version 0), which is
hashed here. `publish` sends it to the compacted rlhf.weights topic, keyed by the model name;
newer versions published later apply as usual.
"""

from __future__ import annotations

from rlhf.events.v1 import events_pb2

from .bus import Producer, now_ms
from .config import BusConfig
from .objstore import is_remote, redact
from .topics import Topics
from .weights import WeightStore, digest, fetch


def build_update(model_name: str, version: int, weight_store: str | None, uri: str | None) -> events_pb2.WeightUpdate:
    """The rollback update of `model_name` to `version`, from exactly one of a weight store (a
    published version) or a model folder `uri`. ValueError (FileNotFoundError for a missing
    folder) names what is wrong."""
    if version < 0:
        raise ValueError(f"--version={version}: must be >= 0")
    if bool(weight_store) == bool(uri):
        raise ValueError("give exactly one of --weight-store (a published version) or --uri (a model folder)")
    if weight_store:
        store = WeightStore(weight_store)
        have = store.versions(model_name)
        if version not in have:
            raise ValueError(f"version {version} of {model_name!r} is not in {redact(weight_store)!r} (have {have})")
        ckpt = store.load_manifest(model_name, version)
        target, sha = str(ckpt.path), ckpt.sha256
        lora = store.has_file(model_name, version, "adapter_config.json")
    else:
        path = fetch(uri)  # a folder on object storage is downloaded (and cached) to be hashed
        target, sha = (uri if is_remote(uri) else str(path)), digest(path)
        lora = (path / "adapter_config.json").exists()
    fmt = events_pb2.WeightUpdate.FORMAT_LORA if lora else events_pb2.WeightUpdate.FORMAT_FULL
    return events_pb2.WeightUpdate(model_name=model_name, version=version, uri=target, format=fmt, sha256=sha,
                                   rollback=True, created_unix_ms=now_ms())


def publish(bus: BusConfig, update: events_pb2.WeightUpdate, client_id: str = "rollback",
            timeout_s: float = 30.0) -> None:
    """Send the update to rlhf.weights and wait for the broker's acknowledgement."""
    p = Producer(bus, client_id=client_id, timeout_s=timeout_s)
    try:
        p.send(Topics(bus.topic_prefix).weights, update.model_name, update)
    finally:
        p.close()
