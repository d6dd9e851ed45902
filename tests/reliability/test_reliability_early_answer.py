"""An upload the service refuses before reading it, through the real gateway in production mode.

In production the service runs under waitress, whose ``max_request_body_size`` is the
service's upload limit (50 MiB) plus 1 MiB. waitress refuses a body over it as soon as it has
read the request head: it answers its JSON 413 and closes, while the gateway is still
sending the body. That 413 must reach the client, at once and as the child's answer:

* a client that sends its whole 60 MB body (reading meanwhile, as curl and browsers do) gets
  the child's 413, not the gateway's ``502 Bad gateway`` (what it got before: the upstream
  write failed and the answer already received was thrown away);
* a client that declares 60 MB, sends 1 MB and stalls gets that 413 within a second or two,
  not the gateway's 408 after its 60 s body stall timeout (before: the answer was only read
  once the whole body had been sent);
* the worker's health does not suffer: no ERROR line in the gateway's log, the worker stays
  ready and is not health-checked because of it (``--health-interval 60000``: no periodic
  check during the test, so any check would be one the proxy asked for).
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any, Dict, Optional

import pytest

from rel_helpers import ERROR_KEYS, multipart

pytestmark = pytest.mark.integration

SIXTY_MB = 60_000_000
#: waitress's limit for the service (max_upload + 1 MiB), named in its refusal.
WAITRESS_LIMIT = 50 * 1024 * 1024 + 2 ** 20


def production_gateway(gateways: Any) -> Any:
    return gateways(["--mode", "production", "--workers", "1", "--health-interval", "60000"],
                    timeout=60.0)


def upload(port: int, body: bytes, content_type: str, declared: Optional[int] = None,
           timeout: float = 30.0) -> Dict[str, Any]:
    """POST ``body`` to /api/deepfake/analyze from a second thread while reading the answer
    (as curl does). Returns status, headers, body, seconds until the head arrived and until
    the gateway closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = ("POST /api/deepfake/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\n"
            "Content-Length: %d\r\n\r\n" % (content_type, len(body) if declared is None
                                            else declared)).encode()
    started = time.monotonic()

    def send() -> None:
        try:
            sock.sendall(head)
            view = memoryview(body)
            for i in range(0, len(view), 1 << 20):
                sock.sendall(view[i:i + (1 << 20)])
        except OSError:
            pass  # the gateway stops reading once it has answered

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    answered = closed_at = None
    try:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except socket.timeout:
                break
            if not chunk:
                closed_at = time.monotonic() - started
                break
            data += chunk
            if answered is None and b"\r\n\r\n" in data:
                answered = time.monotonic() - started
    finally:
        sock.close()
        sender.join(10)
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/") else None
    return {"status": status, "headers": headers, "body": payload, "answered": answered,
            "closed_at": closed_at}


def assert_childs_413(got: Dict[str, Any]) -> None:
    assert got["status"] == 413, got
    data = json.loads(got["body"])
    assert ERROR_KEYS <= set(data), data
    # waitress's refusal (the service's JSON error shape), not the gateway's own 413
    assert "max_body of %d" % WAITRESS_LIMIT in data["message"], data
    assert got["headers"].get("server") == "waitress", got["headers"]
    assert got["headers"].get("connection") == "close", got["headers"]


def health_snapshot(gw: Any) -> Dict[str, Any]:
    service = gw.status()["service"]
    return {"state": service["state"], "restarts": service["restarts"],
            "workers": [w["state"] for w in service["workers"]],
            "last_health_check": service["last_health_check"]}


def assert_health_untouched(gw: Any, before: Dict[str, Any]) -> None:
    after = health_snapshot(gw)
    assert after == before, (before, after)
    assert after["state"] == "ready" and after["workers"] == ["ready"]
    log = gw.log()
    assert " ERROR " not in log, log[-3000:]
    assert " 502 " not in log and " 408 " not in log, log[-3000:]


def test_upload_over_the_service_limit_gets_the_childs_413(gateways):
    gw = production_gateway(gateways)
    before = health_snapshot(gw)
    body, ctype = multipart({}, {"file": ("big.bin", b"\xff\xd8" + b"\x5a" * SIXTY_MB,
                                          "image/jpeg")})
    for _ in range(3):
        got = upload(gw.port, body, ctype)
        assert_childs_413(got)
        assert got["answered"] < 10, got
    # the same with http.client, which sends the whole body before it reads
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request("POST", "/api/deepfake/analyze", body=body,
                     headers={"Content-Type": ctype})
        response = conn.getresponse()
        assert response.status == 413
        assert "max_body" in json.loads(response.read())["message"]
    finally:
        conn.close()
    assert_health_untouched(gw, before)
    # and the worker still answers: a small request goes through
    assert gw.get("/api/deepfake/stats").status == 200


def test_stalled_upload_gets_the_childs_413_at_once(gateways):
    """60 MB declared, 1 MB sent, then nothing: the 413 comes while the client is still
    stalled (measured: a few ms; before the fix, a 408 from the gateway after 60 s)."""
    gw = production_gateway(gateways)
    before = health_snapshot(gw)
    got = upload(gw.port, b"\x5a" * (1 << 20), "image/jpeg", declared=SIXTY_MB, timeout=20)
    assert_childs_413(got)
    assert got["answered"] is not None and got["answered"] < 10, got
    # then the gateway closes the connection (after at most its 2 s linger)
    assert got["closed_at"] is not None and got["closed_at"] < 10, got
    assert_health_untouched(gw, before)
