"""python -m rlhf_policy [--flags]: run the policy service."""

from __future__ import annotations

import asyncio
import logging
import sys

from prometheus_client import CollectorRegistry

from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf_common import metrics as metrics_mod
from rlhf_common.bus import ensure_topics
from rlhf_common.config import BusConfig, PolicyConfig
from rlhf_common.grpc_server import Server, setup_logging
from rlhf_common.loops import first_error

from .core import PolicyEngine
from .servicer import PolicyServicer
from .workers import GenerationRecorder, RolloutWorker, WeightSubscriber

log = logging.getLogger("rlhf_policy")


async def amain(cfg: PolicyConfig, bus: BusConfig) -> None:
    registry = CollectorRegistry()
    m = metrics_mod.PolicyMetrics(registry)
    metrics_mod.serve(cfg.metrics_port, registry)
    # Bind the gRPC port before the engine takes its minute to start, so nothing else can
    # take it meanwhile; health answers only once the server runs.
    server = Server(cfg.host, cfg.port, [policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name], m)
    engine = PolicyEngine(cfg)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, engine.start)
    await engine.prepare()
    m.version.set(engine.served.version)
    await loop.run_in_executor(None, ensure_topics, bus)

    recorder = GenerationRecorder(bus) if cfg.record_generations else None
    m.in_flight.set_function(lambda: engine.in_flight)
    m.waiting.set_function(lambda: engine.waiting)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(
        PolicyServicer(engine, m, recorder.record if recorder else None), server.server)

    subscriber = WeightSubscriber(cfg, bus, engine, m, loop)
    threads = [subscriber]
    if cfg.rollout_enabled:
        threads.append(RolloutWorker(cfg, bus, engine, m, loop, subscriber))
    for t in threads:
        t.start()

    async def on_stop():
        for t in threads:
            t.stop()
        for t in threads:
            await loop.run_in_executor(None, t.join, 10)

    try:
        await server.run(on_stop=on_stop,
                         watch=lambda: first_error(threads))
    finally:
        if recorder is not None:
            recorder.close()
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    setup_logging("policy")
    argv = sys.argv[1:] if argv is None else argv
    cfg = PolicyConfig.load(argv)
    bus = BusConfig.load()
    log.info("config: %s; bus: %s", cfg, bus)
    asyncio.run(amain(cfg, bus))


if __name__ == "__main__":
    main()
