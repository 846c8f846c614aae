"""The demo's report: PNG plots and a Markdown page from a run folder.

Reads two files that `rlhf_devstack.demo` writes into its run folder:

- `timeline.jsonl`, one JSON record a line, each with `kind` and `t` (seconds since the online
  stage started): `eval` (held-out gold and proxy scores of the served policy), `step` (one
  trainer step, GRPO on rollouts or DPO on labels), `sample` (versions and feedback counts,
  polled every few seconds) and `throughput` (tokens per second from Prometheus);
- `summary.json`, the run's settings, stage times and final numbers.

Writes `plots/*.png` and `report.md` next to them. The report links its plots relatively, so
the folder can be moved. Any field may be null, NaN or absent and a whole kind of record may
be missing: the plots show what exists and the report lists what is missing.

`check_report` lists what is wrong with a rendered report (a missing or blank plot, a final
number that is not finite, versions that never advanced); CI's smoke run fails on any.

    python -m rlhf_devstack.demo_report RUN_DIR           # render RUN_DIR/report.md again
    python -m rlhf_devstack.demo_report RUN_DIR --check   # print its problems, exit 1 if any

Dev tooling: no service imports this module.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

KINDS = ("eval", "step", "sample", "throughput")

# The fields each kind of record should carry, as key paths; the report counts the records
# where one is missing or not a number.
FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "eval": (("gold_mean",), ("gold_low",), ("gold_high",), ("proxy_mean",), ("gold_gain_sd",),
             ("proxy_gain_sd",), ("gap_sd",), ("kl_nats",), ("length_tokens",), ("reward_version",)),
    "step": (("reward_mean",), ("reward_std",), ("kl",), ("entropy",), ("response_length_mean",)),
    "sample": (("policy_version",), ("trainer_version",), ("reward_version",), ("labels",), ("interactions",)),
    "throughput": (("tokens_per_s", "rollout"), ("tokens_per_s", "serve")),
}

# The final numbers that must be finite for the report to count (`check_report`).
SUMMARY_NUMBERS: tuple[tuple[str, ...], ...] = (
    ("gold_before", "mean"), ("gold_after", "mean"), ("win_rate", "rate"), ("kl_final",), ("gap_sd",))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 2048
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
DPI = 100


# ---------------------------------------------------------------------------------------------
# Reading the run folder


def get(obj: object, *path: str) -> object:
    """obj[path[0]][path[1]]...; None where a key is absent or a level is not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def num(value: object) -> float:
    """value as a float; NaN for null, booleans, and anything that is not a number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Timeline:
    """The records of timeline.jsonl by kind, each list sorted by `t`."""

    records: dict[str, list[dict]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    skipped: int = 0
    """Lines that were not JSON objects with a known kind and a finite `t`."""

    def of(self, kind: str) -> list[dict]:
        return self.records.get(kind, [])

    def steps(self, step_kind: str) -> list[dict]:
        """Trainer steps of one kind: "labels" (DPO on feedback pairs) or "rollouts" (GRPO, the default)."""
        want_labels = step_kind == "labels"
        return [r for r in self.of("step") if (r.get("step_kind") == "labels") == want_labels]


def read_timeline(path: Path) -> Timeline:
    timeline = Timeline()
    if not path.is_file():
        return timeline
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            timeline.skipped += 1
            continue
        if not isinstance(record, dict) or record.get("kind") not in KINDS or not math.isfinite(num(record.get("t"))):
            timeline.skipped += 1
            continue
        timeline.records[record["kind"]].append(record)
    for records in timeline.records.values():
        records.sort(key=lambda r: num(r["t"]))
    return timeline


def read_summary(path: Path) -> dict:
    """summary.json as an object; empty when the file is missing or not a JSON object."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def series(records: list[dict], *path: str) -> tuple[np.ndarray, np.ndarray]:
    """(minutes since the online stage started, value) of the records where the value is a finite number."""
    points = [(num(r["t"]) / 60.0, num(get(r, *path))) for r in records]
    points = [(x, y) for x, y in points if math.isfinite(y)]
    return np.array([x for x, _ in points], dtype=float), np.array([y for _, y in points], dtype=float)


