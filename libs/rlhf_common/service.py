"""The one bootstrap of every service: registry, /metrics, gRPC server (health, reflection,
interceptors), background loops, failure watch and graceful stop.

A service's `__main__` loads its config and hands the runner a spec and a `build` coroutine
that only builds the service's own parts:

    async def build(rt: Runtime) -> None:
        model = await rt.blocking(load_model, cfg.model)      # never on the event loop
        add_MyServiceServicer_to_server(MyServicer(model, rt.metrics), rt.grpc)
        rt.start_loop(SomeKafkaLoop(...))                      # watched; stopped on exit
        rt.on_stop(model.close)                                # cleanups, last added first

    service.run(ServiceSpec("mine", cfg.server, [SERVICE_NAME], MyMetrics), build)

The gRPC port is bound before `build` runs, so nothing else can take it while models load;
health answers SERVING only once `build` has returned and every readiness condition added
with `rt.ready_when` holds (for example: weights caught up, broker reachable). If a background loop dies, the
service turns NOT_SERVING and exits 1 so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import grpc
from prometheus_client import CollectorRegistry

from . import metrics as metrics_mod
from .config import ConfigError, ServerConfig
from .grpc_server import Server, setup_logging
from .loops import BackgroundLoop, first_error

log = logging.getLogger(__name__)


@dataclass
class ServiceSpec:
    name: str  # short name, e.g. "policy": the log prefix
    server: ServerConfig
    grpc_services: list[str]  # full names of the gRPC services, for health and reflection
    metrics: Callable[[CollectorRegistry], metrics_mod.RpcMetrics]
    # Run inside the error interceptor, so what they raise is mapped and counted (e.g. auth).
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    grace_s: float = 5.0
    join_timeout_s: float = 30.0
    config: list[Any] = field(default_factory=list)  # logged at start
    # Largest gRPC request accepted (bytes); larger ones get RESOURCE_EXHAUSTED unread.
    max_request_bytes: int = 4 << 20


class Runtime:
    """What a service's `build` gets: the registry, its metrics, the bound server, and hooks
    for blocking work, background loops and cleanups."""

    def __init__(self, spec: ServiceSpec, registry: CollectorRegistry, metrics, server: Server):
        self.spec, self.registry, self.metrics, self.server = spec, registry, metrics, server
        self.loop = asyncio.get_running_loop()
        self.loops: list[BackgroundLoop] = []
        self._cleanups: list[Callable[[], Any]] = []
        self._watches: list[Callable[[], BaseException | None]] = []
        self._readiness: list[Callable[[], str | None]] = []
        self._stopped = False

    @property
    def grpc(self) -> grpc.aio.Server:
        """The grpc.aio server to add servicers to."""
        return self.server.server

    async def blocking(self, fn: Callable, *args, **kwargs):
        """Run blocking work (model loads, Kafka clients) in a worker thread."""
        return await self.loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))

    def start_loop(self, t: BackgroundLoop) -> BackgroundLoop:
        """Start a background loop; its death stops the service, and it is stopped on exit."""
        self.loops.append(t)
        t.start()
        return t

    def watch(self, check: Callable[[], BaseException | None]) -> None:
        """Another failure source: the service stops when `check` returns an exception."""
        self._watches.append(check)

    def ready_when(self, check: Callable[[], str | None]) -> None:
        """A readiness condition: `check` returns why the service cannot serve now, or None.
        Health is SERVING only while every condition holds (polled twice a second)."""
        self._readiness.append(check)

    def not_ready(self) -> str | None:
        return next((why for c in self._readiness if (why := c()) is not None), None)

    def on_stop(self, fn: Callable[[], Any]) -> None:
        """A cleanup (plain or async) run at stop after the loops have ended, last added first."""
        self._cleanups.append(fn)

    def first_error(self) -> BaseException | None:
        return first_error(self.loops) or next((e for w in self._watches if (e := w()) is not None), None)

    async def stop_loops(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for t in self.loops:
            t.stop()
        for t in self.loops:
            await self.blocking(t.join, self.spec.join_timeout_s)
            if t.is_alive():
                log.warning("%s did not stop within %.0fs", t.name, self.spec.join_timeout_s)

    async def cleanup(self) -> None:
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                res = fn()
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.exception("cleanup %r failed", fn)


async def serve(spec: ServiceSpec, build: Callable[[Runtime], Awaitable[None]]) -> None:
    registry = CollectorRegistry()
    metrics = spec.metrics(registry)
    metrics_mod.serve(spec.server.metrics_port, registry, spec.server.host)
    server = Server(spec.server.host, spec.server.port, spec.grpc_services, metrics, spec.interceptors,
                    max_request_bytes=spec.max_request_bytes, credentials=spec.server.grpc_credentials())
    rt = Runtime(spec, registry, metrics, server)
    try:
        await build(rt)
        await server.run(on_stop=rt.stop_loops, grace_s=spec.grace_s, watch=rt.first_error, ready=rt.not_ready)
    finally:
        await rt.stop_loops()
        await rt.cleanup()


def cli(main: Callable[[], None], name: str) -> None:
    """Run a service's `main`: a configuration error ends it with one line that names the
    variable and its value (exit status 2), not a traceback."""
    try:
        main()
    except ConfigError as e:
        print(f"{name}: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run(spec: ServiceSpec, build: Callable[[Runtime], Awaitable[None]]) -> None:
    """Run a service until SIGTERM/SIGINT (exit 0) or a background failure (exit 1)."""
    setup_logging(spec.name)
    for c in spec.config:
        log.info("config: %s", c)
    asyncio.run(serve(spec, build))
