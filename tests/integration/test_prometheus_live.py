"""The Helm chart's alerts and dashboards against a real Prometheus scraping the real services.

A small stack (broker, reward with a shadow model, reference, trainer, policy through vLLM)
runs a few training steps while Debian's `prometheus` scrapes every service's metrics port
each second and evaluates the chart's PrometheusRule (rendered by Helm's engine). The
config and rules come from rlhf_devstack.prometheus, which also points Prometheus at a
`make up` stack (scripts/prometheus_local.py) and at `make demo`'s. Then Prometheus' HTTP API must show: every target up,
every rule loaded and evaluated without error, every series that an alert or a dashboard
panel names present with the labels it is matched on, and the panels' queries returning
live values (reward, KL, throughput, weight sync)."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request

import httpx
import pytest

from rlhf.policy.v1 import policy_pb2
from rlhf_devstack import prometheus as prom_local
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.stack import Stack, StackSpec, free_port, seed_prompts

from tests.helm_helpers import dashboard_queries, selectors
from tests.helpers import run_until_steps

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RELEASE, NAMESPACE = "rl", "ml"
STARTED = ("reward", "reference", "trainer", "policy")
N_PROMPTS, GROUP, STEPS = 3, 2, 3

# Series that this stack cannot have, and why. The test fails if one of them shows up, so
# the list cannot go stale.
ABSENT = {
    "kafka_consumergroup_lag": "exported by Strimzi's Kafka Exporter, not by a service",
    **{m: "the feedback service is not started here" for m in (
        "rlhf_feedback_join_total", "rlhf_feedback_join_waiting", "rlhf_feedback_items_total",
        "rlhf_feedback_labels_total")},
    **{m: "the reward learner is not started here" for m in (
        "rlhf_reward_learner_version", "rlhf_reward_learner_heldout_accuracy")},
    "rlhf_reward_model_swaps_total": "a labelled counter: appears with the first hot swap of the reward model",
}
# Alerts whose expression, thresholds removed, has no series on a healthy run, and why.
QUIET_ALERTS = {
    "RLHFConsumerLag": "needs Kafka Exporter's lag",
    "RLHFFeedbackDeadLetters": "needs the feedback service",
    "RLHFWeightUpdateFailed": 'no weight update failed, so no outcome="failed" series',
    "RLHFRewardApiErrors": "no request failed, so no 5xx or INTERNAL series",
    "RLHFRewardHackingProxyGap": "its [1h:5m] subquery needs two 5-minute points",
}
# The dashboards' panels whose query needs an absent series.
QUIET_PANEL_METRICS = set(ABSENT)


class Prom:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}/api/v1/"

    def get(self, path: str, **params) -> object:
        url = self.base + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.get("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stack")
    spec = StackSpec(run_dir=run_dir, services=STARTED, rollout_n=GROUP, max_tokens=8, groups_per_step=1,
                     max_groups_ahead=2)
    st = Stack(spec)
    st.prepare_models()
    # The same tiny model as a shadow: the proxy-gold gap series exist (their value is 0).
    spec.service_env = {"reward": {"RLHF_REWARD_SHADOW_MODEL": str(spec.reward_model)}}
    t0 = time.monotonic()
    with st:  # starts it
        t_up = time.monotonic() - t0
        port = free_port()
        ports = {n: st.metrics_ports[n] for n in STARTED}
        cfg = prom_local.write_files(run_dir / "prometheus", ports, RELEASE, NAMESPACE, interval="1s")
        proc = prom_local.start(cfg, port, run_dir / "prometheus" / "data", run_dir / "prometheus.log")
        try:
            prom = Prom(port)
            # Scraping starts before the loop runs, so rates and weight-sync times are seen live.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                targets = prom.get("targets")["activeTargets"]
                if len(targets) == len(STARTED) and all(t["health"] == "up" for t in targets):
                    break
                time.sleep(0.5)
            seed_prompts(st.bus, tiny_prompts(N_PROMPTS, seed=11))
            t_seed = time.monotonic() - t0
            status, _, policy = run_until_steps(st, STEPS, timeout_s=120)
            t_steps = time.monotonic() - t0
            assert status.step >= STEPS
            # REST scores and a streamed generation: the REST and time-to-first-token series.
            # Two REST calls a few scrapes apart: the labelled REST series appear with the first,
            # so only the second makes their rates (and the p99 latency) non-zero.
            for _ in range(2):
                r = httpx.post(f"http://127.0.0.1:{st.configs['reward'].http_port}/v1/score", timeout=30,
                               json={"items": [{"prompt": "Hi", "response": "Hello there"}]})
                assert r.status_code == 200, r.text
                time.sleep(2.5)
            chunks = list(policy.GenerateStream(policy_pb2.GenerateRequest(
                prompt="Hello", sampling=policy_pb2.SamplingParams(max_tokens=4))))
            assert chunks
            time.sleep(2)  # a few more scrapes and rule evaluations
            print(f"\nstack healthy {t_up:.0f}s, targets up {t_seed:.0f}s, {STEPS} steps {t_steps:.0f}s, "
                  f"all {time.monotonic() - t0:.0f}s")
            yield prom, prom_local.rule_groups(prom_local.render_chart(RELEASE, NAMESPACE))
        finally:
            prom_local.stop(proc)
    assert proc.poll() is not None


def test_every_service_is_a_healthy_target_with_the_servicemonitors_labels(live):
    prom, _ = live
    targets = prom.get("targets")["activeTargets"]
    assert sorted(t["labels"]["container"] for t in targets) == sorted(STARTED)
    for t in targets:
        assert t["health"] == "up" and not t["lastError"], t
        svc = f"{RELEASE}-rlhf-stack-{t['labels']['container'].replace('_', '-')}"
        assert t["labels"]["namespace"] == NAMESPACE and t["labels"]["service"] == svc, t["labels"]
    up = prom.query(f'up{{namespace="{NAMESPACE}"}}')
    assert len(up) == len(STARTED) and all(float(s["value"][1]) == 1 for s in up)


def test_every_rule_loads_and_evaluates_without_error(live):
    prom, groups = live
    loaded = {g["name"]: g for g in prom.get("rules")["groups"]}
    assert set(loaded) == {g["name"] for g in groups}
    n = 0
    for g in groups:
        rules = loaded[g["name"]]["rules"]
        assert [r["name"] for r in rules] == [r["alert"] for r in g["rules"]]
        for r in rules:
            assert r["health"] == "ok" and not r.get("lastError"), r
            assert not r["lastEvaluation"].startswith("0001-"), f"{r['name']} was never evaluated"
            n += 1
    assert n == sum(len(g["rules"]) for g in groups) >= 12
    print(f"\n{n} rules evaluated, health ok")


def _named_metrics(groups) -> dict[str, set[str]]:
    """Every metric an alert or a dashboard panel names -> the labels it is matched on."""
    exprs = [r["expr"] for g in groups for r in g["rules"]] + [q for _, _, q in dashboard_queries(NAMESPACE)]
    named: dict[str, set[str]] = {}
    for e in exprs:
        for name, labels in selectors(e):
            named.setdefault(name, set()).update(labels)
    return named


def test_every_series_the_alerts_and_dashboards_name_is_exported_with_its_labels(live):
    prom, groups = live
    named = _named_metrics(groups)
    found = {}
    for name in named:
        series = prom.get("series", **{"match[]": f'{name}{{namespace="{NAMESPACE}"}}'})
        if series:
            found[name] = set().union(*(s.keys() for s in series))
    assert set(named) - set(found) == set(ABSENT), sorted(set(named) - set(found) ^ set(ABSENT))
    for name, labels in found.items():
        # A label that no live series has would make the selector match nothing.
        assert named[name] <= labels, (name, sorted(named[name] - labels))
    print(f"\n{len(found)} of {len(named)} named series live; absent: {sorted(ABSENT)}")


def strip_thresholds(expr: str) -> str:
    """An alert's expression without its comparisons to constants: the values it judges."""
    return re.sub(r"\s*(?:==|!=|>=|<=|>|<)\s*-?\d+(?:\.\d+)?(?=\s*(?:\)|$|and\b|or\b|unless\b))", "", expr.strip())


