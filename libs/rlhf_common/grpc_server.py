"""grpc.aio server scaffolding shared by the services: health, reflection, error mapping,
request metrics, and graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import errors
from .metrics import RpcMetrics

log = logging.getLogger(__name__)


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain exceptions to status codes (the one place that does) and records
    request counts and latency, for every kind of method (unary or streaming requests,
    unary or streaming responses). Servicers raise; they never call context.abort."""

    def __init__(self, metrics: RpcMetrics | None):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self.metrics

        def record(code: grpc.StatusCode, t0: float) -> None:
            if metrics is not None:
                metrics.requests.labels(method, code.name).inc()
                metrics.latency.labels(method).observe(time.perf_counter() - t0)

        async def fail(exc: Exception, context, t0: float) -> None:
            code, msg = errors.to_grpc(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s", method)
            record(code, t0)  # before the caller can see the error
            await context.abort(code, msg)

        def unary_response(inner):
            async def call(request_or_iterator, context: grpc.aio.ServicerContext):
                t0, code, recorded = time.perf_counter(), grpc.StatusCode.OK, False
                try:
                    return await inner(request_or_iterator, context)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:  # mapped to a status, never swallowed
                    recorded = True
                    await fail(exc, context, t0)
                finally:
                    if not recorded:
                        record(code, t0)
            return call

        def stream_response(inner):
            async def call(request_or_iterator, context: grpc.aio.ServicerContext):
                t0, code, recorded = time.perf_counter(), grpc.StatusCode.OK, False
                try:
                    async for item in inner(request_or_iterator, context):
                        yield item
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as exc:
                    recorded = True
                    await fail(exc, context, t0)
                finally:
                    if not recorded:
                        record(code, t0)
            return call

        kinds = (
            (handler.unary_unary, unary_response, grpc.unary_unary_rpc_method_handler),
            (handler.unary_stream, stream_response, grpc.unary_stream_rpc_method_handler),
            (handler.stream_unary, unary_response, grpc.stream_unary_rpc_method_handler),
            (handler.stream_stream, stream_response, grpc.stream_stream_rpc_method_handler),
        )
        for inner, wrap, make in kinds:
            if inner is not None:
                return make(wrap(inner), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


class Server:
    """A grpc.aio server with the standard health service and reflection."""

    def __init__(self, host: str, port: int, service_names: list[str], metrics: RpcMetrics | None = None,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = ()):
        # Extra interceptors (e.g. auth) run inside the error interceptor, so what they
        # raise is mapped to a status code and counted like any handler error.
        self.server = grpc.aio.server(
            interceptors=[ErrorAndMetricsInterceptor(metrics), *interceptors],
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME],
                                            self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.host = host

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            res = self.health.set(name, status)
            if asyncio.iscoroutine(res):
                await res

    async def run(self, on_stop: Callable[[], Awaitable[None]] | None = None, grace_s: float = 5.0,
                  watch: Callable[[], BaseException | None] | None = None) -> None:
        """Start, mark SERVING, and wait for SIGTERM/SIGINT; then drain and stop.

        `watch` is polled twice a second; when it returns an exception (a background loop
        died), the service turns NOT_SERVING, stops, and exits with status 1 so that its
        supervisor restarts it from the last committed state.
        """
        await self.server.start()
        await self.set_serving(True)
        log.info("gRPC listening on %s:%d", self.host, self.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        failure: BaseException | None = None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            if watch is not None and (failure := watch()) is not None:
                log.error("background loop failed, stopping: %r", failure)
                break
        log.info("stopping (grace %.1fs)", grace_s)
        await self.set_serving(False)
        if on_stop is not None:
            await on_stop()
        await self.server.stop(grace_s)
        if failure is not None:
            raise SystemExit(1)


def setup_logging(name: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
