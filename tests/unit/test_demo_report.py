"""The demo's report (libs/rlhf_devstack/demo_report.py) rendered from a synthetic run folder."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import matplotlib.image
import numpy as np

from rlhf_devstack.demo_report import PLOTS, check_report, headline, main, read_timeline, write_report

SUMMARY = {
    "model": "SmolLM2-135M-Instruct",
    "minutes": 4.0,
    "started": "2025-01-01T12:00:00+00:00",
    "machine": "2 CPU cores",
    "settings": {"group_size": 4, "lr": 1e-5, "prompt_set": "a|b"},
    "stages": {"gold judge": {"seconds": 12.5, "held_out_accuracy": 0.71},
               "sft": {"seconds": 40.0, "rows": 800, "first_loss": 2.1, "last_loss": 1.4},
               "reward model": {"seconds": 30.0, "pairs": 500, "held_out_accuracy": 0.64}},
    "gold_before": {"mean": -0.412, "low": -0.5, "high": -0.324},
    "gold_after": {"mean": 0.137, "low": 0.051, "high": 0.223},
    "proxy_gain_sd": 1.8, "gold_gain_sd": 0.9, "gap_sd": 0.9,
    "kl_final": 0.0421,
    "win_rate": {"rate": 0.64, "low": 0.55, "high": 0.72, "wins": 60, "ties": 8, "n": 100},
    "versions": {"policy": 31, "reward": 3},
    "feedback": {"thumbs": 120, "rating": 80, "pairwise": 40},
    "labels": 210,
    "steps": {"rollouts": 24, "labels": 6},
    "examples": [{"prompt": "Say hi | then *bow*\nsecond line", "before": "hi", "after": "Hello there!\n\nHow are you?",
                  "gold_before": -0.2, "gold_after": 0.4}],
    "prometheus": "",
    "notes": ["The reference service restarted once."],
}


def timeline_records() -> list[dict]:
    """Evaluations, steps and samples over four minutes; NaN and absent fields; no throughput records."""
    records = []
    for i, t in enumerate([-2.0, 60.0, 120.0, 180.0, 240.0]):
        label = "before" if i == 0 else "after" if i == 4 else "during"
        records.append({"kind": "eval", "t": t, "label": label, "policy_version": 8 * i, "reward_version": min(i, 3),
                        "gold_mean": -0.412 + 0.137 * i, "gold_low": -0.5 + 0.137 * i, "gold_high": -0.324 + 0.137 * i,
                        "proxy_mean": 0.1 + 0.4 * i if i != 2 else None, "gold_gain_sd": 0.225 * i,
                        "proxy_gain_sd": 0.45 * i, "gap_sd": 0.225 * i, "kl_nats": math.nan if i == 3 else 0.01 * i,
                        "length_tokens": 40.0 + i, "answers": 64})
    for step in range(1, 31):
        labels = step % 5 == 0
        record = {"kind": "step", "t": 8.0 * step, "step": step, "version": step,
                  "step_kind": "labels" if labels else "rollouts", "reward_mean": 0.5 if labels else 0.02 * step,
                  "reward_std": 0.3, "kl": 0.002 * step, "response_length_mean": 38.0 + step % 3,
                  "step_seconds": 7.5, "loss": 0.7}
        if step % 7:  # some steps carry no entropy
            record["entropy"] = 2.0 - 0.01 * step
        records.append(record)
    for k in range(49):
        t = 5.0 * k
        records.append({"kind": "sample", "t": t, "policy_version": max(0, k // 2 - 1), "trainer_version": k // 2,
                        "reward_version": min(3, k // 12), "labels": 4 * k, "interactions": 10 * k,
                        "feedback": {"thumbs": 3 * k, "rating": 2 * k, "pairwise": k}})
    return records


def make_run(run_dir: Path, summary: dict = SUMMARY) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in timeline_records()] + ["not json", json.dumps({"kind": "step"})]
    random.Random(0).shuffle(lines)  # records need not come in time order
    (run_dir / "timeline.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def embedded_plots(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


def test_report_from_a_run_folder(tmp_path):
    run = make_run(tmp_path / "run")
    timeline = read_timeline(run / "timeline.jsonl")
    assert {kind: len(records) for kind, records in timeline.records.items()} == {
        "eval": 5, "step": 30, "sample": 49, "throughput": 0}
    assert timeline.skipped == 2

    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()

    # every plot but throughput, linked relative to the report, each a real picture
    links = embedded_plots(report)
    assert links == [f"plots/{p.file}" for p in PLOTS if p.file != "throughput.png"]
    assert not (run / "plots" / "throughput.png").exists()
    assert check_report(run) == []
    assert main([str(run), "--check"]) == 0

    # the headline's numbers
    assert "rose over 4 minutes of online training from -0.412 [-0.500, -0.324] before to 0.137 [0.051, 0.223]" in text
    assert "the intervals do not overlap" in text
    assert "on 100 answers to held-out prompts (paired by prompt and seed), the final policy's win rate against the SFT policy is 0.64 (95% interval 0.55 " \
           "to 0.72; 60 wins, 8 ties): better than an even split." in text
    assert "The final KL to the reference is 0.042 nats per token" in text
    assert "grew over the run, from 0.00 to 0.90 SD" in text
    # tables, examples, notes and what is missing
    assert "| sft | 40.0 | rows 800, first\\_loss 2.1, last\\_loss 1.4 |" in text
    assert "| prompt\\_set | a\\|b |" in text
    assert "> Say hi \\| then \\*bow\\*\\\n> second line\n" in text
    assert "After, gold 0.400:\n\n> Hello there!\n>\n> How are you?\n" in text
    assert "- The reference service restarted once." in text
    assert "No `throughput` records: Prometheus was not available, so there is no throughput plot." in text
    assert "No `throughput.png`" not in text
    assert "`eval` records: `kl_nats` is missing or not a number in 1 of 5." in text
    assert "`eval` records: `proxy_mean` is missing or not a number in 1 of 5." in text
    assert "`step` records: `entropy` is missing or not a number in 4 of 30." in text
    assert "2 lines of `timeline.jsonl` were skipped" in text


def test_headline_says_plainly_when_gold_did_not_rise():
    summary = dict(SUMMARY, gold_after={"mean": -0.45, "low": -0.54, "high": -0.36},
                   win_rate={"rate": 0.46, "low": 0.37, "high": 0.55, "wins": 40, "ties": 12, "n": 100})
    text = headline(summary, read_timeline(Path("/nonexistent/timeline.jsonl")))
    assert text.startswith("The gold score did not rise: SmolLM2-135M-Instruct over 4 minutes")
    assert "not distinguishable from an even split" in text
    assert "rose" not in text


def test_check_report_finds_broken_plots_bad_numbers_and_stuck_versions(tmp_path, capsys):
    summary = dict(SUMMARY, kl_final=math.nan, gold_after={"mean": None}, versions={"policy": 5, "reward": 0})
    run = make_run(tmp_path / "run", summary)
    write_report(run)
    plots = run / "plots"
    (plots / "gap.png").write_bytes(b"not a png at all" * 200)
    (plots / "length.png").unlink()
    # a plain picture, padded past the size limit with a text chunk so that only its colour is wrong
    matplotlib.image.imsave(plots / "versions.png", np.ones((200, 300, 3)), metadata={"Comment": "x" * 4000})
    assert (plots / "versions.png").stat().st_size > 2048
    pixels = np.random.default_rng(0).random((4, 4, 3))
    matplotlib.image.imsave(plots / "feedback.png", pixels)  # a real picture but a tiny file

    problems = check_report(run)
    assert sorted(problems) == sorted([
        f"{plots / 'gap.png'} is not a PNG",
        f"{plots / 'length.png'} is missing",
        f"{plots / 'versions.png'} is of one colour",
        f"{plots / 'feedback.png'} has only {(plots / 'feedback.png').stat().st_size} bytes (fewer than 2048)",
        "summary.json: gold_after.mean is None, not a finite number",
        "summary.json: kl_final is nan, not a finite number",
        "summary.json: versions.reward is 0: the reward model never advanced past version 0",
    ])
    assert main([str(run), "--check"]) == 1
    assert "is of one colour" in capsys.readouterr().out

    (run / "report.md").unlink()
    assert f"{run / 'report.md'} is missing" in check_report(run)
