"""Debian's Prometheus against a local stack, with the Helm chart's alert rules.

Writes `prometheus.yml` (one scrape job per service's metrics port; each target carries the
labels the chart's ServiceMonitors give in a cluster: namespace, service, pod, job, so the
alert and dashboard queries run unchanged) and `rules.yml` (the chart's PrometheusRule,
rendered by Helm's engine from the `helm-python-sdk` wheel), runs the `prometheus` binary,
and reads series back through its HTTP API. Used by `make demo` and
`scripts/prometheus_local.py`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "k8s" / "rlhf-stack"
CHART_NAME = "rlhf-stack"


def fullname(release: str) -> str:
    """The chart's `rlhf.fullname` for a release name (the chart name joined unless already in it)."""
    return release if CHART_NAME in release else f"{release}-{CHART_NAME}"


def render_chart(release: str, namespace: str, values: dict | None = None) -> list[dict]:
    """Every object the chart renders, through Helm's own engine."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=release, namespace=namespace)
    return [d for path, text in sorted(out.items()) if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]


def rule_groups(docs: list[dict]) -> list[dict]:
    """The PrometheusRule's `spec.groups`: the body of a plain Prometheus rule file."""
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return rule["spec"]["groups"]


def target_labels(service: str, release: str, namespace: str) -> dict[str, str]:
    """The labels Prometheus gives a pod scraped through the chart's ServiceMonitor."""
    svc = f"{fullname(release)}-{service.replace('_', '-')}"
    return {"namespace": namespace, "service": svc, "job": svc, "pod": f"{svc}-0",
            "container": service, "endpoint": "metrics"}


def config(metrics_ports: dict[str, int], release: str, namespace: str, interval: str = "5s",
           rule_file: str | None = "rules.yml") -> dict:
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [rule_file] if rule_file else [],
        "scrape_configs": [
            {"job_name": name, "metrics_path": "/metrics",
             "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                 "labels": target_labels(name, release, namespace)}]}
            for name, port in sorted(metrics_ports.items())
        ],
    }


def write_files(out_dir: Path, metrics_ports: dict[str, int], release: str = "rlhf", namespace: str = "rlhf",
                interval: str = "5s", values: dict | None = None, rules: bool = True) -> Path:
    """Writes prometheus.yml and (with `rules`) rules.yml into out_dir; returns the config's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if rules:
        groups = rule_groups(render_chart(release, namespace, values))
        (out_dir / "rules.yml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    path = out_dir / "prometheus.yml"
    cfg = config(metrics_ports, release, namespace, interval, "rules.yml" if rules else None)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise FileNotFoundError("prometheus is missing: `make .venv/.helm` installs Debian's prometheus package")
    return path


def command(config_path: Path, port: int, storage: Path) -> list[str]:
    return [prometheus_binary(), f"--config.file={config_path}", f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d", "--log.level=warn"]


def start(config_path: Path, port: int, storage: Path, log_path: Path, timeout_s: float = 60.0) -> subprocess.Popen:
    """Starts Prometheus in the background; returns once /-/ready answers."""
    config_path, storage = config_path.resolve(), storage.resolve()  # it runs in the config's folder
    log = open(log_path, "ab")
    proc = subprocess.Popen(command(config_path, port, storage), stdout=log, stderr=subprocess.STDOUT,
                            cwd=config_path.parent)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise TimeoutError(f"prometheus not ready on {port}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Series:
    labels: dict[str, str]
    points: list[tuple[float, float]]  # (unix seconds, value)


class LocalPrometheus:
    """A Prometheus process scraping `metrics_ports` (service name -> port), with its API.

        with LocalPrometheus(ports, out_dir, port=9090).start() as prom:
            ...
            prom.query_range('rate(rlhf_policy_generated_tokens_total[30s])', t0, t1, step=10)
    """

    def __init__(self, metrics_ports: dict[str, int], out_dir: Path, port: int, interval: str = "5s",
                 rules: bool = True, release: str = "rlhf", namespace: str = "rlhf"):
        self.metrics_ports, self.out_dir, self.port = dict(metrics_ports), Path(out_dir).resolve(), port
        self.interval, self.rules, self.release, self.namespace = interval, rules, release, namespace
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalPrometheus":
        path = write_files(self.out_dir, self.metrics_ports, self.release, self.namespace, self.interval,
                           rules=self.rules)
        self.proc = start(path, self.port, self.out_dir / "data", self.out_dir / "prometheus.log")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def __enter__(self) -> "LocalPrometheus":
        return self if self.proc else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self, path: str, **params) -> object:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> list[Series]:
        """Every series of a range query, NaN points dropped."""
        data = self.api("query_range", query=expr, start=f"{start_s:.3f}", end=f"{end_s:.3f}", step=f"{step_s:g}")
        out = []
        for r in data["result"]:
            pts = [(float(t), float(v)) for t, v in r["values"]]
            out.append(Series(r["metric"], [(t, v) for t, v in pts if v == v]))
        return out

    def targets_up(self) -> dict[str, bool]:
        """Scrape health per job."""
        data = self.api("targets")
        return {t["labels"].get("container", t["labels"].get("job", "?")): t["health"] == "up"
                for t in data["activeTargets"]}
