"""python -m rlhf_reward [--flags]: run the reward service (gRPC and REST in one process)."""

from __future__ import annotations

import logging
import os
import sys

import torch

from rlhf.reward.v1 import reward_pb2_grpc
from rlhf_common import service
from rlhf_common.auth import ApiKeys, GrpcAuthInterceptor
from rlhf_common.config import BusConfig
from rlhf_http.server import start_rest

from .config import RewardConfig
from .core import RewardCore, RewardModel
from .metrics import RewardMetrics
from .rest import make_app
from .servicer import SERVICE, RewardServicer
from .workers import RewardUpdater

log = logging.getLogger("rlhf_reward")


def builder(cfg: RewardConfig, bus: BusConfig, keys: ApiKeys):
    async def build(rt: service.Runtime) -> None:
        torch.set_num_threads(cfg.torch_threads)
        m: RewardMetrics = rt.metrics
        model = await rt.blocking(RewardModel, cfg.model, cfg.max_length, packed=cfg.packed)
        shadow = (await rt.blocking(RewardModel, cfg.shadow_model, cfg.max_length, packed=cfg.packed)
                  if cfg.shadow_model else None)
        core = RewardCore(model, m, max_batch_items=cfg.max_batch_items, max_batch_size=cfg.max_batch_size,
                          max_wait_s=cfg.max_wait_ms / 1000, max_queue_items=cfg.max_queue_items, shadow=shadow,
                          max_item_chars=cfg.max_item_chars, max_request_tokens=cfg.max_request_tokens,
                          model_workers=cfg.model_workers, torch_threads=cfg.torch_threads)
        await core.start()
        rt.on_stop(core.stop)
        log.info("model %s (version %s, max_length %d, %s forward passes); shadow %s; API keys %s",
                 model.model_dir, model.version, model.max_length, "packed" if model.packed else "padded",
                 shadow.version if shadow else "none",
                 f"required ({len(cfg.api_key_list)})" if keys.enabled else "not required")
        reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(core), rt.grpc)
        if cfg.http_port:
            await start_rest(rt, make_app(core, rt.registry, m, keys, cfg.max_body_bytes), cfg.server.host,
                             cfg.http_port)
        if cfg.subscribe_weights:
            rt.start_loop(RewardUpdater(cfg, core, m).follower(bus))

    return build


def main(argv: list[str] | None = None) -> None:
    # One tokenizer thread batches the requests that arrive together; the tokenizers
    # library's own pool would spread each call over the cores the model threads use, and
    # cost more CPU per item than it saves (unless the operator sets it otherwise).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = RewardConfig.load(sys.argv[1:] if argv is None else argv)
    bus = BusConfig.load()
    keys = ApiKeys(cfg.api_key_list)
    spec = service.ServiceSpec("reward", cfg.server, [SERVICE], RewardMetrics,
                               interceptors=[GrpcAuthInterceptor(keys, SERVICE)], config=[cfg, bus],
                               max_request_bytes=cfg.max_body_bytes)
    service.run(spec, builder(cfg, bus, keys))


if __name__ == "__main__":
    service.cli(main, "rlhf_reward")
