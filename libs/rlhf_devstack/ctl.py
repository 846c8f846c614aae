"""rlhfctl: see and steer a running stack from one command.

    rlhfctl status [--json]                  health, versions, step, lags and key metrics
    rlhfctl pause | resume                   stop or restart the trainer's steps
    rlhfctl rollback VERSION [--uri DIR]     make the policy serve an earlier version
    rlhfctl tail TOPIC [-n N] [--follow]     the last records of a topic, one line each
    rlhfctl trace GENERATION_ID [--json]     an answer's whole story

Where the stack is: `make up` writes `<run-dir>/stack.json` (run dir `.run` by default) with
every service's gRPC address and metrics port, the Kafka bootstrap address and the weight
store; rlhfctl reads it when it is there. Addresses given as flags or environment variables
(RLHF_CTL_TRAINER, RLHF_CTL_POLICY, ..., RLHF_CTL_METRICS, RLHF_CTL_WEIGHT_STORE,
RLHF_KAFKA_BOOTSTRAP, with the services' Kafka TLS/SASL variables) take precedence, so it
also works against a cluster through port-forwards.

Exit codes: 0 done; 1 a service or the broker did not answer (the message names its
address), a status with a service not serving, or a trace that found nothing; 2 a bad
setting or argument.

Imports no service: only the library (`rlhf_common`) and the generated protobuf code.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from rlhf.events.v1 import events_pb2
from rlhf.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf.reference.v1 import reference_pb2, reference_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf.reward_learner.v1 import reward_learner_pb2, reward_learner_pb2_grpc
from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from rlhf_common import envs, rollback as rollback_lib
from rlhf_common import trace as trace_lib
from rlhf_common.config import BaseConfig, BusConfig, ConfigError, setting
from rlhf_common.topics import Topics
from rlhf_common.weights import WeightStore

SERVICES = ("policy", "reward", "reference", "trainer", "feedback", "reward_learner")
TAIL_TOPICS = ("rollouts", "generations", "feedback", "labels", "prompts", "weights", "dlq")

# Key metrics shown per service: (label, sample name, "value" or "rate"). A rate is the
# counter's increase per second between two scrapes `--window` seconds apart.
KEY_METRICS: dict[str, list[tuple[str, str, str]]] = {
    "policy": [("version", "rlhf_policy_version", "value"),
               ("tokens/s", "rlhf_policy_generated_tokens_total", "rate"),
               ("rollouts/s", "rlhf_policy_rollouts_total", "rate"),
               ("in flight", "rlhf_policy_requests_in_flight", "value"),
               ("groups ahead", "rlhf_policy_rollout_groups_ahead", "value")],
    "reward": [("score mean", "rlhf_reward_score_mean", "value"),
               ("score std", "rlhf_reward_score_std", "value"),
               ("items/s", "rlhf_reward_scored_items_total", "rate")],
    "reference": [("version", "rlhf_reference_version", "value"),
                  ("tokens/s", "rlhf_reference_scored_tokens_total", "rate")],
    "trainer": [("step", "rlhf_trainer_step", "value"),
                ("reward mean", "rlhf_trainer_reward_mean", "value"),
                ("KL nats", "rlhf_trainer_kl_nats", "value"),
                ("KL beta", "rlhf_trainer_kl_beta", "value"),
                ("loss", "rlhf_trainer_loss", "value"),
                ("tokens/s", "rlhf_trainer_trained_tokens_total", "rate")],
    "feedback": [("labels", "rlhf_feedback_labels_total", "value"),
                 ("join waiting", "rlhf_feedback_join_waiting", "value")],
    "reward_learner": [("version", "rlhf_reward_learner_version", "value"),
                       ("labels", "rlhf_reward_learner_labels_total", "value")],
}


class CtlError(Exception):
    """A failure to report in one line (no traceback); `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class CtlConfig(BaseConfig):
    """Where rlhfctl finds the stack (flags > env > the run dir's stack.json)."""

    ENV: ClassVar[str] = "RLHF_CTL"
    run_dir: str = setting(".run", "RUN_DIR", "Folder of a stack started by `make up` (its stack.json)")
    policy: str = setting("", "POLICY", "Policy gRPC address host:port")
    reward: str = setting("", "REWARD", "Reward gRPC address host:port")
    reference: str = setting("", "REFERENCE", "Reference gRPC address host:port")
    trainer: str = setting("", "TRAINER", "Trainer gRPC address host:port")
    feedback: str = setting("", "FEEDBACK", "Feedback gRPC address host:port")
    reward_learner: str = setting("", "REWARD_LEARNER", "Reward learner gRPC address host:port")
    metrics: str = setting("", "METRICS", "Metrics endpoints, service=host:port[,service=host:port...]")
    weight_store: str = setting("", "WEIGHT_STORE", "The weight store (path or URL) for rollback and trace")
    join_state: str = setting("", "JOIN_STATE", "The feedback service's state folder (the join's offsets)")
    trainer_group: str = setting("rlhf-trainer", "TRAINER_GROUP",
                                 "The trainer's consumer group on rlhf.rollouts (its RLHF_TRAINER_GROUP_ID)")
    timeout_s: float = setting(5.0, "TIMEOUT_S", "Seconds to wait for a service or the broker")

    def validate(self) -> None:
        self.check(self.timeout_s > 0, "timeout_s", "must be > 0")
        try:
            parse_endpoints(self.metrics)
        except ValueError as e:
            self.check(False, "metrics", str(e))
        for name in SERVICES:
            addr = getattr(self, name)
            self.check(not addr or ":" in addr, name, "must be host:port")


def parse_endpoints(raw: str) -> dict[str, str]:
    """'policy=127.0.0.1:9101,trainer=h:9103' -> {service: host:port}; ValueError names the bad part."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, addr = part.partition("=")
        if not sep or name not in SERVICES or ":" not in addr:
            raise ValueError(f"{part!r} is not service=host:port with a service in {list(SERVICES)}")
        out[name] = addr
    return out


@dataclass
class Target:
    """The resolved stack: addresses (None: not known), the bus, the weight store."""
    addrs: dict[str, str | None]
    metrics: dict[str, str]
    bus: BusConfig
    weight_store: str
    join_state: Path | None
    timeout_s: float
    trainer_group: str = "rlhf-trainer"
    stack_file: Path | None = None


def resolve(flags: dict[str, object], kafka: str | None = None) -> Target:
    """Settings from flags, then env, then `<run-dir>/stack.json` where it exists."""
    cfg = CtlConfig.load(**{k: v for k, v in flags.items() if v is not None})
    run_dir = Path(cfg.run_dir)
    state_file = run_dir / "stack.json"
    state: dict = {}
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CtlError(f"cannot read {state_file}: {e}", 2) from None
    elif flags.get("run_dir") is not None or envs.get(cfg.env_of("run_dir")) is not None:
        raise CtlError(f"no stack.json in {run_dir} (start a stack with `make up`, or give addresses)", 2)
    services = state.get("services", {})
    addrs = {n: getattr(cfg, n) or services.get(n, {}).get("grpc") for n in SERVICES}
    given = parse_endpoints(cfg.metrics)
    metrics = {n: given.get(n) or f"127.0.0.1:{services[n]['metrics']}" for n in SERVICES
               if n in given or services.get(n, {}).get("metrics")}
    bootstrap = kafka
    if bootstrap is None and envs.get(BusConfig().env_of("bootstrap")) is None:
        bootstrap = state.get("broker", {}).get("bootstrap")
    bus = BusConfig.load(**({"bootstrap": bootstrap} if bootstrap else {}))
    store = cfg.weight_store or state.get("weights", "")
    if store and not cfg.weight_store and not Path(store).exists() and (run_dir / "weights").exists():
        store = str(run_dir / "weights")  # stack.json written from another working directory
    join = Path(cfg.join_state) if cfg.join_state else (run_dir / "feedback" if state else None)
    return Target(addrs, metrics, bus, store, join, cfg.timeout_s, cfg.trainer_group,
                  state_file if state else None)


# -- gRPC --------------------------------------------------------------------------------

STUBS = {
    "policy": (policy_pb2_grpc.PolicyServiceStub, "GetVersion", policy_pb2.GetVersionRequest),
    "reward": (reward_pb2_grpc.RewardServiceStub, "GetModelInfo", reward_pb2.GetModelInfoRequest),
    "reference": (reference_pb2_grpc.ReferenceServiceStub, "GetVersion", reference_pb2.GetVersionRequest),
    "trainer": (trainer_pb2_grpc.TrainerServiceStub, "Status", trainer_pb2.StatusRequest),
    "feedback": (feedback_pb2_grpc.FeedbackServiceStub, "GetStats", feedback_pb2.GetStatsRequest),
    "reward_learner": (reward_learner_pb2_grpc.RewardLearnerServiceStub, "Status",
                       reward_learner_pb2.StatusRequest),
}


def rpc_error(name: str, addr: str, e: grpc.RpcError) -> CtlError:
    code = e.code() if hasattr(e, "code") else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CtlError(f"{name} at {addr} unreachable ({code.name})")
    details = e.details() if hasattr(e, "details") else str(e)
    return CtlError(f"{name} at {addr}: {code.name if code else 'error'}: {details}")


def need(t: Target, name: str) -> str:
    addr = t.addrs.get(name)
    if not addr:
        flag = "--" + name.replace("_", "-")
        raise CtlError(f"no {name} address: give {flag} or RLHF_CTL_{name.upper()}, or --run-dir of a stack "
                       "started by `make up`", 2)
    return addr


def call(t: Target, name: str, method: str, request) -> object:
    """One unary call to a service; CtlError naming the address when it fails."""
    addr = need(t, name)
    with grpc.insecure_channel(addr) as ch:
        stub = STUBS[name][0](ch)
        try:
            return getattr(stub, method)(request, timeout=t.timeout_s)
        except grpc.RpcError as e:
            raise rpc_error(name, addr, e) from None


def health(addr: str, timeout_s: float) -> str:
    """SERVING, NOT_SERVING, ... as the standard health service says, or 'unreachable'."""
    with grpc.insecure_channel(addr) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return "unreachable"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def service_info(name: str, resp) -> dict:
    """The fields of a service's version/status answer that status shows."""
    if name == "policy":
        return {"version": resp.version, "model_name": resp.model_name, "updated_unix_ms": resp.updated_unix_ms}
    if name == "reward":
        return {"version": resp.version_number, "model_version": resp.model_version,
                "reward_mean": resp.reward_mean, "reward_std": resp.reward_std, "reward_count": resp.reward_count,
                "shadow_model_version": resp.shadow_model_version}
    if name == "reference":
        return {"version": resp.version}
    if name == "trainer":
        last = resp.recent[-1] if resp.recent else None
        return {"version": resp.version, "step": resp.step, "paused": resp.paused, "algorithm": resp.algorithm,
                "rollouts_consumed": resp.rollouts_consumed, "groups_consumed": resp.groups_consumed,
                "last_step": None if last is None else {
                    "step": last.step, "kind": last.kind, "reward_mean": last.reward_mean, "kl": last.kl,
                    "loss": last.loss, "step_seconds": last.step_seconds, "rollouts": last.rollouts}}
    if name == "feedback":
        totals: dict[str, int] = {}
        for c in resp.counts:
            totals[c.outcome] = totals.get(c.outcome, 0) + c.count
        return {"counts": totals}
    if name == "reward_learner":
        return {"version": resp.version, "labels_read": resp.labels_read, "train_pairs": resp.train_pairs,
                "heldout_pairs": resp.heldout_pairs,
                "last_round": {"round": resp.last_round.round, "published": resp.last_round.published,
                               "reason": resp.last_round.reason} if resp.HasField("last_round") else None}
    raise ValueError(name)


# -- metrics -----------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value}; labelled samples as name{k="v",...}."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}"
                            if s.labels else "")
            out[key] = s.value
    return out


def scrape(endpoint: str, timeout_s: float) -> dict[str, float]:
    url = endpoint if endpoint.startswith("http") else f"http://{endpoint}/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return parse_metrics(r.read().decode())


def key_metrics(name: str, first: dict[str, float], second: dict[str, float], seconds: float) -> dict[str, float]:
    """The service's KEY_METRICS from two scrapes `seconds` apart (a rate needs both)."""
    def total(scraped: dict[str, float], metric: str) -> float | None:
        """The sample, or the sum over its label sets (e.g. tokens by kind)."""
        hits = [v for k, v in scraped.items() if k == metric or k.startswith(metric + "{")]
        return sum(hits) if hits else None

    out: dict[str, float] = {}
    for label, metric, kind in KEY_METRICS.get(name, []):
        now = total(second, metric)
        if now is None:
            continue
        if kind == "rate":
            before = total(first, metric)
            if before is not None and seconds > 0:
                out[label] = max(0.0, now - before) / seconds
        else:
            out[label] = now
    return out


# -- Kafka lags --------------------------------------------------------------------------

def group_lag(bus: BusConfig, topic: str, group: str, timeout_s: float) -> int | None:
    """Records of `topic` past `group`'s committed offsets (None: the group committed none)."""
    with trace_lib.TopicReader(bus, topic, events_pb2.Rollout, client_id="rlhfctl", connect_timeout_s=timeout_s) as r:
        end = r.end_offsets()
    c = KafkaConsumer(**bus.client_options(), group_id=group, client_id="rlhfctl", enable_auto_commit=False,
                      bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        committed = {p: c.committed(TopicPartition(topic, p)) for p in end}
    finally:
        c.close()
    if all(o is None for o in committed.values()):
        return None
    return sum(max(0, e - (committed[p] or 0)) for p, e in end.items())


def join_offsets(state_dir: Path, kind: str = "feedback") -> dict[int, int] | None:
    """The join's next offsets of a topic by partition, summed over every replica's database
    in the feedback service's state folder (None: no database there)."""
    dbs = sorted(state_dir.glob("join-*.sqlite")) if state_dir.is_dir() else []
    if not dbs:
        return None
    out: dict[int, int] = {}
    for db in dbs:
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
            try:
                rows = con.execute("SELECT partition, next_offset FROM offsets WHERE kind = ?", (kind,)).fetchall()
            finally:
                con.close()
        except sqlite3.Error:  # not a join database (yet), or locked past the timeout
            rows = []
        for p, o in rows:
            out[p] = max(out.get(p, 0), o)
    return out


def kafka_why(bus: BusConfig, e: Exception) -> str:
    """One line for a Kafka failure, naming the broker."""
    if isinstance(e, (ConnectionError, LookupError)):
        return str(e)
    return f"Kafka at {bus.bootstrap}: {type(e).__name__}: {e}"


def join_lag(bus: BusConfig, state_dir: Path, timeout_s: float) -> int | None:
    offsets = join_offsets(state_dir)
    if offsets is None:
        return None
    with trace_lib.TopicReader(bus, Topics(bus.topic_prefix).feedback, events_pb2.Feedback, client_id="rlhfctl",
                               connect_timeout_s=timeout_s) as r:
        end = r.end_offsets()
    return sum(max(0, e - offsets.get(p, 0)) for p, e in end.items())


# -- status ------------------------------------------------------------------------------

def collect_status(t: Target, window_s: float = 1.0) -> dict:
    """Everything `status` shows, as plain data (the --json output)."""
    t0 = time.monotonic()
    first = {}
    for name, ep in t.metrics.items():
        try:
            first[name] = scrape(ep, t.timeout_s)
        except OSError:
            pass
    services: dict[str, dict] = {}
    for name in SERVICES:
        addr = t.addrs.get(name)
        row: dict = {"address": addr, "health": "not configured" if not addr else health(addr, t.timeout_s)}
        if addr and row["health"] != "unreachable":
            try:
                row.update(service_info(name, call(t, name, STUBS[name][1], STUBS[name][2]())))
            except CtlError as e:
                row["error"] = str(e)
        services[name] = row
    topics = Topics(t.bus.topic_prefix)
    lag: dict = {}
    pol, tr = services["policy"].get("version"), services["trainer"].get("version")
    if pol is not None and tr is not None:
        lag["policy_versions_behind"] = max(0, tr - pol)
    kafka: dict = {"bootstrap": t.bus.bootstrap, "reachable": True}
    lag["trainer_group"] = t.trainer_group
    try:
        lag["trainer_rollouts"] = group_lag(t.bus, topics.rollouts, t.trainer_group, t.timeout_s)
        if t.join_state is not None:
            lag["join_feedback"] = join_lag(t.bus, t.join_state, t.timeout_s)
    except (ConnectionError, LookupError, KafkaError) as e:
        kafka.update(reachable=False, error=kafka_why(t.bus, e))
    time.sleep(max(0.0, window_s - (time.monotonic() - t0)))
    seconds = time.monotonic() - t0
    metrics: dict[str, dict] = {}
    for name, ep in t.metrics.items():
        try:
            metrics[name] = key_metrics(name, first.get(name, {}), scrape(ep, t.timeout_s), seconds)
        except OSError as e:
            metrics[name] = {"error": f"{ep} unreachable ({type(e).__name__})"}
    return {"services": services, "lag": lag, "kafka": kafka, "metrics": metrics, "window_s": round(seconds, 2)}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def service_detail(name: str, row: dict) -> str:
    """One short line of what matters per service."""
    if "error" in row:
        return row["error"]
    if name == "policy" and "model_name" in row:
        return f"model {row['model_name']!r}"
    if name == "reward" and "reward_count" in row:
        return f"reward mean {_fmt(row['reward_mean'])} std {_fmt(row['reward_std'])} over {row['reward_count']}"
    if name == "trainer" and "step" in row:
        s = f"step {row['step']}, {'PAUSED' if row['paused'] else 'running'}, {row['algorithm']}"
        last = row.get("last_step")
        if last:
            s += (f"; last step ({last['kind']}): reward {_fmt(last['reward_mean'])}, KL {_fmt(last['kl'])}, "
                  f"{last['step_seconds']:.2f} s")
        return s
    if name == "feedback" and "counts" in row:
        c = row["counts"]
        return ", ".join(f"{k} {c.get(k, 0)}" for k in ("accepted", "joined", "waiting"))
    if name == "reward_learner" and "labels_read" in row:
        return f"labels read {row['labels_read']}, pairs {row['train_pairs']} + {row['heldout_pairs']} held out"
    return ""


def render_status(st: dict) -> str:
    rows = [("SERVICE", "ADDRESS", "HEALTH", "VERSION", "DETAIL")]
    for name, row in st["services"].items():
        version = row.get("version")
        shown = "-" if version is None else "initial" if version < 0 else f"v{version}"
        rows.append((name, row["address"] or "-", row["health"], shown,
                     service_detail(name, row)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines = [ln.rstrip() for ln in lines]
    lag, svc = st["lag"], st["services"]
    lines.append("")
    lines.append("lag")
    if "policy_versions_behind" in lag:
        lines.append(f"  policy serves v{svc['policy']['version']}, trainer published v{svc['trainer']['version']}: "
                     f"{lag['policy_versions_behind']} versions behind")
    else:
        lines.append("  policy vs trainer: unknown (both must answer)")
    k = st["kafka"]
    if not k["reachable"]:
        lines.append(f"  consumer lags: unknown ({k['error']})")
    else:
        n = lag.get("trainer_rollouts")
        lines.append(f"  trainer on rollouts (group {lag.get('trainer_group', '?')}): "
                     + ("no committed offsets yet" if n is None else f"{n} records behind"))
        if "join_feedback" in lag:
            n = lag["join_feedback"]
            lines.append("  join on feedback: " + ("no join state found" if n is None else f"{n} records behind"))
        else:
            lines.append("  join on feedback: unknown (give --join-state, the feedback service's state folder)")
    if st["metrics"]:
        lines.append("")
        lines.append(f"metrics (rates over {st['window_s']} s)")
        width = max(len(n) for n in st["metrics"])
        for name, m in st["metrics"].items():
            shown = m["error"] if "error" in m else ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()) or "-"
            lines.append(f"  {name.ljust(width)}  {shown}")
    return "\n".join(lines)


def problems(st: dict) -> list[str]:
    """What makes `status` exit 1: configured services not serving, an unreachable broker."""
    out = []
    for name, row in st["services"].items():
        if row["health"] not in ("SERVING", "not configured"):
            out.append(f"{name} at {row['address']}: {row['health']}")
    if not st["kafka"]["reachable"]:
        out.append(st["kafka"]["error"])
    return out


# -- tail --------------------------------------------------------------------------------

def short(text: str, width: int = 60) -> str:
    """One line, at most `width` characters inside quotes."""
    one = " ".join(text.split())
    return json.dumps(one if len(one) <= width else one[: width - 1] + "…", ensure_ascii=False)


def clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S") if ms > 0 else "--:--:--"


def signal_text(rec) -> str:
    """A Feedback's or Label's signal in a few words."""
    kind = rec.WhichOneof("signal")
    if kind == "thumb":
        return "thumb " + events_pb2.Thumb.Name(rec.thumb).removeprefix("THUMB_").lower()
    if kind == "rating":
        r = rec.rating
        return f"rating {r.value:g} of {r.scale_min:g}..{r.scale_max:g}"
    if kind == "pairwise":
        choice = events_pb2.Choice.Name(rec.pairwise.choice).removeprefix("CHOICE_").lower()
        return f"pairwise {choice}" + (f" vs {rec.pairwise.other_generation_id}"
                                       if rec.pairwise.other_generation_id else "")
    if kind == "edit":
        return "edit " + short(rec.edit.edited_response, 30)
    return "no signal"


def source_text(source: int) -> str:
    return "ai" if source == events_pb2.LABEL_SOURCE_AI else "human"


def record_line(kind: str, rec, ts_ms: int = 0) -> str:
    """One line per record: time, id, version, what it says, a short text."""
    when = clock(getattr(rec, "created_unix_ms", 0) or ts_ms)
    if kind == "rollouts":
        return (f"{when}  {rec.rollout_id}  v{rec.policy_version}  prompt {rec.prompt_id[:12]} "
                f"{rec.group_index + 1}/{rec.group_size}  {len(rec.response_token_ids)} tokens  "
                f"{short(rec.response_text)}")
    if kind == "generations":
        return f"{when}  {rec.generation_id}  v{rec.policy_version}  {short(rec.prompt, 30)} -> {short(rec.response)}"
    if kind == "feedback":
        return (f"{when}  {rec.feedback_id}  on {rec.generation_id}  {signal_text(rec)}  {source_text(rec.source)}"
                + (f"  {short(rec.comment, 30)}" if rec.comment else ""))
    if kind == "labels":
        on = ", ".join(f"{r.generation_id or 'edit'}@v{r.policy_version}" for r in rec.responses)
        return f"{when}  {rec.label_id}  {signal_text(rec)}  {source_text(rec.source)}  on {on}  {short(rec.prompt, 30)}"
    if kind == "prompts":
        return f"{when}  {rec.prompt_id}  n={rec.n}  {rec.source or '-'}  {short(rec.text)}"
    if kind == "weights":
        fmt = events_pb2.WeightUpdate.Format.Name(rec.format).removeprefix("FORMAT_").lower()
        return (f"{when}  {rec.model_name}  v{rec.version}  {fmt}{'  ROLLBACK' if rec.rollback else ''}  "
                f"step {rec.step}  {rec.uri}")
    if kind == "dlq":
        return f"{when}  {rec.topic}[{rec.partition}]@{rec.offset}  from {rec.consumer}: {short(rec.error, 80)}"
    raise ValueError(f"unknown topic kind {kind!r}")


RECORD_TYPES = {"rollouts": events_pb2.Rollout, "generations": events_pb2.Generation, "feedback": events_pb2.Feedback,
                "labels": events_pb2.Label, "prompts": events_pb2.Prompt, "weights": events_pb2.WeightUpdate,
                "dlq": events_pb2.DeadLetter}


def read_line(kind: str, r: trace_lib.Read) -> str:
    if r.record is None:
        return f"{clock(r.timestamp_ms)}  partition {r.partition} offset {r.offset}: undecodable ({r.error})"
    return record_line(kind, r.record, r.timestamp_ms)


def tail(t: Target, kind: str, n: int, follow: bool, out: Callable[[str], None] = print) -> int:
    """Print the last `n` records of the topic, then (with follow) every new one until
    interrupted; returns how many were printed."""
    topic = getattr(Topics(t.bus.topic_prefix), kind)
    printed = 0
    with trace_lib.TopicReader(t.bus, topic, RECORD_TYPES[kind], client_id="rlhfctl-tail",
                               connect_timeout_s=t.timeout_s) as r:
        if n > 0:
            r.seek_last(n)
            recs = sorted(r.read_to_end(), key=lambda x: (x.timestamp_ms, x.partition, x.offset))[-n:]
        else:
            r.seek_end()
            recs = []
        for x in recs:
            out(read_line(kind, x))
            printed += 1
        sys.stdout.flush()
        while follow:
            for x in r.poll(timeout_ms=500):
                out(read_line(kind, x))
                printed += 1
            sys.stdout.flush()
    return printed


# -- commands ----------------------------------------------------------------------------

def cmd_status(t: Target, args) -> int:
    if not any(t.addrs.values()) and t.stack_file is None and not envs.get(BusConfig().env_of("bootstrap")) \
            and args.kafka is None:
        raise CtlError("no stack to ask: no stack.json in the run dir and no addresses given "
                       "(start one with `make up`, or give --trainer, --policy, ... and --kafka)", 2)
    st = collect_status(t, args.window)
    print(json.dumps(st, indent=2) if args.json else render_status(st))
    bad = problems(st)
    for p in bad:
        print(f"error: {p}", file=sys.stderr)
    return 1 if bad else 0


def cmd_pause_resume(t: Target, args) -> int:
    if args.command == "pause":
        s = call(t, "trainer", "Pause", trainer_pb2.PauseRequest())
    else:
        s = call(t, "trainer", "Resume", trainer_pb2.ResumeRequest())
    state = "paused" if s.paused else "running"
    print(f"trainer {state} at step {s.step} (version {s.version})")
    return 0


def cmd_rollback(t: Target, args) -> int:
    store = None if args.uri else t.weight_store
    if not args.uri and not store:
        raise CtlError("no weight store: give --weight-store (or RLHF_CTL_WEIGHT_STORE), --uri, or --run-dir", 2)
    try:
        update = rollback_lib.build_update(args.model_name, args.version, store, args.uri)
    except (ValueError, FileNotFoundError) as e:
        raise CtlError(str(e), 2) from None
    try:
        rollback_lib.publish(t.bus, update, client_id="rlhfctl", timeout_s=t.timeout_s * 2)
    except Exception as e:  # kafka-python raises its own errors, timeouts among them
        raise CtlError(f"Kafka at {t.bus.bootstrap}: rollback not published ({type(e).__name__}: {e})") from None
    print(f"published rollback of {args.model_name!r} to version {args.version} ({update.uri})")
    if args.wait > 0 and args.model_name == "policy" and t.addrs.get("policy"):
        deadline = time.monotonic() + args.wait
        while (v := call(t, "policy", "GetVersion", policy_pb2.GetVersionRequest()).version) != args.version:
            if time.monotonic() > deadline:
                raise CtlError(f"policy at {t.addrs['policy']} still serves v{v} after {args.wait:g} s")
            time.sleep(0.2)
        print(f"policy at {t.addrs['policy']} serves v{args.version}")
    return 0


def cmd_tail(t: Target, args) -> int:
    try:
        tail(t, args.topic, args.n, args.follow)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_trace(t: Target, args) -> int:
    if not t.weight_store:
        raise CtlError("no weight store: give --weight-store (or RLHF_CTL_WEIGHT_STORE), or --run-dir", 2)
    tr = trace_lib.trace(t.bus, WeightStore(t.weight_store), args.generation_id, args.policy_name, args.reward_name)
    print(json.dumps(asdict(tr), indent=2) if args.json else trace_lib.render(tr))
    return 1 if tr.generation is None and not tr.feedback else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlhfctl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    for f in CtlConfig._settings():
        flag = "--" + f.name.replace("_", "-")
        env = f"{CtlConfig.ENV}_{f.metadata['env']}"
        common.add_argument(flag, dest=f.name, default=None, type=float if f.name == "timeout_s" else str,
                            help=f"{f.metadata['help']} (env {env})")
    common.add_argument("--kafka", default=None, help="Kafka bootstrap host:port (env RLHF_KAFKA_BOOTSTRAP)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("status", parents=[common], help="Health, versions, step, lags and key metrics")
    p.add_argument("--json", action="store_true", help="Print the status as JSON")
    p.add_argument("--window", type=float, default=1.0, help="Seconds between the two metric scrapes of rates")
    sub.add_parser("pause", parents=[common], help="Pause the trainer (a step under way finishes)")
    sub.add_parser("resume", parents=[common], help="Resume the trainer")
    p = sub.add_parser("rollback", parents=[common], help="Publish a rollback to an earlier version")
    p.add_argument("version", type=int)
    p.add_argument("--uri", help="A model folder (or URL) to roll back to instead of a published version")
    p.add_argument("--model-name", default="policy")
    p.add_argument("--wait", type=float, default=60.0,
                   help="Seconds to wait until the policy serves the version (0: do not wait)")
    p = sub.add_parser("tail", parents=[common], help="The last records of a topic, one line each")
    p.add_argument("topic", choices=TAIL_TOPICS)
    p.add_argument("-n", type=int, default=10, help="How many of the last records (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="Keep printing new records until interrupted")
    p = sub.add_parser("trace", parents=[common], help="An answer's generation, feedback, labels and the "
                                                       "versions that learned from them")
    p.add_argument("generation_id")
    p.add_argument("--json", action="store_true", help="Print the trace as JSON")
    p.add_argument("--policy-name", default="policy")
    p.add_argument("--reward-name", default="reward")
    return ap


COMMANDS: dict[str, Callable[[Target, argparse.Namespace], int]] = {
    "status": cmd_status, "pause": cmd_pause_resume, "resume": cmd_pause_resume, "rollback": cmd_rollback,
    "tail": cmd_tail, "trace": cmd_trace}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    target = None
    try:
        flags = {f.name: getattr(args, f.name) for f in CtlConfig._settings()}
        target = resolve(flags, args.kafka)
        code = COMMANDS[args.command](target, args)
    except CtlError as e:
        print(f"error: {e}", file=sys.stderr)
        code = e.code
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (ConnectionError, LookupError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KafkaError as e:
        print(f"error: {kafka_why(target.bus, e) if target else e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
