"""python -m rlhf_policy [--flags]: run the policy service."""

from __future__ import annotations

import sys

from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf_common import service
from rlhf_common.bus import BrokerWatch, ensure_topics
from rlhf_common.config import BusConfig

from .config import PolicyConfig
from .core import PolicyEngine
from .metrics import PolicyMetrics
from .servicer import PolicyServicer
from .workers import GenerationRecorder, RolloutWorker, WeightApplier

SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def builder(cfg: PolicyConfig, bus: BusConfig):
    async def build(rt: service.Runtime) -> None:
        m: PolicyMetrics = rt.metrics
        engine = PolicyEngine(cfg)
        rt.on_stop(engine.shutdown)
        await rt.blocking(engine.start)
        await engine.prepare()
        m.version.set(engine.served.version)
        await rt.blocking(ensure_topics, bus)
        recorder = await rt.blocking(GenerationRecorder, bus) if cfg.record_generations else None
        if recorder is not None:
            rt.on_stop(lambda: rt.blocking(recorder.close))
        m.in_flight.set_function(lambda: engine.in_flight)
        m.waiting.set_function(lambda: engine.waiting)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(
            PolicyServicer(engine, m, recorder.record if recorder else None), rt.grpc)
        weights = WeightApplier(cfg, bus, engine, m, rt.loop)
        rt.start_loop(weights.follower)
        # Ready once the newest weights on rlhf.weights are served (a restarted replica never
        # answers with old ones), and while the broker that records its answers is reachable.
        rt.ready_when(lambda: None if weights.follower.caught_up.is_set() else "catching up with rlhf.weights")
        if recorder is not None:
            broker = rt.start_loop(BrokerWatch(bus, "policy-broker-watch"))
            rt.ready_when(broker.unreachable)
        if cfg.rollout_enabled:
            rt.start_loop(RolloutWorker(cfg, bus, engine, m, rt.loop, weights))

    return build


def main(argv: list[str] | None = None) -> None:
    cfg = PolicyConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    service.run(service.ServiceSpec("policy", cfg.server, [SERVICE], PolicyMetrics, config=[cfg, bus]),
                builder(cfg, bus))


if __name__ == "__main__":
    service.cli(main, "rlhf_policy")
