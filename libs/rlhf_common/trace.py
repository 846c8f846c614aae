"""An answer's whole story: its generation, the weights that produced it, every feedback item
on it, the labels made from them, and the reward-model and policy versions that learned from
those labels.

Reads the topics from the beginning and the lineage of each model in the weight store
(`<model>/lineage.jsonl`, append-only, kept when versions are pruned): a policy version lists
the labels its preference step learned from, a reward version the labels it was the first to
learn from (later versions build on it). `python -m rlhf_feedback.trace` and `rlhfctl trace`
print it.

Also here: `label_id` (a label's id as a function of its feedback id, which the join uses to
make labels and the trace to find them), and `TopicReader`, a read-only reader of a topic that
never writes anywhere (undecodable records are reported, not dead-lettered).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from kafka import KafkaConsumer, TopicPartition

from rlhf.events.v1 import events_pb2

from .config import BusConfig
from .topics import Topics
from .weights import WeightStore

M = TypeVar("M", bound=Message)


def label_id(feedback_id: str) -> str:
    """The label's id is a function of the feedback id, so a label produced twice is recognisable."""
    return "lbl-" + hashlib.sha256(feedback_id.encode()).hexdigest()[:32]


@dataclass
class Read(Generic[M]):
    """One record as read: `record` is None when the value did not decode (`error` says why)."""
    partition: int
    offset: int
    timestamp_ms: int
    key: str
    record: M | None
    error: str = ""


class TopicReader(Generic[M]):
    """Reads every partition of one topic without a consumer group (nothing is committed) and
    decodes each value as `record_type`. ConnectionError names the broker when it does not
    answer within `connect_timeout_s`; LookupError when the topic does not exist."""

    def __init__(self, bus: BusConfig, topic: str, record_type: type[M], client_id: str = "rlhf-reader",
                 connect_timeout_s: float = 10.0):
        self.topic, self.record_type = topic, record_type
        try:
            self._c = KafkaConsumer(**bus.client_options(), group_id=None, client_id=client_id,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    bootstrap_timeout_ms=int(connect_timeout_s * 1000),
                                    request_timeout_ms=max(1000, int(connect_timeout_s * 1000)))
        except Exception as e:  # kafka-python raises NoBrokersAvailable, a timeout, or a socket error
            why = str(e) if str(e).startswith(type(e).__name__) else f"{type(e).__name__}: {e}"
            raise ConnectionError(f"Kafka at {bus.bootstrap} unreachable ({why})") from None
        deadline = time.monotonic() + connect_timeout_s
        parts = self._c.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = self._c.partitions_for_topic(topic)
        if not parts:
            self._c.close()
            raise LookupError(f"topic {topic!r} not found on Kafka at {bus.bootstrap}")
        self.partitions = [TopicPartition(topic, p) for p in sorted(parts)]
        self._c.assign(self.partitions)

    def end_offsets(self, timeout_s: float = 5.0) -> dict[int, int]:
        """Per partition, the offset after its last record, as the records show it. The broker's
        answer is checked by reading from the offset before it (the dev broker answers with the
        last batch's first offset + 1, short of the end when that batch holds several records);
        the reader's positions are left as they were."""
        begin = self._c.beginning_offsets(self.partitions)
        reported = self._c.end_offsets(self.partitions)
        end = {tp.partition: o for tp, o in reported.items()}
        probe = {tp: o for tp, o in reported.items() if o > begin[tp]}
        if not probe:
            return end
        was = {tp: self._c.position(tp) for tp in self.partitions}
        for tp, o in probe.items():
            self._c.seek(tp, o - 1)
        left, deadline = {tp.partition for tp in probe}, time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            for tp, msgs in self._c.poll(timeout_ms=200, max_records=100_000).items():
                if msgs:
                    end[tp.partition] = max(end[tp.partition], msgs[-1].offset + 1)
                    left.discard(tp.partition)
        for tp, o in was.items():
            self._c.seek(tp, o)
        return end

    def seek_last(self, n: int) -> None:
        """Start at the last `n` records of each partition (all of them if fewer)."""
        begin = self._c.beginning_offsets(self.partitions)
        for p, end in self.end_offsets().items():
            tp = TopicPartition(self.topic, p)
            self._c.seek(tp, max(begin[tp], end - n))

    def seek_end(self) -> None:
        self._c.seek_to_end(*self.partitions)

    def poll(self, timeout_ms: int = 200, max_records: int = 1000) -> list[Read[M]]:
        out: list[Read[M]] = []
        for tp, msgs in self._c.poll(timeout_ms=timeout_ms, max_records=max_records).items():
            for m in msgs:
                key = m.key.decode("utf-8", "replace") if m.key else ""
                rec, err = self.record_type(), ""
                try:
                    rec.ParseFromString(m.value or b"")
                except DecodeError as e:
                    rec, err = None, f"{type(e).__name__}: {e}"
                out.append(Read(tp.partition, m.offset, m.timestamp, key, rec, err))
        return out

    def read_to_end(self, timeout_s: float = 120.0) -> list[Read[M]]:
        """Every record from the current positions up to the end offsets as they were when
        called (records written meanwhile may or may not be included)."""
        end = self.end_offsets()
        out: list[Read[M]] = []
        deadline = time.monotonic() + timeout_s
        while any(self._c.position(TopicPartition(self.topic, p)) < o for p, o in end.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {self.topic} did not reach its end offsets {end} in {timeout_s:.0f}s")
            out += self.poll()
        return out

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> "TopicReader[M]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_topic(bus: BusConfig, topic: str, record_type: type[M], keep: Callable[[M], bool],
               timeout_s: float = 120.0) -> list[M]:
    """Every decodable record of a topic, up to its end when called, that `keep` accepts."""
    with TopicReader(bus, topic, record_type, client_id="trace") as r:
        return [x.record for x in r.read_to_end(timeout_s) if x.record is not None and keep(x.record)]


@dataclass
class Trace:
    generation_id: str
    generation: dict | None = None
    feedback: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)
    reward_versions: dict[int, list[str]] = field(default_factory=dict)  # version -> labels it first learned
    policy_versions: dict[int, list[str]] = field(default_factory=dict)  # version -> labels of its DPO step


def learned_from(store: WeightStore, model_name: str, ids: set[str]) -> dict[int, list[str]]:
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
    t.reward_versions = learned_from(store, reward_name, wanted)
    t.policy_versions = learned_from(store, policy_name, wanted)
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