def rows(records: list[dict], *keys: str) -> np.ndarray:
    """(minutes, record[key] for each key) of the records where every value is a finite number,
    as an array of shape (n, 1 + len(keys))."""
    table = [[num(r["t"]) / 60.0] + [num(r.get(k)) for k in keys] for r in records]
    finite = [row for row in table if all(math.isfinite(v) for v in row)]
    return np.array(finite, dtype=float).reshape(-1, 1 + len(keys))


def reward_model_updates(timeline: Timeline) -> list[tuple[float, int]]:
    """(minute, new version) each time a higher reward-model version first shows in eval or sample records."""
    seen = [(num(r["t"]) / 60.0, num(r.get("reward_version"))) for r in timeline.of("eval") + timeline.of("sample")]
    updates, highest = [], None
    for minute, version in sorted((m, v) for m, v in seen if math.isfinite(v)):
        if highest is not None and version > highest:
            updates.append((minute, int(version)))
        highest = version if highest is None else max(highest, version)
    return updates


# ---------------------------------------------------------------------------------------------
# Plots: each draws onto the axes of a fresh figure and returns False when it has nothing to draw


def new_figure(rows: int = 1, height: float = 4.0) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(8, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, 1)]
    axes += [fig.add_subplot(rows, 1, i + 1, sharex=axes[0]) for i in range(1, rows)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("time in the online stage (minutes)")
    return fig, axes


def legend(*axes: Axes) -> None:
    """One legend for axes that share a plot area (twin y axes)."""
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        axes[0].legend(handles, labels, loc="best", fontsize="small")


def line(ax: Axes, x: np.ndarray, y: np.ndarray, *args, **kwargs) -> bool:
    """ax.plot(x, y, ...) when there are points to draw, so that empty series get no legend entry."""
    if not len(y):
        return False
    ax.plot(x, y, *args, **kwargs)
    return True


def no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")


def plot_gold_proxy(timeline: Timeline, ax: Axes) -> bool:
    evals = timeline.of("eval")
    x, gold = series(evals, "gold_mean")
    xp, proxy = series(evals, "proxy_mean")
    if not len(gold) and not len(proxy):
        return False
    band = rows(evals, "gold_low", "gold_high")
    if len(band):
        ax.fill_between(band[:, 0], band[:, 1], band[:, 2], color="tab:blue", alpha=0.2, label="gold 95% interval")
    line(ax, x, gold, "o-", color="tab:blue", label="gold judge (simulated users' taste)")
    ax.set_ylabel("gold score (mean over held-out prompts)", color="tab:blue")
    proxy_ax = ax.twinx()
    line(proxy_ax, xp, proxy, "s--", color="tab:orange", label="proxy reward model (current version)")
    proxy_ax.set_ylabel("proxy reward (mean)", color="tab:orange")
    for i, (minute, version) in enumerate(reward_model_updates(timeline)):
        ax.axvline(minute, color="grey", linestyle=":", label="new reward-model version" if i == 0 else None)
        ax.annotate(f"v{version}", (minute, 1.0), xycoords=("data", "axes fraction"), fontsize="x-small",
                    color="grey", ha="left", va="top")
    legend(ax, proxy_ax)
    ax.set_title("Held-out gold score and proxy reward of the served policy")
    return True


def plot_gap(timeline: Timeline, ax: Axes) -> bool:
    drawn = False
    for key, label, style in (("gold_gain_sd", "gold gain", "o-"), ("proxy_gain_sd", "proxy gain", "s-"),
                              ("gap_sd", "gap = proxy gain - gold gain", "^--")):
        drawn |= line(ax, *series(timeline.of("eval"), key), style, label=label)
    if not drawn:
        return False
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("gain over the SFT policy (SFT standard deviations)")
    ax.set_title("Gain over the SFT policy: gold judge against proxy reward model")
    legend(ax)
    return True


def plot_kl_entropy(timeline: Timeline, kl_ax: Axes, entropy_ax: Axes) -> bool:
    xs, kl = series(timeline.steps("rollouts"), "kl")
    xe, held_out_kl = series(timeline.of("eval"), "kl_nats")
    xh, entropy = series(timeline.steps("rollouts"), "entropy")
    if not (len(kl) or len(held_out_kl) or len(entropy)):
        return False
    line(kl_ax, xs, kl, "-", color="tab:red", linewidth=1, label="per GRPO step (rollouts)")
    line(kl_ax, xe, held_out_kl, "o", color="darkred", label="held-out evaluation")
    kl_ax.set_ylabel("KL to reference (nats/token)")
    kl_ax.set_title("KL to the reference policy and entropy")
    if len(kl) or len(held_out_kl):
        legend(kl_ax)
    else:
        no_data(kl_ax)
    line(entropy_ax, xh, entropy, "-", color="tab:purple", linewidth=1, label="per GRPO step (rollouts)")
    entropy_ax.set_ylabel("entropy (nats/token)")
    if len(entropy):
        legend(entropy_ax)
    else:
        no_data(entropy_ax)
    return True


def plot_length(timeline: Timeline, ax: Axes) -> bool:
    xs, steps = series(timeline.steps("rollouts"), "response_length_mean")
    xe, evals = series(timeline.of("eval"), "length_tokens")
    if not len(steps) and not len(evals):
        return False
    line(ax, xs, steps, "-", color="tab:green", linewidth=1, label="rollouts per GRPO step")
    line(ax, xe, evals, "o", color="darkgreen", label="held-out evaluation")
    ax.set_ylabel("mean answer length (tokens)")
    ax.set_title("Answer length")
    legend(ax)
    return True


def plot_throughput(timeline: Timeline, ax: Axes) -> bool:
    drawn = False
    for key, label in (("rollout", "rollouts (trainer's samples)"), ("serve", "serving (users' requests)")):
        drawn |= line(ax, *series(timeline.of("throughput"), "tokens_per_s", key), "o-", label=label)
    if not drawn:
        return False
    ax.set_ylabel("generated tokens per second")
    ax.set_title("Generation throughput (Prometheus)")
    legend(ax)
    return True


def plot_versions(timeline: Timeline, ax: Axes) -> bool:
    drawn = False
    for key, label in (("trainer_version", "trainer (latest published)"), ("policy_version", "policy (served)"),
                       ("reward_version", "reward model (in service)")):
        x, y = series(timeline.of("sample"), key)
        if len(y):
            ax.step(x, y, where="post", label=label)
            drawn = True
    if not drawn:
        return False
    ax.set_ylabel("version")
    ax.set_title("Model versions over time")
    legend(ax)
    return True


def plot_feedback(timeline: Timeline, ax: Axes) -> bool:
    samples = timeline.of("sample")
    kinds = sorted({kind for r in samples if isinstance(r.get("feedback"), dict) for kind in r["feedback"]})
    drawn = False
    for kind in kinds:
        drawn |= line(ax, *series(samples, "feedback", kind), "-", label=f"feedback: {kind}")
    for key, label, style in (("labels", "labels made by the join", "--"),
                              ("interactions", "simulated-user interactions", ":")):
        color = "grey" if key == "interactions" else "black"
        drawn |= line(ax, *series(samples, key), style, color=color, label=label)
    if not drawn:
        return False
    ax.set_ylabel("cumulative count")
    ax.set_title("Feedback accepted and labels made")
    legend(ax)
    return True


def plot_reward(timeline: Timeline, ax: Axes) -> bool:
    rollouts = timeline.steps("rollouts")
    x, mean = series(rollouts, "reward_mean")
    xd, margin = series(timeline.steps("labels"), "reward_mean")
    if not len(mean) and not len(margin):
        return False
    band = rows(rollouts, "reward_mean", "reward_std")
    if len(band):
        ax.fill_between(band[:, 0], band[:, 1] - band[:, 2], band[:, 1] + band[:, 2], color="tab:green", alpha=0.2,
                        label="± std within the batch")
    line(ax, x, mean, "-", color="tab:green", linewidth=1, label="GRPO step: mean reward of the rollouts")
    ax.set_ylabel("proxy reward", color="tab:green")
    margin_ax = ax.twinx()
    line(margin_ax, xd, margin, "x", color="tab:brown", label="DPO step: reward margin (chosen - rejected)")
    margin_ax.set_ylabel("DPO reward margin", color="tab:brown")
    ax.set_title("Training reward per trainer step")
    legend(ax, margin_ax)
    return True


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    caption: str
    draw: Callable[..., bool]
    rows: int = 1


PLOTS = (
    Plot("gold_proxy.png", "Gold score and proxy reward",
         "The gold judge's mean score on held-out prompts (band: 95% interval) and the system's own reward model's "
         "mean score, with a dotted line at each new reward-model version.", plot_gold_proxy),
    Plot("gap.png", "Over-optimisation gap",
         "Gain over the SFT policy's answers in SFT standard deviations under the gold judge and under the proxy "
         "reward model; a gap above zero means the proxy credits the policy with more gain than the users' taste "
         "does.", plot_gap),
    Plot("kl_entropy.png", "KL and entropy",
         "KL to the reference per GRPO step and on the held-out evaluations, and the policy's entropy per GRPO "
         "step.", plot_kl_entropy, rows=2),
    Plot("length.png", "Answer length",
         "Mean answer length of the rollouts per GRPO step and of the held-out evaluation answers.", plot_length),
    Plot("throughput.png", "Throughput",
         "Generated tokens per second for the trainer's rollouts and for the users' requests, from Prometheus.",
         plot_throughput),
    Plot("versions.png", "Versions",
         "The version the trainer last published, the version the policy serves and the reward model's version "
         "in service.", plot_versions),
    Plot("feedback.png", "Feedback",
         "Cumulative feedback accepted by kind, labels made by the join and simulated-user interactions.",
         plot_feedback),
    Plot("reward.png", "Training reward",
         "Mean proxy reward of each GRPO batch (band: ± its standard deviation) and each DPO step's reward margin "
         "between chosen and rejected answers.", plot_reward),
)


def render_plot(plot: Plot, timeline: Timeline, path: Path) -> bool:
    """Draws `plot` into `path`; False (and no file) when there is nothing to draw."""
    fig, axes = new_figure(plot.rows, height=3.0 + 2.5 * plot.rows)
    if not plot.draw(timeline, *axes):
        path.unlink(missing_ok=True)
        return False
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return True


# ---------------------------------------------------------------------------------------------
# The Markdown page


def fmt(value: object, digits: int = 3) -> str:
    x = num(value)
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def fmt_value(value: object) -> str:
    """A free-form value for a table cell."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (bool, int, str)):
        return str(value)
    return json.dumps(value)


def interval(obj: object, digits: int = 3) -> str:
    """"mean [low, high]" of an object with those keys."""
    return f"{fmt(get(obj, 'mean'), digits)} [{fmt(get(obj, 'low'), digits)}, {fmt(get(obj, 'high'), digits)}]"


MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~&])")
LINE_START_SPECIAL = re.compile(r"^(\s*)([-+=]|\d+[.)])(?=\s|$)", re.MULTILINE)


def escape(text: object) -> str:
    """Text that Markdown shows as it is: punctuation that would format, link or break a table is escaped."""
    text = MARKDOWN_SPECIAL.sub(r"\\\1", str(text))
    return LINE_START_SPECIAL.sub(lambda m: m.group(1) + "\\" + m.group(2), text)


def cell(value: object) -> str:
    """A table cell: escaped, on one line."""
    return " ".join(escape(fmt_value(value)).split())


def quote(text: object) -> str:
    """A blockquote of escaped text that keeps its line breaks (a backslash at a line's end breaks it)."""
    lines = [escape(line.strip()) for line in str(text if text is not None else "n/a").splitlines()] or [""]
    quoted = []
    for line, following in zip(lines, lines[1:] + [""]):
        if not line:
            quoted.append(">")
        else:
            quoted.append(f"> {line}\\" if following else f"> {line}")
    return "\n".join(quoted)


def headline(summary: dict, timeline: Timeline) -> str:
    """A paragraph of what happened, from the numbers."""
    sentences = []
    model, minutes = escape(summary.get("model") or "The policy"), num(summary.get("minutes"))
    span = f" over {minutes:g} minutes of online training" if math.isfinite(minutes) else ""
    before, after = summary.get("gold_before"), summary.get("gold_after")
    b, a = num(get(before, "mean")), num(get(after, "mean"))
    scores = f"from {interval(before)} before to {interval(after)} after (95% intervals)"
    if not (math.isfinite(b) and math.isfinite(a)):
        sentences.append(f"The gold scores of {model} before and after{span} are missing ({scores}).")
    elif a <= b:
        sentences.append(f"The gold score did not rise: {model}{span} went {scores}.")
    elif num(get(after, "low")) > num(get(before, "high")):
        sentences.append(f"The gold score of {model} rose{span} {scores}, and the intervals do not overlap.")
    else:
        sentences.append(f"The gold score of {model} rose{span} {scores}, but the intervals overlap, so the rise "
                         f"is not clearly above the noise of the held-out evaluation.")

    win = summary.get("win_rate")
    rate, low, high = num(get(win, "rate")), num(get(win, "low")), num(get(win, "high"))
    if math.isfinite(rate):
        if not (math.isfinite(low) and math.isfinite(high)):
            verdict = "its interval is missing"
        elif low > 0.5:
            verdict = "better than an even split"
        elif high < 0.5:
            verdict = "worse than an even split"
        else:
            verdict = "not distinguishable from an even split"
        sentences.append(f"Judged by the gold judge on {fmt_value(get(win, 'n'))} answers to held-out prompts "
                         f"(paired by prompt and seed), the final policy's win rate against the SFT policy is "
                         f"{fmt(rate, 2)} (95% interval {fmt(low, 2)} "
                         f"to {fmt(high, 2)}; {fmt_value(get(win, 'wins'))} wins, {fmt_value(get(win, 'ties'))} "
                         f"ties): {verdict}.")
    else:
        sentences.append("The win rate against the SFT policy is missing.")

    kl = num(summary.get("kl_final"))
    sentences.append(f"The final KL to the reference is {fmt(kl)} nats per token." if math.isfinite(kl)
                     else "The final KL to the reference is missing.")

    _, gaps = series(timeline.of("eval"), "gap_sd")
    final_gap = num(summary.get("gap_sd"))
    gains = (f"the proxy reward model credits the final policy with {fmt(summary.get('proxy_gain_sd'), 2)} SD of "
             f"gain over the SFT policy and the gold judge with {fmt(summary.get('gold_gain_sd'), 2)} SD")
    if len(gaps) >= 2:
        change = gaps[-1] - gaps[0]
        moved = "stayed within 0.1 SD" if abs(change) < 0.1 else ("grew" if change > 0 else "shrank")
        sentences.append(f"The over-optimisation gap (proxy gain minus gold gain) {moved} over the run, from "
                         f"{fmt(gaps[0], 2)} to {fmt(gaps[-1], 2)} SD: {gains}.")
    elif math.isfinite(final_gap):
        sentences.append(f"The final over-optimisation gap (proxy gain minus gold gain) is {fmt(final_gap, 2)} SD: "
                         f"{gains}.")
    else:
        sentences.append("The over-optimisation gap is missing.")
    if final_gap > 0.5:
        sentences.append("The proxy credits the policy with more than half an SD of gain beyond what the users' "
                         "taste does: a sign of over-optimisation.")
    return " ".join(sentences)


def missing_data(timeline: Timeline, summary: dict, absent_plots: list[Plot]) -> list[str]:
    """One line per thing that is missing from the run folder."""
    lines = []
    if not summary:
        lines.append("`summary.json` is missing or unreadable: the final numbers below are n/a.")
    if timeline.skipped:
        lines.append(f"{timeline.skipped} lines of `timeline.jsonl` were skipped (not a JSON record with a known "
                     f"kind and a time).")
    for kind in KINDS:
        records = timeline.of(kind)
        if not records:
            why = ": Prometheus was not available, so there is no throughput plot" if kind == "throughput" else ""
            lines.append(f"No `{kind}` records{why}.")
            continue
        for path in FIELDS[kind]:
            missing = sum(not math.isfinite(num(get(r, *path))) for r in records)
            if missing:
                lines.append(f"`{kind}` records: `{'.'.join(path)}` is missing or not a number in {missing} of "
                             f"{len(records)}.")
    for plot in absent_plots:
        if plot.file != "throughput.png" or timeline.of("throughput"):
            lines.append(f"No `{plot.file}`: none of its series has a number.")
    return lines


def stage_table(stages: object) -> list[str]:
    if not isinstance(stages, dict) or not stages:
        return ["No stage times were recorded."]
    rows = ["| Stage | Seconds | Numbers |", "|---|---:|---|"]
    for name, numbers in stages.items():
        numbers = numbers if isinstance(numbers, dict) else {}
        other = ", ".join(f"{key} {fmt_value(value)}" for key, value in numbers.items() if key != "seconds")
        rows.append(f"| {cell(name)} | {fmt(numbers.get('seconds'), 1)} | {cell(other)} |")
    return rows


def settings_table(settings: object) -> list[str]:
    if not isinstance(settings, dict) or not settings:
        return ["No settings were recorded."]
    return ["| Setting | Value |", "|---|---|"] + [f"| {cell(k)} | {cell(v)} |" for k, v in settings.items()]


def counts(obj: object) -> str:
    return ", ".join(f"{k} {fmt_value(v)}" for k, v in obj.items()) if isinstance(obj, dict) and obj else "n/a"


def report_markdown(summary: dict, timeline: Timeline, drawn: list[Plot], absent: list[Plot]) -> str:
    prometheus = summary.get("prometheus") or ""
    lines = [f"# Online RLHF demo: {escape(summary.get('model') or 'unknown model')}", "",
             headline(summary, timeline), "",
             "## Run", "",
             f"- Model: {escape(fmt_value(summary.get('model')))}",
             f"- Online stage: {fmt(summary.get('minutes'), 1)} minutes, started "
             f"{escape(fmt_value(summary.get('started')))}",
             f"- Machine: {escape(fmt_value(summary.get('machine')))}",
             f"- Trainer steps: {escape(counts(summary.get('steps')))}",
             f"- Feedback accepted: {escape(counts(summary.get('feedback')))}; labels: "
             f"{fmt_value(summary.get('labels'))}",
             f"- Final versions: {escape(counts(summary.get('versions')))}",
             f"- Prometheus: {escape(prometheus) if prometheus else 'not run'}",
             "", "## Stages", "", *stage_table(summary.get("stages")),
             "", "## Settings", "", *settings_table(summary.get("settings")),
             "", "## Plots", ""]
    for plot in drawn:
        lines += [f"### {plot.title}", "", f"![{plot.title}](plots/{plot.file})", "", plot.caption, ""]
    if not drawn:
        lines += ["No plots: the timeline has nothing to draw.", ""]

    lines += ["## Examples", ""]
    examples = summary.get("examples")
    examples = [e for e in examples if isinstance(e, dict)] if isinstance(examples, list) else []
    for i, example in enumerate(examples, 1):
        lines += [f"### Example {i}", "", "Prompt:", "", quote(example.get("prompt")), "",
                  f"Before (SFT policy), gold {fmt(example.get('gold_before'))}:", "", quote(example.get("before")), "",
                  f"After, gold {fmt(example.get('gold_after'))}:", "", quote(example.get("after")), ""]
    if not examples:
        lines += ["No examples were recorded.", ""]

    lines += ["## Missing data", ""]
    lines += [f"- {line}" for line in missing_data(timeline, summary, absent)] or ["Nothing was missing."]
    notes = summary.get("notes")
    if isinstance(notes, list) and notes:
        lines += ["", "## Notes", ""] + ["- " + str(note).strip().replace("\n", "\n  ") for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: Path) -> Path:
    """Reads run_dir/timeline.jsonl and run_dir/summary.json; writes run_dir/plots/*.png and run_dir/report.md."""
    run_dir = Path(run_dir)
    timeline = read_timeline(run_dir / "timeline.jsonl")
    summary = read_summary(run_dir / "summary.json")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    drawn, absent = [], []
    for plot in PLOTS:
        (drawn if render_plot(plot, timeline, plots_dir / plot.file) else absent).append(plot)
    report = run_dir / "report.md"
    report.write_text(report_markdown(summary, timeline, drawn, absent))
    return report


# ---------------------------------------------------------------------------------------------
# Checking a rendered report


def check_png(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path} is missing"]
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return [f"{path} is not a PNG"]
    if len(data) < MIN_PNG_BYTES:
        return [f"{path} has only {len(data)} bytes (fewer than {MIN_PNG_BYTES})"]
    try:
        pixels = matplotlib.image.imread(path)
    except Exception as e:  # a truncated or corrupt file: the reader's error says what is wrong
        return [f"{path} cannot be read: {e}"]
    if pixels.size == 0 or np.all(pixels == pixels[0, 0]):
        return [f"{path} is of one colour"]
    return []


def check_report(run_dir: Path) -> list[str]:
    """What is wrong with run_dir's report (empty: nothing): its plots, its final numbers and its versions."""
    run_dir = Path(run_dir)
    problems = []
    report = run_dir / "report.md"
    if not report.is_file():
        problems.append(f"{report} is missing")
    else:
        links = IMAGE_LINK.findall(report.read_text())
        if not links:
            problems.append(f"{report} embeds no plot")
        for link in links:
            if Path(link).is_absolute() or "://" in link:
                problems.append(f"{report} links {link}, which is not relative to the report")
            else:
                problems += check_png(run_dir / link)
    summary_path = run_dir / "summary.json"
    summary = read_summary(summary_path)
    if not summary:
        problems.append(f"{summary_path} is missing or not a JSON object")
    for path in SUMMARY_NUMBERS:
        value = get(summary, *path)
        if not math.isfinite(num(value)):
            problems.append(f"summary.json: {'.'.join(path)} is {value!r}, not a finite number")
    for key in ("policy", "reward"):
        value = get(summary, "versions", key)
        if not num(value) >= 1:
            problems.append(f"summary.json: versions.{key} is {value!r}: the {key} model never advanced past "
                            f"version 0")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="the demo's run folder (timeline.jsonl, summary.json)")
    ap.add_argument("--check", action="store_true",
                    help="check the report already in RUN_DIR instead of rendering it; exit 1 on any problem")
    args = ap.parse_args(argv)
    if args.check:
        problems = check_report(args.run_dir)
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
