#!/usr/bin/env bash
# Runs the three test tiers in order: unit (fast, pure), integration (real broker and
# service processes on loopback), e2e (the whole loop through vLLM).
# RLHF_TEST_TIERS="unit integration" limits the tiers; pytest's "no tests ran" (exit 5) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tiers=${RLHF_TEST_TIERS:-unit integration e2e}
status=0
for tier in $tiers; do
  echo "=== $tier tests ==="
  "$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning "tests/$tier"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "$tier tests failed (pytest exit $rc)"
    status=1
  fi
done
exit $status
