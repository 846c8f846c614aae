"""Roll the serving policy back to an earlier version.

    python -m rlhf_policy.rollback --weight-store STORE --version N   # a published version
    python -m rlhf_policy.rollback --uri MODEL_DIR --version 0        # e.g. the initial model

STORE is the trainer's weight store (a path, file:// URL or object-storage URL such as
s3://bucket/rlhf, with the store's credentials in the environment); --uri may be a URL too.

Publishes a WeightUpdate with rollback=true on rlhf.weights (Kafka at RLHF_KAFKA_BOOTSTRAP).
Every policy replica switches to that version; newer versions published later apply as usual.
"""

from __future__ import annotations

import argparse
import sys

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Producer, now_ms
from rlhf_common.config import BusConfig
from rlhf_common.objstore import is_remote, redact
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore, digest, fetch


def build_update(model_name: str, version: int, weight_store: str | None, uri: str | None) -> events_pb2.WeightUpdate:
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", type=int, required=True)
    ap.add_argument("--weight-store")
    ap.add_argument("--uri")
    ap.add_argument("--model-name", default="policy")
    args = ap.parse_args(argv)
    try:
        update = build_update(args.model_name, args.version, args.weight_store, args.uri)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    bus = BusConfig.load()
    p = Producer(bus, client_id="rollback")
    try:
        p.send(Topics(bus.topic_prefix).weights, args.model_name, update)
    finally:
        p.close()
    print(f"published rollback of {args.model_name!r} to version {args.version} ({update.uri})")


if __name__ == "__main__":
    main()
