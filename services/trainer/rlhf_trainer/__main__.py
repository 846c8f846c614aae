"""python -m rlhf_trainer [--flags]: run the trainer service."""

from __future__ import annotations

import functools
import sys

import torch

from rlhf.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from rlhf_common import service
from rlhf_common.bus import ensure_topics
from rlhf_common.config import BusConfig

from .config import TrainerConfig
from .core import Trainer, TrainingLoop
from .metrics import TrainerMetrics
from .servicer import TrainerServicer

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def builder(cfg: TrainerConfig, bus: BusConfig):
    async def build(rt: service.Runtime) -> None:
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        trainer = await rt.blocking(Trainer, cfg, bus, rt.metrics)
        await rt.blocking(ensure_topics, bus)
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(trainer), rt.grpc)
        rt.start_loop(TrainingLoop(trainer))

    return build


def main(argv: list[str] | None = None) -> None:
    cfg = TrainerConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    metrics = functools.partial(TrainerMetrics, kl_estimator=cfg.kl_estimator)
    service.run(service.ServiceSpec("trainer", cfg.server, [SERVICE], metrics, config=[cfg, bus]),
                builder(cfg, bus))


if __name__ == "__main__":
    service.cli(main, "rlhf_trainer")
