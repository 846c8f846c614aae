"""python -m rlhf_reward_learner [--flags]: run the reward learner (online reward-model training)."""

from __future__ import annotations

import sys

import torch

from rlhf_common import service
from rlhf_common.bus import ensure_topics
from rlhf_common.config import BusConfig

from .config import RewardLearnerConfig
from .metrics import RewardLearnerMetrics
from .servicer import SERVICE, RewardLearnerServicer, add_to_server
from .workers import LearnLoop


def builder(cfg: RewardLearnerConfig, bus: BusConfig):
    async def build(rt: service.Runtime) -> None:
        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        await rt.blocking(ensure_topics, bus)
        loop = LearnLoop(cfg, bus, rt.metrics)
        add_to_server(RewardLearnerServicer(loop), rt.grpc)
        rt.start_loop(loop)
        # Serving only once the live model is loaded and the loop reads labels.
        while not loop.ready.wait(0) and loop.is_alive():
            await rt.blocking(loop.ready.wait, 1.0)

    return build


def main(argv: list[str] | None = None) -> None:
    cfg = RewardLearnerConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    service.run(service.ServiceSpec("reward-learner", cfg.server, [SERVICE], RewardLearnerMetrics,
                                    config=[cfg, bus]), builder(cfg, bus))


if __name__ == "__main__":
    service.cli(main, "rlhf_reward_learner")
