"""Roll the serving policy back to an earlier version.

    python -m rlhf_policy.rollback --weight-store DIR --version N     # a published version
    python -m rlhf_policy.rollback --uri MODEL_DIR --version 0        # e.g. the initial model

Publishes a WeightUpdate with rollback=true on rlhf.weights (Kafka at RLHF_KAFKA_BOOTSTRAP).
Every policy replica switches to that version; newer versions published later apply as usual.
"""

from __future__ import annotations

import argparse
import sys

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Producer, now_ms
from rlhf_common.config import BusConfig
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore, digest, local_path


def build_update(model_name: str, version: int, weight_store: str | None, uri: str | None) -> events_pb2.WeightUpdate:
    if version < 0:
        raise ValueError(f"--version={version}: must be >= 0")
    if bool(weight_store) == bool(uri):
        raise ValueError("give exactly one of --weight-store (a published version) or --uri (a model folder)")
    if weight_store:
        folder = WeightStore(weight_store).folder(model_name, version)
        if not folder.exists():
            have = WeightStore(weight_store).versions(model_name)
            raise ValueError(f"version {version} of {model_name!r} is not in {weight_store!r} (have {have})")
        ckpt = WeightStore(weight_store).load_manifest(model_name, version)
        path, sha = ckpt.path, ckpt.sha256
    else:
        path = local_path(uri)
        sha = digest(path)
    fmt = (events_pb2.WeightUpdate.FORMAT_LORA if (path / "adapter_config.json").exists()
           else events_pb2.WeightUpdate.FORMAT_FULL)
    return events_pb2.WeightUpdate(model_name=model_name, version=version, uri=str(path), format=fmt, sha256=sha,
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