def test_strip_thresholds():
    assert strip_thresholds("(deriv(a[1h]) > 0)\nand\n(deriv(b[1h]) * 3600 > 8)") == "(deriv(a[1h]))\nand\n(deriv(b[1h]) * 3600)"
    assert strip_thresholds('up{x="1"} == 0') == 'up{x="1"}'
    assert strip_thresholds("q(a) > 0.5\nor\nq(b) > 0.5") == "q(a)\nor\nq(b)"


def test_each_alerts_expression_finds_live_series(live):
    prom, groups = live
    values, empty = {}, set()
    for g in groups:
        for r in g["rules"]:
            expr = strip_thresholds(r["expr"])
            assert not re.search(r"(?:>|<|==)\s*-?\d", expr), expr
            result = prom.query(expr)
            if result:
                values[r["alert"]] = [float(s["value"][1]) for s in result]
            else:
                empty.add(r["alert"])
    assert empty == set(QUIET_ALERTS), sorted(empty ^ set(QUIET_ALERTS))
    # The series the alerts judge, live: KL is measured, the service regex matches every
    # target, lags and latencies are finite.
    assert all(v == 1 for v in values["RLHFServiceDown"]) and len(values["RLHFServiceDown"]) == len(STARTED)
    assert all(math.isfinite(v) and v >= 0 for v in values["RLHFKLAboveTarget"])
    assert all(math.isfinite(v) for v in values["RLHFRolloutVersionLag"] + values["RLHFRewardApiLatency"]), values
    assert values["RLHFPolicyBehindPublishedWeights"] == [0.0]
    print("\nalert inputs: " + ", ".join(f"{a}={v}" for a, v in sorted(values.items())))


