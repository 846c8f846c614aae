"""python -m rlhf_reward [--flags]: run the reward service (gRPC and REST in one process)."""

from __future__ import annotations

import asyncio
import logging
import sys

import torch
from prometheus_client import CollectorRegistry

from rlhf_common import metrics as metrics_mod
from rlhf_common.config import BusConfig, RewardConfig
from rlhf_common.grpc_server import Server, setup_logging

from .auth import ApiKeys, GrpcAuthInterceptor
from .core import RewardCore, RewardModel
from .rest import make_app, rest_server
from .servicer import SERVICE, RewardServicer, add_to_server
from .workers import WeightSubscriber

log = logging.getLogger("rlhf_reward")


async def amain(cfg: RewardConfig, bus: BusConfig) -> None:
    torch.set_num_threads(cfg.torch_threads)
    registry = CollectorRegistry()
    m = metrics_mod.RewardMetrics(registry)
    metrics_mod.serve(cfg.metrics_port, registry)
    keys = ApiKeys(cfg.api_key_list)
    # Bind the gRPC port before loading models, so nothing else can take it meanwhile.
    server = Server(cfg.host, cfg.port, [SERVICE], m, interceptors=[GrpcAuthInterceptor(keys, SERVICE)])
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(None, RewardModel, cfg.model, cfg.max_length)
    shadow = None
    if cfg.shadow_model:
        shadow = await loop.run_in_executor(None, RewardModel, cfg.shadow_model, cfg.max_length)
    core = RewardCore(model, m, max_batch_items=cfg.max_batch_items, max_batch_size=cfg.max_batch_size,
                      max_wait_s=cfg.max_wait_ms / 1000, max_queue_items=cfg.max_queue_items, shadow=shadow)
    await core.start()
    log.info("model %s (version %s, max_length %d); shadow %s; API keys %s", model.model_dir, model.version,
             model.max_length, shadow.version if shadow else "none",
             f"required ({len(cfg.api_key_list)})" if keys.enabled else "not required")

    add_to_server(RewardServicer(core), server.server)

    rest = None
    rest_task = None
    if cfg.http_port:
        rest = rest_server(make_app(core, registry, m, keys, cfg.max_body_bytes), cfg.host, cfg.http_port)
        rest_task = asyncio.create_task(rest.serve(), name="rest")
        while not rest.started:
            if rest_task.done():  # e.g. the port is taken
                rest_task.result()
                raise SystemExit(f"REST server on {cfg.host}:{cfg.http_port} did not start")
            await asyncio.sleep(0.05)
        log.info("REST listening on http://%s:%d (OpenAPI page at /docs)", cfg.host, cfg.http_port)

    threads = [WeightSubscriber(cfg, bus, core, m)] if cfg.subscribe_weights else []
    for t in threads:
        t.start()

    async def on_stop():
        for t in threads:
            t.stop()
        if rest is not None:
            rest.should_exit = True
            await rest_task
        for t in threads:
            await loop.run_in_executor(None, t.join, 10)

    try:
        await server.run(on_stop=on_stop,
                         watch=lambda: next((t.error for t in threads if t.error is not None), None))
    finally:
        await core.stop()


def main(argv: list[str] | None = None) -> None:
    setup_logging("reward")
    cfg = RewardConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    log.info("config: %s; bus: %s", cfg, bus)
    asyncio.run(amain(cfg, bus))


if __name__ == "__main__":
    main()
