"""grpc.aio server scaffolding shared by the services: health, reflection, error mapping,
request metrics, and graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Awaitable, Callable, Sequence

import grpc
from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
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


def _unknown_fields(msg: Message, path: str = "") -> list[str]:
    """Paths of the fields that `msg` and the messages inside it do not define (unknown
    numbers, or known numbers sent with the wrong wire type, which protobuf keeps aside)."""
    out = [f"{path}#{f.field_number}" for f in unknown_fields.UnknownFieldSet(msg)]
    for fd, value in msg.ListFields():
        if fd.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if fd.message_type.GetOptions().map_entry:
            values = value.values() if fd.message_type.fields_by_name["value"].message_type else ()
            items = [(f"{path}{fd.name}[{k!r}]", v) for k, v in zip(value.keys(), values)]
        elif fd.is_repeated:
            items = [(f"{path}{fd.name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(f"{path}{fd.name}", value)]
        for p, v in items:
            out += _unknown_fields(v, p + ".")
    return out


def strict_parser(deserializer: Callable[[bytes], Message]) -> Callable[[bytes], Message]:
    """Parse a request, refusing malformed bytes (strings that are not UTF-8 included) and
    fields the schema does not define, as InvalidInput rather than gRPC's INTERNAL or a
    silently dropped field."""
    def parse(raw: bytes) -> Message:
        try:
            msg = deserializer(raw)
        except DecodeError as e:
            name = getattr(deserializer, "__self__", None)
            raise errors.InvalidInput(f"request is not a valid {getattr(name, '__name__', 'message')} "
                                      f"(malformed bytes or a string that is not UTF-8): {e}") from None
        unknown = _unknown_fields(msg)
        if unknown:
            raise errors.InvalidInput(
                f"{type(msg).DESCRIPTOR.full_name}: unknown field or wrong wire type at "
                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        return msg
    return parse


class StrictRequestInterceptor(grpc.aio.ServerInterceptor):
    """Innermost interceptor: requests are parsed inside the call with `strict_parser`, so
    that a bad request is INVALID_ARGUMENT (through the error interceptor), after
    authentication."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = strict_parser(handler.request_deserializer)

        def unary_request(inner):
            async def call(raw, context):
                return await inner(parse(raw), context)
            return call

        def unary_request_stream_response(inner):
            async def call(raw, context):
                async for item in inner(parse(raw), context):
                    yield item
            return call

        async def parsed(raws):
            async for raw in raws:
                yield parse(raw)

        def stream_request(inner):
            async def call(raws, context):
                return await inner(parsed(raws), context)
            return call

        def stream_request_stream_response(inner):
            async def call(raws, context):
                async for item in inner(parsed(raws), context):
                    yield item
            return call

        kinds = (
            (handler.unary_unary, unary_request, grpc.unary_unary_rpc_method_handler),
            (handler.unary_stream, unary_request_stream_response, grpc.unary_stream_rpc_method_handler),
            (handler.stream_unary, stream_request, grpc.stream_unary_rpc_method_handler),
            (handler.stream_stream, stream_request_stream_response, grpc.stream_stream_rpc_method_handler),
        )
        for inner, wrap, make in kinds:
            if inner is not None:
                return make(wrap(inner), request_deserializer=None, response_serializer=handler.response_serializer)
        return handler


class Server:
    """A grpc.aio server with the standard health service and reflection."""

    def __init__(self, host: str, port: int, service_names: list[str], metrics: RpcMetrics | None = None,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (), max_request_bytes: int = 4 << 20,
                 credentials: grpc.ServerCredentials | None = None):
        # Extra interceptors (e.g. auth) run inside the error interceptor, so what they
        # raise is mapped to a status code and counted like any handler error; requests are
        # parsed strictly after them. Larger requests get RESOURCE_EXHAUSTED from gRPC.
        self.server = grpc.aio.server(
            interceptors=[ErrorAndMetricsInterceptor(metrics), *interceptors, StrictRequestInterceptor()],
            options=[("grpc.max_receive_message_length", max_request_bytes),
                     ("grpc.max_send_message_length", 64 << 20)],
        )
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME],
                                            self.server)
        address = f"{host}:{port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        self.host = host

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            res = self.health.set(name, status)
            if asyncio.iscoroutine(res):
                await res

    async def run(self, on_stop: Callable[[], Awaitable[None]] | None = None, grace_s: float = 5.0,
                  watch: Callable[[], BaseException | None] | None = None,
                  ready: Callable[[], str | None] | None = None) -> None:
        """Start, mark SERVING when ready, and wait for SIGTERM/SIGINT; then drain and stop.

        `ready` is polled twice a second and returns why the service cannot serve yet (or
        None): health follows it, SERVING or NOT_SERVING. `watch` is polled as often; when it
        returns an exception (a background loop died), the service turns NOT_SERVING, stops,
        and exits with status 1 so that its supervisor restarts it from the last committed state.
        """
        await self.server.start()
        serving: bool | None = None

        async def follow_readiness() -> None:
            nonlocal serving
            why = ready() if ready is not None else None
            if serving is None or serving != (why is None):
                serving = why is None
                await self.set_serving(serving)
                if serving:
                    log.info("ready: health is SERVING")
                else:
                    log.warning("not ready (%s): health is NOT_SERVING", why)

        await follow_readiness()
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
            await follow_readiness()
        log.info("stopping (grace %.1fs)", grace_s)
        await self.set_serving(False)
        if on_stop is not None:
            await on_stop()
        await self.server.stop(grace_s)
        if failure is not None:
            raise SystemExit(1)


def setup_logging(name: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
