"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc

from .core import RewardCore, ScoreItem

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, core: RewardCore):
        self.core = core

    async def Score(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        out = await self.core.score([ScoreItem(i.prompt, i.response) for i in request.items])
        return reward_pb2.ScoreResponse(
            results=[reward_pb2.ScoreResult(score=r.score, truncated=r.truncated) for r in out.results],
            model_version=out.model_version,
        )

    async def Compare(self, request: reward_pb2.CompareRequest, context) -> reward_pb2.CompareResponse:
        c = await self.core.compare(request.prompt, request.response_a, request.response_b)
        return reward_pb2.CompareResponse(score_a=c.score_a, score_b=c.score_b, truncated_a=c.truncated_a,
                                          truncated_b=c.truncated_b, prob_a_preferred=c.prob_a_preferred,
                                          model_version=c.model_version)

    async def GetModelInfo(self, request, context) -> reward_pb2.GetModelInfoResponse:
        i = self.core.info()
        return reward_pb2.GetModelInfoResponse(
            model_name=i.model_name, model_version=i.model_version, max_length=i.max_length,
            max_batch_items=i.max_batch_items, version_number=i.version_number, sha256=i.sha256,
            max_batch_size=i.max_batch_size, reward_count=i.reward.count, reward_mean=i.reward.mean,
            reward_std=i.reward.std, shadow_model_version=i.shadow_model_version,
        )
