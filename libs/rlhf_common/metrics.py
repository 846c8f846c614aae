"""Metric helpers every service shares: the /metrics endpoint, gRPC and REST request metrics, buckets.

Each service defines its own metrics in its `metrics.py`, in a class that takes the registry
to register into, so tests use a fresh CollectorRegistry and read values with get_sample_value."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SYNC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
LAG_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def serve(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> None:
    """Expose /metrics on host:port (port 0 = do not expose); the host is the service's
    configured bind address, so a service bound to loopback does not expose metrics wider."""
    if port:
        start_http_server(port, addr=host, registry=registry)


class RpcMetrics:
    """Request counts by method and status, and latency by method (every service)."""

    def __init__(self, prefix: str, registry: CollectorRegistry):
        self.requests = Counter(f"{prefix}_requests_total", "gRPC requests by method and status code",
                                ["method", "code"], registry=registry)
        self.latency = Histogram(f"{prefix}_request_seconds", "gRPC request latency", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=registry)


class HttpMetrics:
    """REST request counts by route template and status, and latency by route."""

    def __init__(self, prefix: str, registry: CollectorRegistry):
        self.http_requests = Counter(f"{prefix}_http_requests_total", "REST requests by route and HTTP status",
                                     ["route", "status"], registry=registry)
        self.http_latency = Histogram(f"{prefix}_http_request_seconds", "REST request latency", ["route"],
                                      buckets=LATENCY_BUCKETS, registry=registry)
