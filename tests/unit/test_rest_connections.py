"""The REST front's connection limits, on a real uvicorn server and raw sockets: a client
that sends nothing, half its headers, or a Content-Length with no body is cut off on time;
oversized headers are refused; a client that leaves mid-body is counted as 499, not 500."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from rlhf_common.auth import ApiKeys
from rlhf_common.metrics import HttpMetrics
from rlhf_devstack.stack import free_port
from rlhf_http.app import make_app
from rlhf_http.server import rest_server


class Body(BaseModel):
    n: int


@pytest.fixture(scope="module")
def server():
    reg = CollectorRegistry()
    app = make_app("Thing", "A test service.", reg, HttpMetrics("rlhf_thing", reg), max_body_bytes=4096,
                   keys=ApiKeys(["secret-key-1"]))

    @app.post("/v1/thing")
    async def thing(body: Body) -> dict:
        return {"n": body.n}

    port = free_port()
    rest = rest_server(app, "127.0.0.1", port, header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1.0,
                       max_header_bytes=8192)
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(rest.serve(),), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not rest.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield port, reg
    rest.should_exit = True
    t.join(10)


def _closed_after(port: int, send: bytes, limit_s: float = 6.0) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it answered."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(limit_s)
    t0 = time.monotonic()
    if send:
        s.sendall(send)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except socket.timeout:
        pytest.fail(f"connection still open after {limit_s}s (sent {send[:60]!r})")
    finally:
        s.close()
    return time.monotonic() - t0, got


AUTH = b"Authorization: Bearer secret-key-1\r\n"


@pytest.mark.parametrize("name,send", [
    ("nothing at all", b""),
    ("partial headers", b"POST /v1/thing HTTP/1.1\r\nHost: x\r\n"),
    ("content-length without a body", b"POST /v1/thing HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"n\""),
])
def test_slow_or_silent_clients_are_cut_off(server, name, send):
    port, _ = server
    took, answer = _closed_after(port, send)
    assert 0.8 < took < 4.0, (name, took)
    assert b"HTTP/1.1 200" not in answer


def test_idle_kept_alive_connection_is_closed(server):
    port, _ = server
    request = (b"POST /v1/thing HTTP/1.1\r\nHost: x\r\n" + AUTH +
               b"Content-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"n\": 1}")
    took, answer = _closed_after(port, request)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"n":1}')
    assert 0.8 < took < 4.0


def test_oversized_headers_are_refused(server):
    port, _ = server
    _, answer = _closed_after(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")


def test_auth_comes_before_the_body_and_duplicates_are_refused(server):
    port, _ = server
    for headers in (b"", b"Authorization: Bearer wrong-key-9\r\n", AUTH + AUTH):
        body = b"{not json"
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/thing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers +
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = s.recv(65536)
        s.close()
        assert answer.startswith(b"HTTP/1.1 401"), (headers, answer[:200])
    # With one good key the same body is the caller's error.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/thing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + AUTH +
              b"Content-Type: application/json\r\nContent-Length: 9\r\n\r\n{not json")
    assert s.recv(65536).startswith(b"HTTP/1.1 400")
    s.close()


def test_no_redirect_built_from_the_host_header(server):
    port, _ = server
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/thing/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n" + AUTH +
              b"Content-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"n\": 1}")
    answer = s.recv(65536)
    s.close()
    assert answer.startswith(b"HTTP/1.1 404") and b"evil.example" not in answer


def test_client_leaving_mid_body_is_not_a_server_error(server):
    port, reg = server
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/thing HTTP/1.1\r\nHost: x\r\n" + AUTH +
              b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"n\":")
    time.sleep(0.2)
    s.close()
    deadline = time.monotonic() + 5
    while reg.get_sample_value("rlhf_thing_http_requests_total", {"route": "unmatched", "status": "499"}) is None:
        assert time.monotonic() < deadline, "the abandoned request was not counted"
        time.sleep(0.05)
    assert reg.get_sample_value("rlhf_thing_http_requests_total", {"route": "unmatched", "status": "500"}) is None
