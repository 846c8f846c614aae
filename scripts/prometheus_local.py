"""Run Prometheus against a local stack, with the Helm chart's alert rules.

    make up                                    # the stack, detached; writes .run/stack.json
    .venv/bin/python scripts/prometheus_local.py --run-dir .run
    # then open http://127.0.0.1:9090 (Alerts, Graph; Status > Targets)

It reads each service's metrics port from `<run-dir>/stack.json` and writes
`<run-dir>/prometheus/prometheus.yml` and `rules.yml` with `rlhf_devstack.prometheus` (each
target carries the labels that the chart's ServiceMonitors give in a cluster, so the alert
and dashboard queries run unchanged). Then it runs Debian's `prometheus` binary in the
foreground (Ctrl-C stops it); `--write-only` stops after writing the files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rlhf_devstack.prometheus import ROOT, command, prometheus_binary, write_files


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
