"""The fault suite's reliability table: each fault or attack adds a row; the table is printed
at the end of the run and, with RLHF_RELIABILITY_OUT=<file>, written as Markdown there
(`make reliability` refreshes docs/RELIABILITY.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf_devstack.stack import Stack, StackSpec

GROUP = 2  # samples per prompt in the fault stack

HEADER = ("| fault or attack | records in | records out | dead-lettered | lost | duplicated | errors returned |\n"
          "|---|---|---|---|---|---|---|\n")


@dataclass
class Row:
    fault: str
    records_in: int
    records_out: int
    dead_lettered: int
    lost: int
    duplicated: int
    errors_returned: int
    note: str = ""

    def markdown(self) -> str:
        return (f"| {self.fault} | {self.records_in} | {self.records_out} | {self.dead_lettered} | {self.lost} | "
                f"{self.duplicated} | {self.errors_returned} |")


ROWS: list[Row] = []


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The whole stack, supervised (a service that dies is restarted), with the policy's
    and the trainer's commit-window failpoints armed to fire once."""
    run_dir = tmp_path_factory.mktemp("faults")
    once = run_dir / "failpoints"
    once.mkdir()
    spec = StackSpec(
        run_dir=run_dir, services=("reward", "reference", "trainer", "feedback", "reward_learner", "policy"),
        rollout_n=GROUP, max_tokens=8, groups_per_step=2, max_groups_ahead=4, supervise=True, restart_limit=1000,
        extra_env={"RLHF_FAILPOINTS_ONCE_DIR": str(once), "RLHF_TRAINER_RPC_RETRY_S": "300",
                   "RLHF_FEEDBACK_WAIT_S": "600"},
        service_env={"policy": {"RLHF_FAILPOINTS": "policy.rollouts_written"},
                     "trainer": {"RLHF_FAILPOINTS": "trainer.weights_published"}})
    with Stack(spec) as st:
        st.once = once
        yield st



@pytest.fixture(scope="session")
def reliability():
    """Call with a Row to record it; the test still asserts its own invariants."""
    return ROWS.append


def table() -> str:
    notes = [f"- **{r.fault}**: {r.note}" for r in ROWS if r.note]
    return HEADER + "\n".join(r.markdown() for r in ROWS) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    terminalreporter.section("reliability")
    terminalreporter.write(table())
    out = os.environ.get("RLHF_RELIABILITY_OUT")
    if out:
        path = Path(out)
        intro = path.read_text().split("<!-- table -->")[0] if path.exists() else "# Reliability\n\n"
        path.write_text(intro + "<!-- table -->\n" + table())
        terminalreporter.write(f"written to {path}\n")
