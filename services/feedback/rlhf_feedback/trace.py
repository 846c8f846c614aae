"""Trace one served answer: its generation, the weights that produced it, every feedback
item on it, the labels made from them, and the reward-model and policy versions that learned
from those labels.

    python -m rlhf_feedback.trace GENERATION_ID --weight-store STORE [--json]

STORE is a directory, file:// URL or object-storage URL (s3://bucket/prefix, with the
store's credentials in the environment, as the services take them).

Reads the topics from the beginning (Kafka at RLHF_KAFKA_BOOTSTRAP, prefix RLHF_TOPIC_PREFIX)
and the lineage of each model in the weight store; the logic is `rlhf_common.trace` (also
behind `rlhfctl trace`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from rlhf_common.config import BusConfig
from rlhf_common.trace import Trace, render, trace
from rlhf_common.weights import WeightStore

__all__ = ["Trace", "main", "render", "trace"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("generation_id")
    ap.add_argument("--weight-store", required=True, help="The weight store the trainer and reward learner use")
    ap.add_argument("--policy-name", default="policy")
    ap.add_argument("--reward-name", default="reward")
    ap.add_argument("--json", action="store_true", help="Print the trace as JSON")
    args = ap.parse_args(argv)
    t = trace(BusConfig.load(), WeightStore(args.weight_store), args.generation_id, args.policy_name,
              args.reward_name)
    print(json.dumps(asdict(t), indent=2) if args.json else render(t))
    if t.generation is None and not t.feedback:
        sys.exit(1)


if __name__ == "__main__":
    main()
