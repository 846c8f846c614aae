"""python -m rlhf_trainer [--flags]: run the trainer service."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

import torch
from prometheus_client import CollectorRegistry

from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from rlhf_common import metrics as metrics_mod
from rlhf_common.bus import ensure_topics
from rlhf_common.config import BusConfig, TrainerConfig
from rlhf_common.grpc_server import Server, setup_logging

from .core import Trainer
from .servicer import TrainerServicer

log = logging.getLogger("rlhf_trainer")


async def amain(cfg: TrainerConfig, bus: BusConfig) -> None:
    torch.set_num_threads(cfg.torch_threads)
    registry = CollectorRegistry()
    m = metrics_mod.TrainerMetrics(registry)
    metrics_mod.serve(cfg.metrics_port, registry)
    server = Server(cfg.host, cfg.port, [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name], m)
    loop = asyncio.get_running_loop()
    trainer = await loop.run_in_executor(None, Trainer, cfg, bus, m)
    await loop.run_in_executor(None, ensure_topics, bus)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(trainer), server.server)
    thread = threading.Thread(target=trainer.run, name="trainer-loop", daemon=True)
    thread.start()

    async def on_stop():
        trainer.stopping.set()
        await loop.run_in_executor(None, thread.join, 30)

    await server.run(on_stop=on_stop, watch=lambda: trainer.error)


def main(argv: list[str] | None = None) -> None:
    setup_logging("trainer")
    cfg = TrainerConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    log.info("config: %s; bus: %s", cfg, bus)
    asyncio.run(amain(cfg, bus))


if __name__ == "__main__":
    main()
