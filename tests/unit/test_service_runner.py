"""The one service bootstrap: a background failure stops the service with exit 1 after
NOT_SERVING, loops are stopped, cleanups run last-first, and blocking work runs off the loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_common import service
from rlhf_common.config import ServerConfig
from rlhf_common.loops import BackgroundLoop
from rlhf_common.metrics import RpcMetrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Dies(BackgroundLoop):
    def __init__(self, after: threading.Event):
        super().__init__("dies")
        self.after = after

    def loop_body(self) -> None:
        self.after.wait(10)
        raise RuntimeError("broker gone for good")


class _Idles(BackgroundLoop):
    def loop_body(self) -> None:
        while not self.stopping.wait(0.05):
            pass


def test_a_dying_loop_stops_the_service_with_exit_1():
    grpc_port, metrics_port = _free_port(), _free_port()
    spec = service.ServiceSpec("test", ServerConfig(port=grpc_port, metrics_port=metrics_port),
                               ["test.Thing"], lambda reg: RpcMetrics("rlhf_runner", reg))
    events: list[str] = []
    seen: dict = {}
    die = threading.Event()

    async def build(rt: service.Runtime) -> None:
        loop_thread = threading.get_ident()
        seen["blocking_thread"] = await rt.blocking(threading.get_ident)
        seen["loop_thread"] = loop_thread
        rt.on_stop(lambda: events.append("first cleanup"))

        async def second():
            events.append("second cleanup")
        rt.on_stop(second)
        seen["idle"] = rt.start_loop(_Idles("idle"))
        rt.start_loop(_Dies(die))

    async def probe():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for _ in range(100):
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(service="test.Thing"), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)
            seen["serving"] = r.status
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            seen["metrics"] = resp.read().decode()
        die.set()

    async def main():
        probing = asyncio.create_task(probe())
        try:
            await service.serve(spec, build)
        finally:
            await probing

    with pytest.raises(SystemExit) as e:
        asyncio.run(main())
    assert e.value.code == 1
    assert seen["serving"] == health_pb2.HealthCheckResponse.SERVING
    assert "rlhf_runner_requests_total" in seen["metrics"]
    assert seen["blocking_thread"] != seen["loop_thread"]
    assert not seen["idle"].is_alive()  # the other loop was stopped and joined
    assert events == ["second cleanup", "first cleanup"]


def test_a_failing_build_still_cleans_up():
    spec = service.ServiceSpec("test", ServerConfig(port=_free_port(), metrics_port=0), ["test.Thing"],
                               lambda reg: RpcMetrics("rlhf_runner2", reg))
    events: list[str] = []
    holder = {}

    async def build(rt: service.Runtime) -> None:
        holder["loop"] = rt.start_loop(_Idles("idle"))
        rt.on_stop(lambda: events.append("cleanup"))
        raise FileNotFoundError("no model at /m")

    with pytest.raises(FileNotFoundError, match="/m"):
        asyncio.run(service.serve(spec, build))
    assert events == ["cleanup"] and not holder["loop"].is_alive()
