"""The shared REST front: error bodies and statuses, body limits, and an OpenAPI page that
needs nothing from the internet."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from rlhf_common.auth import ApiKeys
from rlhf_common.errors import InvalidInput
from rlhf_common.metrics import HttpMetrics
from rlhf_http.app import make_app, require_key


class Body(BaseModel):
    n: int


def _client(keys: list[str] = ()) -> tuple[TestClient, CollectorRegistry]:
    reg = CollectorRegistry()
    app = make_app("Thing", "A test service.", reg, HttpMetrics("rlhf_thing", reg), max_body_bytes=1024)

    @app.post("/v1/thing", dependencies=[require_key(ApiKeys(list(keys)))])
    async def thing(body: Body) -> dict:
        if body.n < 0:
            raise InvalidInput(f"n={body.n}: must be >= 0")
        return {"n": body.n}

    return TestClient(app), reg


def test_docs_page_uses_only_local_assets():
    client, _ = _client()
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']?([^"'\s>]+)""", page.text) + re.findall(r"url: ?'([^']+)'", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 10_000
    assert "/v1/thing" in client.get("/openapi.json").json()["paths"]


def test_errors_share_one_body_shape_and_are_counted():
    client, reg = _client(keys=["secret-key-1"])
    auth = {"Authorization": "Bearer secret-key-1"}
    assert client.post("/v1/thing", json={"n": 1}, headers=auth).json() == {"n": 1}
    r = client.post("/v1/thing", json={"n": -1}, headers=auth)
    assert r.status_code == 400 and r.json() == {"error": {"status": 400, "message": "n=-1: must be >= 0"}}
    r = client.post("/v1/thing", json={"n": "x"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("n:")
    r = client.post("/v1/thing", json={"n": 1})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = client.post("/v1/thing", content=b'{"n": 1, "pad": "' + b"x" * 2000 + b'"}', headers=auth)
    assert r.status_code == 413
    assert reg.get_sample_value("rlhf_thing_http_requests_total", {"route": "/v1/thing", "status": "400"}) == 2
    assert reg.get_sample_value("rlhf_thing_http_requests_total", {"route": "unmatched", "status": "413"}) == 1
