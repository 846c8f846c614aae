"""Run Prometheus against a local stack, with the Helm chart's alert rules.

    make up                                    # the stack, detached; writes .run/stack.json
    .venv/bin/python scripts/prometheus_local.py --run-dir .run
    # then open http://127.0.0.1:9090 (Alerts, Graph; Status > Targets)

It reads each service's metrics port from `<run-dir>/stack.json`, renders the chart's
PrometheusRule with Helm's engine (the `helm-python-sdk` wheel, from `make .venv/.helm`)
and writes `<run-dir>/prometheus/prometheus.yml` and `rules.yml`. Each target carries the
labels that the chart's ServiceMonitors give in a cluster (namespace, service, pod, job),
so the alert and dashboard queries run unchanged. Then it runs Debian's `prometheus`
binary in the foreground (Ctrl-C stops it); `--write-only` stops after writing the files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
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
           rule_file: str = "rules.yml") -> dict:
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [rule_file],
        "scrape_configs": [
            {"job_name": name, "metrics_path": "/metrics",
             "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                 "labels": target_labels(name, release, namespace)}]}
            for name, port in sorted(metrics_ports.items())
        ],
    }


def write_files(out_dir: Path, metrics_ports: dict[str, int], release: str = "rlhf", namespace: str = "rlhf",
                interval: str = "5s", values: dict | None = None) -> Path:
    """Writes prometheus.yml and rules.yml into out_dir; returns the config's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = rule_groups(render_chart(release, namespace, values))
    (out_dir / "rules.yml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config(metrics_ports, release, namespace, interval), sort_keys=False))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=ROOT / ".run", help="the stack's run folder (make up's RUN_DIR)")
    ap.add_argument("--port", type=int, default=9090, help="Prometheus' web UI and API port")
    ap.add_argument("--release", default="rlhf", help="the release name the rules are rendered for")
    ap.add_argument("--namespace", default="rlhf", help="the namespace label given to every target")
    ap.add_argument("--interval", default="5s", help="scrape and rule evaluation interval")
    ap.add_argument("--write-only", action="store_true", help="write the config and rules, do not run prometheus")
    args = ap.parse_args()
    try:
        prometheus_binary()
    except FileNotFoundError as e:
        sys.exit(str(e))
    state_file = args.run_dir / "stack.json"
    if not state_file.exists():
        sys.exit(f"no stack running from {args.run_dir} (no stack.json): run `make up` first")
    ports = {name: s["metrics"] for name, s in json.loads(state_file.read_text())["services"].items()}
    out = args.run_dir / "prometheus"
    path = write_files(out, ports, args.release, args.namespace, args.interval)
    print(f"wrote {path} and {out / 'rules.yml'}; scraping {', '.join(f'{n}:{p}' for n, p in sorted(ports.items()))}")
    if args.write_only:
        return
    cmd = command(path, args.port, out / "data")
    print(f"Prometheus on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    os.chdir(out)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
