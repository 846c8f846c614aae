"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc

from rlhf_common.metrics import PolicyMetrics

from .core import PolicyEngine, Sampling


def sampling_from_proto(p: policy_pb2.SamplingParams, default_max_tokens: int) -> Sampling:
    return Sampling(
        temperature=p.temperature,
        max_tokens=p.max_tokens or default_max_tokens,
        top_p=p.top_p if 0 < p.top_p < 1 else 1.0,
        top_k=p.top_k,
        n=p.n or 1,
        seed=p.seed if p.has_seed else None,
    )


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, engine: PolicyEngine, metrics: PolicyMetrics):
        self.engine = engine
        self.metrics = metrics

    async def Generate(self, request: policy_pb2.GenerateRequest, context) -> policy_pb2.GenerateResponse:
        gen = await self.engine.generate(request.prompt,
                                         sampling_from_proto(request.sampling, self.engine.cfg.max_tokens))
        self.metrics.generated_tokens.labels("api").inc(sum(len(c.token_ids) for c in gen.completions))
        return policy_pb2.GenerateResponse(
            prompt_token_ids=gen.prompt_token_ids,
            completions=[
                policy_pb2.Completion(generation_id=c.generation_id, text=c.text, token_ids=c.token_ids,
                                      logprobs=c.logprobs, finish_reason=c.finish_reason)
                for c in gen.completions
            ],
            policy_version=gen.policy_version,
        )

    async def GetVersion(self, request, context) -> policy_pb2.GetVersionResponse:
        s = self.engine.served
        return policy_pb2.GetVersionResponse(version=s.version, model_name=self.engine.cfg.model_name,
                                             sha256=s.sha256, updated_unix_ms=s.updated_unix_ms)
