"""Roll the serving policy back to an earlier version.

    python -m rlhf_policy.rollback --weight-store STORE --version N   # a published version
    python -m rlhf_policy.rollback --uri MODEL_DIR --version 0        # e.g. the initial model

STORE is the trainer's weight store (a path, file:// URL or object-storage URL such as
s3://bucket/rlhf, with the store's credentials in the environment); --uri may be a URL too.

Publishes a WeightUpdate with rollback=true on rlhf.weights (Kafka at RLHF_KAFKA_BOOTSTRAP).
Every policy replica switches to that version; newer versions published later apply as usual.
The update is built and sent by `rlhf_common.rollback` (also behind `rlhfctl rollback`).
"""

from __future__ import annotations

import argparse
import sys

from rlhf_common.config import BusConfig
from rlhf_common.rollback import build_update, publish

__all__ = ["build_update", "main"]


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
    publish(BusConfig.load(), update)
    print(f"published rollback of {args.model_name!r} to version {args.version} ({update.uri})")


if __name__ == "__main__":
    main()
