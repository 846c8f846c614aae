"""Clients of other services, over gRPC only: the reward ensemble that ranks the rating queue
(RewardService.Compare on each configured reward address: the live reward service, and for
disagreement, for example one serving the previous version) and the policy that answers
prompts for new pairs (PolicyService.Generate). Blocking; used from background threads."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import grpc

from rlhf.events.v1 import events_pb2
from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc


def _metadata(api_key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {api_key}")] if api_key else []


class RewardEnsemble:
    """P(A preferred) for a pair from each member, in member order."""

    def __init__(self, addrs: Sequence[str], api_key: str = "", timeout_s: float = 10.0):
        self.addrs, self.timeout_s, self._md = list(addrs), timeout_s, _metadata(api_key)
        self._channels = [grpc.insecure_channel(a) for a in self.addrs]
        self._stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in self._channels]

    def __len__(self) -> int:
        return len(self._stubs)

    def compare(self, prompt: str, a: str, b: str) -> list[float]:
        req = reward_pb2.CompareRequest(prompt=prompt, response_a=a, response_b=b)
        return [float(s.Compare(req, timeout=self.timeout_s, metadata=self._md).prob_a_preferred)
                for s in self._stubs]

    def close(self) -> None:
        for c in self._channels:
            c.close()


class PolicyClient:
    def __init__(self, addr: str, api_key: str = "", timeout_s: float = 120.0):
        self.addr, self.timeout_s, self._md = addr, timeout_s, _metadata(api_key)
        self._channel = grpc.insecure_channel(addr)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)

    def generate(self, prompt: str, n: int, temperature: float, max_tokens: int,
                 stop: Sequence[str] = ()) -> policy_pb2.GenerateResponse:
        req = policy_pb2.GenerateRequest(prompt=prompt, sampling=policy_pb2.SamplingParams(
            n=n, temperature=temperature, max_tokens=max_tokens, stop=list(stop)))
        return self._stub.Generate(req, timeout=self.timeout_s, metadata=self._md)

    def answers(self, prompt: str, n: int, temperature: float, max_tokens: int) -> list[events_pb2.Generation]:
        """n answers to a raw prompt, as the Generation records the policy writes for them."""
        resp = self.generate(prompt, n, temperature, max_tokens)
        request_id = "rate-" + uuid.uuid4().hex[:16]
        return [events_pb2.Generation(generation_id=c.generation_id, request_id=request_id, prompt=prompt,
                                      response=c.text, policy_version=resp.policy_version)
                for c in resp.completions]

    def close(self) -> None:
        self._channel.close()
