"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

import asyncio

from rlhf.reference.v1 import reference_pb2, reference_pb2_grpc

from rlhf_common.errors import InvalidInput

from .core import LogProbsItem, ReferenceModel
from .metrics import ReferenceMetrics


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    def __init__(self, model: ReferenceModel, metrics: ReferenceMetrics):
        self.model = model
        self.metrics = metrics

    async def LogProbs(self, request: reference_pb2.LogProbsRequest, context) -> reference_pb2.LogProbsResponse:
        items = [LogProbsItem(list(i.prompt_token_ids), list(i.response_token_ids)) for i in request.items]
        self.model.validate(items)
        lps, version = await asyncio.get_running_loop().run_in_executor(None, self.model.logprobs, items)
        self.metrics.tokens.inc(sum(len(x) for x in lps))
        return reference_pb2.LogProbsResponse(
            results=[reference_pb2.TokenLogProbs(logprobs=x) for x in lps],
            reference_version=version,
        )

    async def GetVersion(self, request, context) -> reference_pb2.GetVersionResponse:
        return reference_pb2.GetVersionResponse(version=self.model.version, model_path=self.model.model_dir)

    async def Refresh(self, request: reference_pb2.RefreshRequest, context) -> reference_pb2.GetVersionResponse:
        if not request.uri:
            raise InvalidInput("uri: required")
        if request.version <= self.model.version:
            raise InvalidInput(f"version={request.version}: must be above the current reference version "
                               f"{self.model.version}")
        await asyncio.get_running_loop().run_in_executor(
            None, self.model.refresh, request.uri, request.version, request.sha256)
        self.metrics.refreshes.labels("rpc", "applied").inc()
        self.metrics.version.set(self.model.version)
        return reference_pb2.GetVersionResponse(version=self.model.version, model_path=self.model.model_dir)
