"""python -m rlhf_feedback [--flags]: run the feedback service (gRPC and REST in one process,
and the join of feedback to generations as a background loop)."""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf_common import service
from rlhf_common.auth import ApiKeys, GrpcAuthInterceptor
from rlhf_common.bus import ensure_topics
from rlhf_common.config import BusConfig
from rlhf_http.server import start_rest

from .config import FeedbackConfig
from .core import AcceptedStore, FeedbackCore
from .metrics import FeedbackMetrics
from .rest import make_app
from .servicer import SERVICE, FeedbackServicer, add_to_server
from .workers import FeedbackSender, JoinLoop


def builder(cfg: FeedbackConfig, bus: BusConfig, keys: ApiKeys):
    async def build(rt: service.Runtime) -> None:
        m: FeedbackMetrics = rt.metrics
        await rt.blocking(ensure_topics, bus)
        sender = await rt.blocking(FeedbackSender, bus, cfg.broker_timeout_s)
        rt.on_stop(lambda: rt.blocking(sender.close))
        store = await rt.blocking(AcceptedStore, Path(cfg.state_dir) / "accepted.sqlite")
        join = JoinLoop(cfg, bus, m) if cfg.join_enabled else None
        core = FeedbackCore(store, sender, m, max_items=cfg.max_items, max_text_chars=cfg.max_text_chars,
                            join_stats=(lambda: join.latest_stats) if join else None)
        rt.on_stop(lambda: rt.blocking(core.close))
        add_to_server(FeedbackServicer(core), rt.grpc)
        if cfg.http_port:
            await start_rest(rt, make_app(core, rt.registry, m, keys, cfg.max_body_bytes), cfg.server.host,
                             cfg.http_port)
        if join is not None:
            rt.start_loop(join)

    return build


def main(argv: list[str] | None = None) -> None:
    cfg = FeedbackConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    keys = ApiKeys(cfg.api_key_list)
    spec = service.ServiceSpec("feedback", cfg.server, [SERVICE], FeedbackMetrics,
                               interceptors=[GrpcAuthInterceptor(keys, SERVICE)], config=[cfg, bus])
    service.run(spec, builder(cfg, bus, keys))


if __name__ == "__main__":
    main()
