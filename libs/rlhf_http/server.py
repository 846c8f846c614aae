"""uvicorn inside a service's own event loop (beside grpc.aio), started and stopped by the
service runner.

Connections are bounded in time and size, so that a client cannot hold one open for free:
- the request line and headers must arrive within `header_timeout_s` of the connection
  opening (or of the first byte of a later request on a kept-alive connection);
- the declared body must arrive within `body_timeout_s` of the headers;
- an idle kept-alive connection is closed after `keep_alive_s`;
- the request line and headers together may take `max_header_bytes` (larger: 400 and close).
The pure-Python h11 parser is used, since it enforces the header limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from rlhf_common.service import Runtime

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5.0
MAX_HEADER_BYTES = 32 * 1024


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines for the headers and the body of each request."""

    header_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    max_header_bytes = MAX_HEADER_BYTES

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._guard: asyncio.TimerHandle | None = None
        self._guarding: str | None = None
        self._arm("headers", self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            # h11 bounds only headers that arrive in pieces; count complete ones too.
            head = self.conn.trailing_data[0] + data
            end = head.find(b"\r\n\r\n")
            if (end if end >= 0 else len(head)) > self.max_header_bytes:
                self._disarm()
                self.send_400_response(f"Request line and headers exceed {self.max_header_bytes} bytes")
                return
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Arm the deadline that fits where the client is in its request."""
        state = self.conn.their_state
        if state is h11.IDLE:
            # Between requests uvicorn's keep-alive timer watches an idle connection; once a
            # byte of the next request has arrived, its headers have their deadline.
            if self.conn.trailing_data[0] and self._guarding != "headers":
                self._arm("headers", self.header_timeout_s)
        elif state is h11.SEND_BODY:
            if self._guarding != "body":
                self._arm("body", self.body_timeout_s)
        else:
            self._disarm()

    def _arm(self, what: str, delay: float) -> None:
        self._disarm()
        self._guarding = what
        self._guard = self.loop.call_later(delay, self._expire, what)

    def _disarm(self) -> None:
        if getattr(self, "_guard", None) is not None:
            self._guard.cancel()
        self._guard, self._guarding = None, None

    def _expire(self, what: str) -> None:
        self._guard, self._guarding = None, None
        if not self.transport.is_closing():
            log.info("closing a connection from %s: its request %s did not arrive in time",
                     "%s:%d" % self.client if self.client else "?", what)
            self.transport.close()


class RestServer(uvicorn.Server):
    """The gRPC server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def rest_server(app: FastAPI, host: str, port: int, header_timeout_s: float = HEADER_TIMEOUT_S,
                body_timeout_s: float = BODY_TIMEOUT_S, keep_alive_s: float = KEEP_ALIVE_S,
                max_header_bytes: int = MAX_HEADER_BYTES) -> RestServer:
    protocol = type("Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s,
                                                        "body_timeout_s": body_timeout_s,
                                                        "max_header_bytes": max_header_bytes})
    return RestServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                     access_log=False, timeout_graceful_shutdown=5, http=protocol,
                                     timeout_keep_alive=keep_alive_s, h11_max_incomplete_event_size=max_header_bytes,
                                     server_header=False))


async def start_rest(rt: Runtime, app: FastAPI, host: str, port: int, **limits) -> None:
    """Serve `app` on host:port in the running loop until the service stops; `limits` are
    `rest_server`'s timeouts and header limit."""
    rest = rest_server(app, host, port, **limits)
    task = asyncio.create_task(rest.serve(), name="rest")
    while not rest.started:
        if task.done():  # e.g. the port is taken
            task.result()
            raise SystemExit(f"REST server on {host}:{port} did not start")
        await asyncio.sleep(0.05)

    async def stop() -> None:
        rest.should_exit = True
        await task

    rt.on_stop(stop)
    log.info("REST listening on http://%s:%d (OpenAPI page at /docs)", host, port)
