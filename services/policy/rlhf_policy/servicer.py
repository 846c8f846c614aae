"""Thin gRPC layer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Callable

from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc

from .core import Completion, Generation, PolicyEngine, Sampling
from .metrics import PolicyMetrics


def sampling_from_proto(p: policy_pb2.SamplingParams, default_max_tokens: int) -> Sampling:
    return Sampling(
        temperature=p.temperature,
        max_tokens=p.max_tokens or default_max_tokens,
        top_p=p.top_p or 1.0,  # 0 is proto3's unset; any other value goes to the engine's check
        top_k=p.top_k,
        n=p.n or 1,
        seed=p.seed if p.has_seed else None,
        stop=tuple(p.stop),
        logprobs=p.logprobs,
    )


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, engine: PolicyEngine, metrics: PolicyMetrics,
                 record: Callable[[Generation], concurrent.futures.Future] | None = None):
        self.engine = engine
        self.metrics = metrics
        self.record = record  # its future completes once the broker has the answer

    def _args(self, request: policy_pb2.GenerateRequest):
        return (request.prompt, sampling_from_proto(request.sampling, self.engine.cfg.max_tokens),
                [(m.role, m.content) for m in request.messages])

    async def _record(self, gen: Generation) -> None:
        if self.record is not None:
            await asyncio.wrap_future(self.record(gen))

    async def Generate(self, request: policy_pb2.GenerateRequest, context) -> policy_pb2.GenerateResponse:
        gen = await self.engine.generate(*self._args(request))
        self.metrics.generated_tokens.labels("api").inc(sum(len(c.token_ids) for c in gen.completions))
        await self._record(gen)
        return policy_pb2.GenerateResponse(
            prompt_token_ids=gen.prompt_token_ids,
            completions=[
                policy_pb2.Completion(generation_id=c.generation_id, text=c.text, token_ids=c.token_ids,
                                      logprobs=c.logprobs, finish_reason=c.finish_reason)
                for c in gen.completions
            ],
            policy_version=gen.policy_version,
        )

    async def GenerateStream(self, request: policy_pb2.GenerateRequest, context):
        prompt, sampling, messages = self._args(request)
        t0 = time.perf_counter()
        first = True
        parts: dict[int, dict] = {}
        prompt_ids: list[int] = []
        prompt_text = ""
        version = 0
        async for ch in self.engine.generate_stream(prompt, sampling, messages):
            if first:
                self.metrics.ttft.observe(time.perf_counter() - t0)
                first = False
            prompt_ids = prompt_ids or ch.prompt_token_ids
            prompt_text = prompt_text or ch.prompt_text
            version = ch.policy_version
            acc = parts.setdefault(ch.index, {"id": ch.generation_id, "text": "", "ids": [], "lps": [], "fin": ""})
            acc["text"] += ch.text
            acc["ids"] += ch.token_ids
            acc["lps"] += ch.logprobs
            acc["fin"] = ch.finish_reason or acc["fin"]
            self.metrics.generated_tokens.labels("api").inc(len(ch.token_ids))
            yield policy_pb2.GenerateChunk(
                index=ch.index, generation_id=ch.generation_id, text=ch.text, token_ids=ch.token_ids,
                logprobs=ch.logprobs, finish_reason=ch.finish_reason, policy_version=ch.policy_version,
                prompt_token_ids=ch.prompt_token_ids)
        await self._record(Generation(
            prompt_ids, [Completion(a["id"], a["text"], a["ids"], a["lps"], a["fin"] or "length")
                         for _, a in sorted(parts.items())],
            version, prompt_text, ""))

    async def GetVersion(self, request, context) -> policy_pb2.GetVersionResponse:
        s = self.engine.served
        return policy_pb2.GetVersionResponse(version=s.version, model_name=self.engine.cfg.model_name,
                                             sha256=s.sha256, updated_unix_ms=s.updated_unix_ms)
