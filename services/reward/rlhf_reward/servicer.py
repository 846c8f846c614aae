"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc
from rlhf_common.errors import InvalidInput

from .core import RewardCore, ScoreItem

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


def _parse(message_type):
    def parse(raw: bytes):
        try:
            return message_type.FromString(raw)
        except DecodeError as e:
            # proto3 strings must be UTF-8; protobuf refuses the message otherwise.
            raise InvalidInput(f"request is not a valid {message_type.DESCRIPTOR.full_name} "
                               f"(malformed bytes or a string field that is not UTF-8): {e}") from None
    return parse


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


def add_to_server(servicer: RewardServicer, server: grpc.aio.Server) -> None:
    """Register like the generated add_RewardServiceServicer_to_server, except that requests
    are parsed inside the call: undecodable bytes (e.g. invalid UTF-8) then become
    INVALID_ARGUMENT through the error interceptor instead of gRPC's generic INTERNAL."""

    def unary(method, request_type, response_type):
        async def call(raw: bytes, context):
            return await method(_parse(request_type)(raw), context)

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None,
                                                   response_serializer=response_type.SerializeToString)

    handlers = {
        "Score": unary(servicer.Score, reward_pb2.ScoreRequest, reward_pb2.ScoreResponse),
        "Compare": unary(servicer.Compare, reward_pb2.CompareRequest, reward_pb2.CompareResponse),
        "GetModelInfo": unary(servicer.GetModelInfo, reward_pb2.GetModelInfoRequest,
                              reward_pb2.GetModelInfoResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
