"""Admission control of the policy service: past RLHF_POLICY_MAX_IN_FLIGHT concurrent API
requests, callers get RESOURCE_EXHAUSTED at once; callers that give up free their slots."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from rlhf.policy.v1 import policy_pb2, policy_pb2_grpc
from rlhf_devstack.models import tiny_prompts
from rlhf_devstack.stack import Stack, StackSpec

from tests.helpers import metric_value, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 4
LONG = 200  # tokens: each admitted request decodes this many, far longer than a burst takes to arrive


@pytest.fixture(scope="module")
def admission_stack(tmp_path_factory):
    spec = StackSpec(run_dir=tmp_path_factory.mktemp("admission"), services=("policy",), rollout_enabled=False,
                     extra_env={"RLHF_POLICY_MAX_IN_FLIGHT": str(LIMIT)})
    with Stack(spec) as st:
        stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(st.addrs["policy"]))
        # A prompt whose greedy answer runs to the token limit, so every admitted request is long.
        sampling = policy_pb2.SamplingParams(temperature=0.0, max_tokens=LONG)
        prompt = next((p for p in tiny_prompts(16, seed=3) if stub.Generate(policy_pb2.GenerateRequest(
            prompt=p, sampling=sampling)).completions[0].finish_reason == "length"), None)
        assert prompt is not None, f"no test prompt decodes {LONG} tokens without stopping"
        yield st, stub, policy_pb2.GenerateRequest(prompt=prompt, sampling=sampling)


def _in_flight(st) -> float:
    return metric_value(scrape(st.metrics_ports["policy"]), "rlhf_policy_requests_in_flight")


def test_requests_past_the_limit_are_refused(admission_stack):
    st, _, request = admission_stack

    async def burst():
        async with grpc.aio.insecure_channel(st.addrs["policy"]) as ch:
            s = policy_pb2_grpc.PolicyServiceStub(ch)

            async def one():
                try:
                    resp = await s.Generate(request)
                    return "OK", len(resp.completions[0].token_ids), ""
                except grpc.aio.AioRpcError as e:
                    return e.code().name, 0, e.details()
            return await asyncio.gather(*(one() for _ in range(3 * LIMIT)))

    outcomes = asyncio.run(burst())
    codes = [c for c, *_ in outcomes]
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert LIMIT <= codes.count("OK") < 3 * LIMIT
    assert all(n == LONG for c, n, *_ in outcomes if c == "OK")
    refused = [d for c, _, d in outcomes if c == "RESOURCE_EXHAUSTED"]
    assert all(f"limit {LIMIT}" in d for d in refused)
    text = scrape(st.metrics_ports["policy"])
    assert metric_value(text, "rlhf_policy_requests_total",
                        {"method": "Generate", "code": "RESOURCE_EXHAUSTED"}) == len(refused)


def test_callers_that_give_up_free_their_slots(admission_stack):
    st, stub, request = admission_stack
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        for _ in range(LIMIT):  # as many as the limit: a leaked slot would refuse the request below
            with pytest.raises(grpc.RpcError) as e:
                call(request, timeout=0.05)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 20
    while _in_flight(st) != 0:
        assert time.monotonic() < deadline, f"{_in_flight(st)} requests still in flight"
        time.sleep(0.1)
    resp = stub.Generate(request)
    assert len(resp.completions[0].token_ids) == LONG
