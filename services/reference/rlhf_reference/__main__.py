"""python -m rlhf_reference [--flags]: run the reference service."""

from __future__ import annotations

import sys

import torch

from rlhf.reference.v1 import reference_pb2, reference_pb2_grpc
from rlhf_common import service
from rlhf_common.bus import ensure_topics
from rlhf_common.config import BusConfig

from .config import ReferenceConfig
from .core import ReferenceModel
from .metrics import ReferenceMetrics
from .servicer import ReferenceServicer
from .workers import ReferenceRefresher

SERVICE = reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name


def builder(cfg: ReferenceConfig, bus: BusConfig):
    async def build(rt: service.Runtime) -> None:
        torch.set_num_threads(cfg.torch_threads)
        model = await rt.blocking(ReferenceModel, cfg.model, cfg.max_batch_items)
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server(ReferenceServicer(model, rt.metrics), rt.grpc)
        if cfg.subscribe:
            await rt.blocking(ensure_topics, bus)
            rt.start_loop(ReferenceRefresher(cfg, model, rt.metrics).follower(bus))

    return build


def main(argv: list[str] | None = None) -> None:
    cfg = ReferenceConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    service.run(service.ServiceSpec("reference", cfg.server, [SERVICE], ReferenceMetrics, config=[cfg, bus]),
                builder(cfg, bus))


if __name__ == "__main__":
    service.cli(main, "rlhf_reference")
