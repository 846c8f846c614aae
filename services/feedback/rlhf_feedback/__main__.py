"""python -m rlhf_feedback [--flags]: run the feedback service (gRPC and REST in one process,
and the join of feedback to generations as a background loop)."""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf_common import service
from rlhf_common.auth import ApiKeys, GrpcAuthInterceptor
from rlhf_common.bus import BrokerWatch, ensure_topics
from rlhf_common.config import BusConfig
from rlhf_http.server import start_rest

from .config import FeedbackConfig
from .core import AcceptedStore, FeedbackCore
from .judge import AiLabeller, FolderJudge, PolicyJudge, submitter
from .metrics import FeedbackMetrics
from .pairs import RatingQueue
from .rate import RateLoop, RatingApi
from .rest import make_app
from .scoring import PolicyClient, RewardEnsemble
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
                            join_stats=(lambda: join.latest_stats) if join else None,
                            join_sources=(lambda: join.latest_sources) if join else None)
        rt.on_stop(lambda: rt.blocking(core.close))
        add_to_server(FeedbackServicer(core), rt.grpc)
        rating = None
        loops = []
        if cfg.rate_enabled and join is not None and cfg.http_port:
            rating, loops = await build_rating(rt, cfg, core, join)
        if cfg.http_port:
            await start_rest(rt, make_app(core, rt.registry, m, keys, cfg.max_body_bytes, rating), cfg.server.host,
                             cfg.http_port)
        if join is not None:
            rt.start_loop(join)
        for loop in loops:
            rt.start_loop(loop)
        # Accepting feedback means having it on the broker (or answering 503): not ready
        # while the broker cannot be reached.
        broker = rt.start_loop(BrokerWatch(bus, "feedback-broker-watch"))
        rt.ready_when(broker.unreachable)

    return build


async def build_rating(rt: service.Runtime, cfg: FeedbackConfig, core: FeedbackCore, join: JoinLoop):
    """The rating queue (fed by the join's served answers), its ranking loop, the page's API
    and, when enabled, the AI labeller."""
    queue = await rt.blocking(RatingQueue, Path(cfg.state_dir) / "rate.sqlite", cfg.rate_pairs,
                              cfg.rate_repeat_share, cfg.rate_max_pairs, cfg.rate_seed)
    rt.on_stop(lambda: rt.blocking(queue.close))
    join.on_generations.append(queue.observe)
    ensemble = RewardEnsemble(cfg.reward_addr_list, cfg.rate_reward_api_key) if cfg.reward_addr_list else None
    policy = PolicyClient(cfg.policy_addr, cfg.policy_api_key) if cfg.policy_addr else None
    for client in (ensemble, policy):
        if client is not None:
            rt.on_stop(client.close)
    prompts = None
    if cfg.rate_prompts_file:
        text = await rt.blocking(Path(cfg.rate_prompts_file).read_text, encoding="utf-8")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    loops = [RateLoop(queue, cfg.rate_strategy, ensemble, rt.metrics, cfg.rate_rank_every_s, cfg.rate_rank_max,
                      cfg.rate_seed, policy, prompts, cfg.rate_min_open, 1 if cfg.rate_pairs == "versions" else 2,
                      cfg.rate_temperature, cfg.rate_max_tokens)]
    if cfg.judge_enabled:
        judge = (PolicyJudge(policy) if cfg.judge_backend == "policy"
                 else await rt.blocking(FolderJudge, cfg.judge_model))
        loops.append(AiLabeller(queue, judge, submitter(core, rt.loop, cfg.broker_timeout_s * 2), rt.metrics,
                                cfg.judge_every_s, cfg.judge_batch, cfg.judge_max_chars, cfg.rate_seed))
    api = RatingApi(queue, core, rt.metrics)
    rt.on_stop(lambda: rt.blocking(api.close))
    return api, loops


def main(argv: list[str] | None = None) -> None:
    cfg = FeedbackConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    keys = ApiKeys(cfg.api_key_list)
    spec = service.ServiceSpec("feedback", cfg.server, [SERVICE], FeedbackMetrics,
                               interceptors=[GrpcAuthInterceptor(keys, SERVICE)], config=[cfg, bus],
                               max_request_bytes=cfg.max_body_bytes)
    service.run(spec, builder(cfg, bus, keys))


if __name__ == "__main__":
    service.cli(main, "rlhf_feedback")
