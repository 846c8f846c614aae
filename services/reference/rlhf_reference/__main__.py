"""python -m rlhf_reference [--flags]: run the reference service."""

from __future__ import annotations

import asyncio
import logging
import sys

import torch
from prometheus_client import CollectorRegistry

from rlhf.reference.v1 import reference_pb2, reference_pb2_grpc
from rlhf_common import metrics as metrics_mod
from rlhf_common.bus import ensure_topics
from rlhf_common.config import BusConfig, ReferenceConfig
from rlhf_common.grpc_server import Server, setup_logging
from rlhf_common.loops import first_error

from .core import ReferenceModel
from .servicer import ReferenceServicer
from .workers import RefreshSubscriber


async def amain(cfg: ReferenceConfig, bus: BusConfig) -> None:
    torch.set_num_threads(cfg.torch_threads)
    registry = CollectorRegistry()
    m = metrics_mod.ReferenceMetrics(registry)
    metrics_mod.serve(cfg.metrics_port, registry)
    server = Server(cfg.host, cfg.port, [reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name], m)
    model = ReferenceModel(cfg.model, cfg.max_batch_items)
    reference_pb2_grpc.add_ReferenceServiceServicer_to_server(ReferenceServicer(model, m), server.server)
    loops = []
    if cfg.subscribe:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ensure_topics, bus)
        loops.append(RefreshSubscriber(cfg, bus, model, m))
    for t in loops:
        t.start()

    async def on_stop():
        for t in loops:
            t.stop()
            await asyncio.get_running_loop().run_in_executor(None, t.join, 10)

    await server.run(on_stop=on_stop, watch=lambda: first_error(loops))


def main(argv: list[str] | None = None) -> None:
    setup_logging("reference")
    cfg = ReferenceConfig.load(sys.argv[1:] if argv is None else argv)
    logging.getLogger(__name__).info("config: %s", cfg)
    asyncio.run(amain(cfg, BusConfig.load()))


if __name__ == "__main__":
    main()
