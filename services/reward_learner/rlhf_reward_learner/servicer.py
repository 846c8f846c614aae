"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

import asyncio

from rlhf.reward_learner.v1 import reward_learner_pb2, reward_learner_pb2_grpc

from .learner import RoundResult
from .workers import LearnLoop

SERVICE = reward_learner_pb2.DESCRIPTOR.services_by_name["RewardLearnerService"].full_name


def round_to_proto(r: RoundResult, published_version: int) -> reward_learner_pb2.RoundResult:
    return reward_learner_pb2.RoundResult(
        round=r.round, published=r.published, reason=r.reason, live_version=r.live_version,
        published_version=published_version if r.published else 0, live_accuracy=r.live_accuracy,
        candidate_accuracy=r.candidate_accuracy, heldout_pairs=r.heldout_pairs, train_pairs=r.train_pairs,
        train_points=r.train_points, loss_first=r.loss_first, loss_last=r.loss_last, seconds=r.seconds)


class RewardLearnerServicer(reward_learner_pb2_grpc.RewardLearnerServiceServicer):
    def __init__(self, loop: LearnLoop):
        self.loop = loop

    async def Status(self, request, context) -> reward_learner_pb2.StatusResponse:
        p = self.loop.progress
        return reward_learner_pb2.StatusResponse(
            version=p.version, labels_read=p.labels_read, train_pairs=p.train_pairs, train_points=p.train_points,
            heldout_pairs=p.heldout_pairs, skipped=p.skipped,
            last_round=round_to_proto(p.last_round, p.published_version) if p.last_round else None)

    async def Train(self, request, context) -> reward_learner_pb2.RoundResult:
        result = await asyncio.wrap_future(self.loop.train_now())
        return round_to_proto(result, self.loop.progress.published_version)


def add_to_server(servicer: RewardLearnerServicer, server) -> None:
    reward_learner_pb2_grpc.add_RewardLearnerServiceServicer_to_server(servicer, server)
