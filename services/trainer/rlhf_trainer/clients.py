"""gRPC clients of the reward and reference services, used from the trainer's thread.

Transient failures (the server is restarting, overloaded, or timed out) are retried with
exponential back-off until `retry_s` has passed; then the error is raised and the trainer
exits for its supervisor to restart it. Any other failure (the request itself is bad) is
raised at once, for the caller to dead-letter what it sent.
"""

from __future__ import annotations

import logging
import time

import grpc

from rlhf.reference.v1 import reference_pb2, reference_pb2_grpc
from rlhf.reward.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)

_OPTS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


def channel(addr: str, tls_ca_file: str = "") -> grpc.Channel:
    """A channel to `addr`: TLS verified against `tls_ca_file` when one is given."""
    if not tls_ca_file:
        return grpc.insecure_channel(addr, options=_OPTS)
    with open(tls_ca_file, "rb") as f:
        return grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=f.read()), options=_OPTS)


class _Client:
    def __init__(self, addr: str, timeout_s: float, retry_s: float, tls_ca_file: str):
        self.addr = addr
        self._ch = channel(addr, tls_ca_file)
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.retries = 0  # transient failures retried, for metrics

    def _call(self, method, request):
        deadline = time.monotonic() + self.retry_s
        delay = 0.2
        while True:
            try:
                return method(request, timeout=self.timeout_s, wait_for_ready=True)
            except grpc.RpcError as e:
                if e.code() not in TRANSIENT or time.monotonic() + delay > deadline:
                    raise
                self.retries += 1
                log.warning("%s at %s: %s (%s); retrying in %.1fs", type(self).__name__, self.addr,
                            e.code().name, e.details(), delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def close(self) -> None:
        self._ch.close()


class RewardClient(_Client):
    def __init__(self, addr: str, timeout_s: float = 120.0, retry_s: float = 300.0, tls_ca_file: str = ""):
        super().__init__(addr, timeout_s, retry_s, tls_ca_file)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._ch)

    def score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], str]:
        req = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r) for p, r in pairs])
        resp = self._call(self._stub.Score, req)
        return [x.score for x in resp.results], resp.model_version


class ReferenceClient(_Client):
    def __init__(self, addr: str, timeout_s: float = 120.0, retry_s: float = 300.0, tls_ca_file: str = ""):
        super().__init__(addr, timeout_s, retry_s, tls_ca_file)
        self._stub = reference_pb2_grpc.ReferenceServiceStub(self._ch)

    def logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        req = reference_pb2.LogProbsRequest(items=[
            reference_pb2.LogProbsItem(prompt_token_ids=p, response_token_ids=r) for p, r in zip(prompts, responses)
        ])
        resp = self._call(self._stub.LogProbs, req)
        return [list(x.logprobs) for x in resp.results]
