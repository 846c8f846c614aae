"""gRPC clients of the reward and reference services, used from the trainer's thread."""

from __future__ import annotations

import grpc

from rlhf.reference.v1 import reference_pb2, reference_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc

_OPTS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class RewardClient:
    def __init__(self, addr: str, timeout_s: float = 120.0):
        self._ch = grpc.insecure_channel(addr, options=_OPTS)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._ch)
        self.timeout_s = timeout_s

    def score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], str]:
        req = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r) for p, r in pairs])
        resp = self._stub.Score(req, timeout=self.timeout_s, wait_for_ready=True)
        return [x.score for x in resp.results], resp.model_version

    def close(self) -> None:
        self._ch.close()


class ReferenceClient:
    def __init__(self, addr: str, timeout_s: float = 120.0):
        self._ch = grpc.insecure_channel(addr, options=_OPTS)
        self._stub = reference_pb2_grpc.ReferenceServiceStub(self._ch)
        self.timeout_s = timeout_s

    def logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        req = reference_pb2.LogProbsRequest(items=[
            reference_pb2.LogProbsItem(prompt_token_ids=p, response_token_ids=r) for p, r in zip(prompts, responses)
        ])
        resp = self._stub.LogProbs(req, timeout=self.timeout_s, wait_for_ready=True)
        return [list(x.logprobs) for x in resp.results]

    def close(self) -> None:
        self._ch.close()
