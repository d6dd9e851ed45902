"""The gateway's own routes through the real Application (pytest-tornasync)."""
import json
import os

import pytest

from tornado_gateway import GatewayConfig, PythonBridge, make_app
from tornado_gateway.config import FlaskConfig

JSON_ERROR_KEYS = {"error", "message", "suggestion", "timestamp"}


@pytest.fixture
def bridge():
    # never started: the state stays "idle", and nothing is spawned
    return PythonBridge(FlaskConfig(port=1))


@pytest.fixture
def app(bridge):
    return make_app(bridge, GatewayConfig(mode="production"))


async def test_status_reports_gateway_and_service(http_server_client):
    resp = await http_server_client.fetch("/api/gateway/status")
    assert resp.code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["Cache-Control"] == "no-store"
    data = json.loads(resp.body)
    assert data["gateway"]["mode"] == "production"
    assert data["gateway"]["pid"] == os.getpid()
    service = data["service"]
    assert service["state"] == "idle"
    assert service["ready"] is False
    assert service["pid"] is None
    assert service["url"] == "http://127.0.0.1:1"
    assert service["last_exit"] is None and service["last_health_check"] is None
    assert "not been started" in service["message"]


async def test_status_is_never_a_304(http_server_client):
    first = await http_server_client.fetch("/api/gateway/status")
    again = await http_server_client.fetch(
        "/api/gateway/status", headers={"If-None-Match": first.headers.get("Etag", "*")},
        raise_error=False)
    assert again.code == 200


async def test_deepfake_route_without_child_is_json_503(http_server_client):
    resp = await http_server_client.fetch("/api/deepfake/analyze", method="POST", body=b"x",
                                          raise_error=False)
    assert resp.code == 503
    body = json.loads(resp.body)
    assert set(body) == JSON_ERROR_KEYS
    assert "idle" in body["message"]


async def test_unknown_route_is_json_404(http_server_client):
    resp = await http_server_client.fetch("/nope/here?x=1", raise_error=False)
    assert resp.code == 404
    body = json.loads(resp.body)
    assert set(body) == JSON_ERROR_KEYS
    assert "/nope/here" in body["message"]
    assert "/api/deepfake/" in body["suggestion"]


async def test_wrong_method_on_status_is_json_405(http_server_client):
    resp = await http_server_client.fetch("/api/gateway/status", method="DELETE",
                                          raise_error=False)
    assert resp.code == 405
    body = json.loads(resp.body)
    assert set(body) == JSON_ERROR_KEYS
    assert resp.headers["Allow"] == "GET" and "Use GET" in body["suggestion"]
    assert body["error"] == "Method not allowed"


async def test_wrong_method_on_the_page_is_json_405_with_allow(http_server_client):
    resp = await http_server_client.fetch("/", method="POST", body=b"x", raise_error=False)
    assert resp.code == 405 and resp.headers["Allow"] == "GET, HEAD"
    assert set(json.loads(resp.body)) == JSON_ERROR_KEYS


async def test_index_page_is_served(http_server_client):
    resp = await http_server_client.fetch("/")
    assert resp.code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert b"<html" in resp.body.lower()


async def test_static_assets_are_served(http_server_client):
    names = [n for n in os.listdir(os.path.join(os.path.dirname(__file__), "..",
                                                "tornado_gateway", "static"))
             if n.endswith((".js", ".css"))]
    assert names, "the web page ships its script and style"
    for name in names:
        resp = await http_server_client.fetch("/static/" + name)
        assert resp.code == 200 and resp.body


async def test_static_path_traversal_is_refused(http_server_client):
    resp = await http_server_client.fetch("/static/../__init__.py", raise_error=False)
    assert resp.code in (403, 404)
    assert b"__version__" not in resp.body


async def test_head_of_the_page_is_its_get_without_body(http_server_client):
    get = await http_server_client.fetch("/")
    head = await http_server_client.fetch("/", method="HEAD")
    assert head.code == 200 and head.body == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert int(head.headers["Content-Length"]) == len(get.body)


async def test_status_uptime_counts_from_when_the_routes_were_made(http_server_client,
                                                                   monkeypatch):
    import types

    import tornado_gateway.app as app_module

    first = json.loads((await http_server_client.fetch("/api/gateway/status")).body)
    real = app_module.time.monotonic
    # the module's clock an hour later (only the module's: the event loop keeps its own)
    monkeypatch.setattr(app_module, "time", types.SimpleNamespace(monotonic=lambda: real() + 3600))
    later = json.loads((await http_server_client.fetch("/api/gateway/status")).body)
    assert 0 <= first["gateway"]["uptime_s"] < 3600
    assert 3600 <= later["gateway"]["uptime_s"] < 3600 + 60
