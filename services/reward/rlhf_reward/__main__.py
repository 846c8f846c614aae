"""python -m rlhf_reward [--flags]: run the reward service."""

from __future__ import annotations

import asyncio
import logging
import sys

import torch
from prometheus_client import CollectorRegistry

from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf_common import metrics as metrics_mod
from rlhf_common.config import RewardConfig
from rlhf_common.grpc_server import Server, setup_logging

from .core import RewardModel
from .servicer import RewardServicer


async def amain(cfg: RewardConfig) -> None:
    torch.set_num_threads(cfg.torch_threads)
    registry = CollectorRegistry()
    m = metrics_mod.RewardMetrics(registry)
    metrics_mod.serve(cfg.metrics_port, registry)
    model = RewardModel(cfg.model, cfg.max_length, cfg.max_batch_items)
    server = Server(cfg.host, cfg.port, [reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name], m)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(model, m), server.server)
    await server.run()


def main(argv: list[str] | None = None) -> None:
    setup_logging("reward")
    cfg = RewardConfig.load(sys.argv[1:] if argv is None else argv)
    logging.getLogger(__name__).info("config: %s", cfg)
    asyncio.run(amain(cfg))


if __name__ == "__main__":
    main()