def test_dashboard_panels_show_the_live_loop(live):
    prom, _ = live
    got, silent = {}, []
    for uid, title, expr in dashboard_queries(NAMESPACE):
        result = prom.query(expr)
        if {n for n, _ in selectors(expr)} & QUIET_PANEL_METRICS:
            assert not result, (title, expr)
            silent.append(title)
            continue
        assert result, f"{uid} / {title}: no data for {expr}"
        got[expr] = [float(s["value"][1]) for s in result]

    def one(expr_part: str) -> float:
        (expr,) = [e for e in got if expr_part in e and "histogram_quantile(0.99" not in e]
        (v,) = got[expr]
        return v

    reward, kl = one("rlhf_trainer_reward_mean{"), one("rlhf_trainer_kl_nats{")
    throughput = one("sum(rate(rlhf_policy_rollouts_total")
    sync_p50 = one("histogram_quantile(0.5, sum by (le) (rate(rlhf_policy_weight_sync_seconds_bucket")
    tokens = one("sum(rate(rlhf_trainer_trained_tokens_total")
    assert math.isfinite(reward) and math.isfinite(kl) and kl >= 0
    assert throughput > 0 and tokens > 0, "rollouts were made and trained on while Prometheus scraped"
    assert 0 < sync_p50 < 60, "weight syncs happened while Prometheus scraped"
    assert one("rlhf_trainer_published_version{") >= STEPS and one("rlhf_policy_version{") >= STEPS
    print(f"\n{len(got)} panel queries with data ({len(silent)} need absent series); reward mean {reward:.3f}, "
          f"KL {kl:.4f}, rollouts/s {throughput:.3f}, trained tokens/s {tokens:.1f}, weight sync p50 {sync_p50:.3f}s")
