"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

import asyncio

from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc

from rlhf_common.metrics import RewardMetrics

from .core import RewardModel, ScoreItem


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, model: RewardModel, metrics: RewardMetrics):
        self.model = model
        self.metrics = metrics

    async def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        items = [ScoreItem(i.prompt, i.response) for i in request.items]
        self.model.validate(items)
        results = await asyncio.get_running_loop().run_in_executor(None, self.model.score, items)
        self.metrics.items.inc(len(results))
        self.metrics.truncated.inc(sum(r.truncated for r in results))
        return reward_pb2.ScoreResponse(
            results=[reward_pb2.ScoreResult(score=r.score, truncated=r.truncated) for r in results],
            model_version=self.model.version,
        )

    async def GetModelInfo(self, request, context) -> reward_pb2.GetModelInfoResponse:
        return reward_pb2.GetModelInfoResponse(
            model_name=self.model.model_dir,
            model_version=self.model.version,
            max_length=self.model.max_length,
            max_batch_items=self.model.max_batch_items,
        )
