#!/usr/bin/env bash
# Runs the test tiers in one pytest session, fastest first: unit (pure), integration (real
# broker and service processes on loopback), e2e (the whole loop through vLLM), faults
# (crashes, broker outage, poison, fuzzing, load and security on the whole supervised stack;
# it prints the reliability table). RLHF_TEST_TIERS="unit integration" limits the tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# Unused imports, undefined names and the like fail the run before any test does.
"$PY" -m pyflakes libs/rlhf_common libs/rlhf_http libs/rlhf_devstack libs/rlhf_jobs services bench scripts tests
# The layers (pyproject.toml [tool.importlinter]): the library imports no service, no service
# imports another, and the dev stack and the jobs are imported by no service.
"$(dirname "$PY")/lint-imports" --no-cache
paths=()
for tier in ${RLHF_TEST_TIERS:-unit integration e2e faults}; do paths+=("tests/$tier"); done
# pytest exits 5 when no test ran; that is a failure here too.
exec "$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning "${paths[@]}"
