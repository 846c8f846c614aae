"""Trace one served answer: its generation, the weights that produced it, every feedback
item on it, the labels made from them, and the reward-model and policy versions that learned
from those labels.

    python -m rlhf_feedback.trace GENERATION_ID --weight-store STORE [--json]

STORE is a directory, file:// URL or object-storage URL (s3://bucket/prefix, with the
store's credentials in the environment, as the services take them).

Reads the topics from the beginning (Kafka at RLHF_KAFKA_BOOTSTRAP, prefix RLHF_TOPIC_PREFIX)
and the lineage of each model in the weight store (`<model>/lineage.jsonl`, append-only, kept
when versions are pruned): a policy version lists the labels its preference step learned
from, a reward version the labels it was the first to learn from (later versions build on it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, TypeVar

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from rlhf.events.v1 import events_pb2
from rlhf_common.bus import Consumer
from rlhf_common.config import BusConfig
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore

from .join import label_id

M = TypeVar("M", bound=Message)


def read_topic(bus: BusConfig, topic: str, record_type: type[M], keep: Callable[[M], bool],
               quiet_s: float = 1.5, timeout_s: float = 120.0) -> list[M]:
    """Every record of a topic that `keep` accepts, read until `quiet_s` passes without one."""
    c = Consumer(bus, topic, record_type, group_id=None, client_id="trace")
    out: list[M] = []
    try:
        deadline, last = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
            for rec in c.poll(timeout_ms=200, max_records=1000):
                last = time.monotonic()
                if keep(rec.record):
                    out.append(rec.record)
    finally:
        c.close()
    return out


@dataclass
class Trace:
    generation_id: str
    generation: dict | None = None
    feedback: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)
    reward_versions: dict[int, list[str]] = field(default_factory=dict)  # version -> labels it first learned
    policy_versions: dict[int, list[str]] = field(default_factory=dict)  # version -> labels of its DPO step


def _learned_from(store: WeightStore, model_name: str, ids: set[str]) -> dict[int, list[str]]:
    """Version -> the wanted labels it was the first to learn from, from the model's lineage."""
    out: dict[int, list[str]] = {}
    for e in store.lineage(model_name):
        hit = sorted((set(e.get("label_ids", [])) | set(e.get("new_label_ids", []))) & ids)
        if hit:
            out[int(e["version"])] = hit
    return out


def trace(bus: BusConfig, store: WeightStore, generation_id: str, policy_name: str = "policy",
          reward_name: str = "reward") -> Trace:
    topics = Topics(bus.topic_prefix)
    t = Trace(generation_id)
    gens = read_topic(bus, topics.generations, events_pb2.Generation, lambda g: g.generation_id == generation_id)
    if gens:
        t.generation = MessageToDict(gens[0], preserving_proto_field_name=True)
    fbs = read_topic(bus, topics.feedback, events_pb2.Feedback, lambda f: generation_id in (
        f.generation_id, f.pairwise.other_generation_id if f.WhichOneof("signal") == "pairwise" else ""))
    seen = set()
    for f in fbs:
        if f.feedback_id not in seen:  # the same item may be on the topic twice (at least once)
            seen.add(f.feedback_id)
            t.feedback.append(MessageToDict(f, preserving_proto_field_name=True))
    wanted = {label_id(i) for i in seen}
    labels = read_topic(bus, topics.labels, events_pb2.Label, lambda x: x.label_id in wanted)
    t.labels = list({x.label_id: MessageToDict(x, preserving_proto_field_name=True) for x in labels}.values())
    t.reward_versions = _learned_from(store, reward_name, wanted)
    t.policy_versions = _learned_from(store, policy_name, wanted)
    return t


def render(t: Trace) -> str:
    lines = [f"generation {t.generation_id}"]
    g = t.generation
    if g is None:
        lines.append("  not found on the generations topic (never served through the API, or past retention)")
    else:
        lines += [f"  policy version {g.get('policy_version', 0)}, request {g.get('request_id', '')}",
                  f"  prompt:   {g.get('prompt', '')!r}", f"  response: {g.get('response', '')!r}"]
    lines.append(f"feedback ({len(t.feedback)})")
    for f in t.feedback:
        signal = next((k for k in ("thumb", "rating", "pairwise", "edit") if k in f), "?")
        lines.append(f"  {f['feedback_id']}  {signal}: {json.dumps(f.get(signal))}")
    lines.append(f"labels ({len(t.labels)})")
    for x in t.labels:
        answers = ", ".join(f"{r.get('generation_id') or 'edit'}@v{r.get('policy_version', 0)}"
                            for r in x.get("responses", []))
        lines.append(f"  {x['label_id']}  from {', '.join(x.get('feedback_ids', []))}  on {answers}")
    for name, versions, note in (("reward-model", t.reward_versions, " (and every later version)"),
                                 ("policy", t.policy_versions, "")):
        if versions:
            lines.append(f"{name} versions trained on them: " + ", ".join(
                f"v{v} ({len(ids)} labels)" for v, ids in sorted(versions.items())) + note)
        else:
            lines.append(f"{name} versions trained on them: none yet")
    return "\n".join(lines)


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
