"""Fuzzing every entry point: schemathesis against the reward and feedback OpenAPI specs,
and Hypothesis-made protobuf bytes and out-of-range fields against every gRPC method.
A server error (5xx, INTERNAL, UNKNOWN) or a service that stops answering fails the test."""

from __future__ import annotations

import grpc
import httpx
import pytest
import schemathesis
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.errors import Unsatisfiable

from rlhf.feedback.v1 import feedback_pb2
from rlhf.policy.v1 import policy_pb2
from rlhf.reference.v1 import reference_pb2
from rlhf.reward.v1 import reward_pb2
from rlhf.reward_learner.v1 import reward_learner_pb2
from rlhf.trainer.v1 import trainer_pb2

from tests.faults.conftest import Row

pytestmark = [pytest.mark.faults, pytest.mark.slow]

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Operator commands that change what the stack does (pause training, take a checkpoint, swap
# the reference, start a training round) are left out: they are tested where they belong.
COMMANDS = {"/rlhf.trainer.v1.TrainerService/Pause", "/rlhf.trainer.v1.TrainerService/Resume",
            "/rlhf.trainer.v1.TrainerService/Checkpoint", "/rlhf.reference.v1.ReferenceService/Refresh",
            "/rlhf.reward_learner.v1.RewardLearnerService/Train"}
SERVICES = {"reward": reward_pb2, "reference": reference_pb2, "policy": policy_pb2, "feedback": feedback_pb2,
            "trainer": trainer_pb2, "reward_learner": reward_learner_pb2}
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED}

TALLY: dict[str, list[int]] = {"rest": [0, 0], "grpc": [0, 0]}  # [requests, server errors]


def _methods():
    out = []
    for service, module in SERVICES.items():
        for svc in module.DESCRIPTOR.services_by_name.values():
            for m in svc.methods:
                path = f"/{svc.full_name}/{m.name}"
                if path not in COMMANDS:
                    out.append((service, path, m))
    return out


_INTS = {FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
         FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
         FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
         FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
         FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1)}


def _value(fd, depth: int):
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return _message(fd.message_type, depth + 1)
    if fd.type in _INTS:
        lo, hi = _INTS[fd.type]
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, -1 if lo < 0 else 2]))
    if fd.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if fd.type == FieldDescriptor.TYPE_FLOAT else 64
        return st.floats(width=width, allow_nan=True, allow_infinity=True)
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)
    raise AssertionError(fd.type)


@st.composite
def _fill(draw, desc, depth: int):
    msg = {}
    for fd in desc.fields:
        if draw(st.booleans()):
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue
        if fd.is_repeated:
            if depth > 2:
                continue
            msg[fd.name] = draw(st.lists(_value(fd, depth), max_size=3))
        elif depth <= 2 or fd.type != FieldDescriptor.TYPE_MESSAGE:
            msg[fd.name] = draw(_value(fd, depth))
    return msg


def _message(desc, depth: int = 0):
    return _fill(desc, depth)


def _bytes_of(desc, fields: dict) -> bytes:
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(desc)

    def build(d, values):
        m = message_factory.GetMessageClass(d)()
        for k, v in values.items():
            fd = d.fields_by_name[k]
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                if fd.is_repeated:
                    getattr(m, k).extend(build(fd.message_type, x) for x in v)
                else:
                    getattr(m, k).CopyFrom(build(fd.message_type, v))
            elif fd.type == FieldDescriptor.TYPE_ENUM:
                if fd.is_repeated:
                    getattr(m, k).extend(v)
                else:
                    setattr(m, k, v)
            else:
                if fd.is_repeated:
                    getattr(m, k).extend(v)
                else:
                    setattr(m, k, v)
        return m

    assert cls is not None
    return build(desc, fields).SerializeToString()


def _call(stack, service: str, path: str, method, payload: bytes) -> grpc.StatusCode:
    ch = grpc.insecure_channel(stack.addrs[service])
    try:
        if method.server_streaming:
            call = ch.unary_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                for _ in call(payload, timeout=60):
                    pass
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()
        call = ch.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(payload, timeout=60)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()
    finally:
        ch.close()


METHODS = _methods()


@pytest.mark.parametrize("service,path,method", METHODS, ids=[p for _, p, _ in METHODS])
def test_grpc_methods_answer_bad_bytes_and_fields_with_client_codes(stack, service, path, method):
    seen: list[grpc.StatusCode] = []

    @FUZZ
    @given(payload=st.one_of(st.binary(max_size=200), _message(method.input_type).map(
        lambda f: _bytes_of(method.input_type, f))))
    def run(payload):
        code = _call(stack, service, path, method, payload)
        seen.append(code)
        assert code in CLIENT_CODES, (path, payload[:80], code)

    try:
        run()
    finally:
        TALLY["grpc"][0] += len(seen)
        TALLY["grpc"][1] += sum(c not in CLIENT_CODES for c in seen)
    assert grpc.StatusCode.INVALID_ARGUMENT in seen or not method.input_type.fields, set(seen)


def _no_server_error(case):
    response = case.call(timeout=60)
    TALLY["rest"][0] += 1
    TALLY["rest"][1] += response.status_code >= 500
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])


@pytest.mark.parametrize("service", ["reward", "feedback"])
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_rest_api_has_no_server_errors(stack, service, mode):
    """Every operation of the service's OpenAPI spec, with bodies, headers and paths that fit
    the spec (positive) and ones that break it (negative)."""
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{stack.configs[service].http_port}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert any(op.path.startswith("/v1/") for op in operations)
    fuzzed = 0
    for op in operations:
        @FUZZ
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            _no_server_error(case)

        try:
            run()
            fuzzed += 1
        except Unsatisfiable:  # nothing breaks the spec of an operation without inputs (GET /metrics)
            assert mode == schemathesis.GenerationMode.NEGATIVE and not op.get_request_payload_content_types() \
                and not list(op.iter_parameters()), op.path
    assert fuzzed >= 2


def test_fuzz_row(stack, reliability):
    """Runs after the fuzz tests of this module: their tally, and every service still up."""
    for name in stack.spec.services:
        stack.wait_healthy(name, 60)
    assert httpx.get(f"http://127.0.0.1:{stack.configs['reward'].http_port}/healthz").status_code == 200
    n = TALLY["rest"][0] + TALLY["grpc"][0]
    errors = TALLY["rest"][1] + TALLY["grpc"][1]
    reliability(Row("fuzzing: schemathesis on the reward and feedback REST APIs, Hypothesis bytes and fields on "
                    f"{len(METHODS)} gRPC methods", n, n, 0, 0, 0, errors,
                    note=f"{TALLY['rest'][0]} REST and {TALLY['grpc'][0]} gRPC requests; `errors returned` counts "
                         "server errors (5xx, INTERNAL, UNKNOWN), of which there must be none"))
    assert TALLY["rest"][0] > 0 and TALLY["grpc"][0] > 0
    assert errors == 0
