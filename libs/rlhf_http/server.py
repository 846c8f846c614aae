"""uvicorn inside a service's own event loop (beside grpc.aio), started and stopped by the
service runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn
from fastapi import FastAPI

from rlhf_common.service import Runtime

log = logging.getLogger(__name__)


class RestServer(uvicorn.Server):
    """The gRPC server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def rest_server(app: FastAPI, host: str, port: int) -> RestServer:
    return RestServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                     access_log=False, timeout_graceful_shutdown=5))


async def start_rest(rt: Runtime, app: FastAPI, host: str, port: int) -> None:
    """Serve `app` on host:port in the running loop until the service stops."""
    rest = rest_server(app, host, port)
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
