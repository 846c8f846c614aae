"""`make demo`: the local stack doing online RLHF on a tiny model for about a minute.

Starts the broker and the services, streams prompts into rlhf.prompts, and prints
one line per trainer step: the published version, the version the policy serves, the
batch's mean reward and KL to the reference, and the policy lag of the consumed rollouts.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import grpc

from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from .models import tiny_prompts
from .stack import Stack, StackSpec, seed_prompts


def plot_curves(steps: list, path: Path) -> Path:
    """Reward, KL and policy lag per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s.step for s in steps]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(x, [s.reward_mean for s in steps], color="tab:green")
    axes[0].fill_between(x, [s.reward_mean - s.reward_std for s in steps],
                         [s.reward_mean + s.reward_std for s in steps], color="tab:green", alpha=0.2)
    axes[0].set_ylabel("reward (mean ± std)")
    axes[1].plot(x, [s.kl for s in steps], color="tab:red")
    axes[1].set_ylabel("KL to reference (nats)")
    axes[2].step(x, [s.version_lag_mean for s in steps], color="tab:blue", where="mid")
    axes[2].set_ylabel("rollout lag (versions)")
    axes[2].set_xlabel("trainer step")
    fig.suptitle("online GRPO on the local stack")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="How long to train once the stack is up")
    ap.add_argument("--run-dir", type=Path, default=Path(".run/demo"), help="Logs, models and checkpoints")
    ap.add_argument("--group-size", type=int, default=4, help="Samples per prompt (GRPO group)")
    ap.add_argument("--groups-per-step", type=int, default=2, help="Prompt groups per trainer step")
    args = ap.parse_args(argv)
    # The dev broker keeps its topics in memory, so every run starts on empty topics: the
    # training and feedback state of an earlier run (offsets into topics that are gone) go too.
    for stale in ("weights", "feedback"):
        shutil.rmtree(args.run_dir / stale, ignore_errors=True)

    spec = StackSpec(run_dir=args.run_dir, rollout_n=args.group_size, groups_per_step=args.groups_per_step,
                     max_tokens=24, max_groups_ahead=2 * args.groups_per_step, trainer_lr=1e-4, supervise=True)
    print(f"starting Kafka broker and the policy, reward, reference and trainer services "
          f"(logs in {args.run_dir}/*.log; vLLM takes about a minute to start on CPU)...", flush=True)
    t0 = time.monotonic()
    st = Stack(spec).start(verbose=True)
    try:
        print(f"stack up in {time.monotonic() - t0:.0f}s (kafka {st.bus.bootstrap})", flush=True)
        trainer = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(st.addrs["trainer"]))
        policy = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
        seeded = len(seed_prompts(st.bus, tiny_prompts(64, seed=0), source="demo"))
        print(f"{'step':>4} {'version':>7} {'served':>6} {'reward':>9} {'±std':>7} {'KL(nats)':>9} "
              f"{'lag':>4} {'len':>5} {'step s':>6}", flush=True)
        shown = 0
        end = time.monotonic() + args.seconds
        last = None
        history = []
        while time.monotonic() < end:
            status = trainer.Status(trainer_pb2.StatusRequest())
            served = policy.GetVersion(policy_pb2.GetVersionRequest()).version
            for s in status.recent:
                if s.step > shown:
                    kl = f"{s.kl:9.5f}" if math.isfinite(s.kl) else f"{'inf':>9}"
                    print(f"{s.step:>4} {s.version:>7} {served:>6} {s.reward_mean:>9.4f} {s.reward_std:>7.4f} "
                          f"{kl} {s.version_lag_mean:>4.1f} {s.response_length_mean:>5.1f} "
                          f"{s.step_seconds:>6.2f}", flush=True)
                    shown = s.step
                    last = s
                    history.append(s)
            # keep the prompt stream ahead of the trainer
            if seeded - status.groups_consumed < 32:
                seeded += len(seed_prompts(st.bus, tiny_prompts(32, seed=seeded), source="demo"))
            time.sleep(0.5)
        status = trainer.Status(trainer_pb2.StatusRequest())
        print(f"done: {status.step} steps, {status.rollouts_consumed} rollouts, weights v{status.version} "
              f"in {args.run_dir / 'weights'}", flush=True)
        if status.step == 0 or last is None:
            sys.exit(f"the trainer made no step; see {args.run_dir}/*.log")
        print(f"curves: {plot_curves(history, args.run_dir / 'curves.png')}", flush=True)
    finally:
        st.stop()


if __name__ == "__main__":
    main()
