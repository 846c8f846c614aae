"""The gRPC server scaffolding: one error map and request metrics for every kind of method,
and the metrics endpoint bound to the configured address."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry

from rlhf_common import metrics as metrics_mod
from rlhf_common.errors import InvalidInput, Overloaded
from rlhf_common.grpc_server import Server

SERVICE = "test.Echo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _unary(request: bytes, context):
    if request == b"bad":
        raise InvalidInput("request: bad")
    return request


async def _server_stream(request: bytes, context):
    yield request
    raise Overloaded("too much")


async def _client_stream(requests, context):
    got = [r async for r in requests]
    raise InvalidInput(f"{len(got)} requests: bad")


async def _bidi(requests, context):
    async for r in requests:
        yield r
    raise InvalidInput("stream: bad")


def _handler():
    ident = dict(request_deserializer=None, response_serializer=None)
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, **ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream, **ident),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream, **ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, **ident),
    })


def test_every_method_kind_maps_errors_and_is_counted():
    reg = CollectorRegistry()
    m = metrics_mod.RpcMetrics("rlhf_test", reg)

    async def main():
        server = Server("127.0.0.1", 0, [SERVICE], m)
        server.server.add_generic_rpc_handlers([_handler()])
        await server.server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                out = {}
                assert await ch.unary_unary(f"/{SERVICE}/Unary")(b"ok") == b"ok"
                for name, call in (
                    ("Unary", lambda: ch.unary_unary(f"/{SERVICE}/Unary")(b"bad")),
                    ("ClientStream", lambda: ch.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"a", b"b"]))),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call()
                    out[name] = (e.value.code(), e.value.details())
                for name, call in (
                    ("ServerStream", lambda: ch.unary_stream(f"/{SERVICE}/ServerStream")(b"x")),
                    ("Bidi", lambda: ch.stream_stream(f"/{SERVICE}/Bidi")(iter([b"a", b"b"]))),
                ):
                    got = []
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        async for item in call():
                            got.append(item)
                    out[name] = (e.value.code(), e.value.details(), got)
                return out
        finally:
            await server.server.stop(0)

    out = asyncio.run(main())
    assert out["Unary"] == (grpc.StatusCode.INVALID_ARGUMENT, "request: bad")
    assert out["ClientStream"] == (grpc.StatusCode.INVALID_ARGUMENT, "2 requests: bad")
    assert out["ServerStream"] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "too much", [b"x"])
    assert out["Bidi"] == (grpc.StatusCode.INVALID_ARGUMENT, "stream: bad", [b"a", b"b"])
    count = lambda method, code: reg.get_sample_value("rlhf_test_requests_total",  # noqa: E731
                                                      {"method": method, "code": code})
    assert count("Unary", "OK") == 1 and count("Unary", "INVALID_ARGUMENT") == 1
    assert count("ClientStream", "INVALID_ARGUMENT") == 1
    assert count("ServerStream", "RESOURCE_EXHAUSTED") == 1
    assert count("Bidi", "INVALID_ARGUMENT") == 1
    assert reg.get_sample_value("rlhf_test_request_seconds_count", {"method": "Bidi"}) == 1


def test_metrics_endpoint_binds_the_configured_address_only():
    reg = CollectorRegistry()
    metrics_mod.RpcMetrics("rlhf_bind", reg)
    port = _free_port()
    metrics_mod.serve(port, reg, "127.0.0.2")
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as r:
        assert b"rlhf_bind_requests_total" in r.read()
    # Not on the other loopback address, as it would be when bound to 0.0.0.0.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
