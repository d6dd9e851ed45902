"""Is the child healthy? The one-shot check, the startup wait, and the periodic monitor.

Health contract: ``GET {flask_url}/api/deepfake/stats`` answers 200 with a JSON object holding
``training_samples``, ``model_loaded`` and ``last_updated``.

The checks use their own HTTP client instance, not the shared one the proxy uses: a proxy
busy with long uploads must not make the health check queue behind it and report a healthy
child as dead.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.ioloop import PeriodicCallback

HEALTH_PATH = "/api/deepfake/stats"
REQUIRED_KEYS = ("training_samples", "model_loaded", "last_updated")
POKE_MIN_GAP_S = 0.01


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str
    latency_ms: float
    at: float = field(default_factory=time.time)  # wall clock, for the status endpoint
    refused: bool = False  # nothing listens yet: the child is still starting (or gone)


def judge_response(code: int, body: bytes) -> tuple:
    """(ok, detail) for a health-check answer: 200 with a JSON object carrying the contract."""
    if code != 200:
        return False, "health check answered HTTP %d" % code
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False, "health check answered 200 but not JSON"
    if not isinstance(data, dict):
        return False, "health check answered JSON that is not an object"
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        return False, "health check JSON lacks %s" % ", ".join(missing)
    return True, "ok (model_loaded=%s, training_samples=%s)" % (
        data.get("model_loaded"), data.get("training_samples"))


class HealthChecker:
    """Performs one health check against ``base_url``."""

    def __init__(self, base_url: str, timeout_s: float,
                 client: Optional[AsyncHTTPClient] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = base_url.rstrip("/") + HEALTH_PATH
        self.timeout_s = timeout_s
        self._client = client
        self._clock = clock

    @property
    def client(self) -> AsyncHTTPClient:
        if self._client is None:
            # force_instance: never the proxy's shared (possibly saturated) client
            self._client = AsyncHTTPClient(force_instance=True)
        return self._client

    async def check(self) -> HealthResult:
        started = self._clock()
        request = HTTPRequest(self.url, method="GET", connect_timeout=self.timeout_s,
                              request_timeout=self.timeout_s, follow_redirects=False,
                              headers={"Accept": "application/json",
                                       "User-Agent": "tornado_gateway-health"})
        try:
            response = await self.client.fetch(request, raise_error=False)
        except ConnectionRefusedError:
            return HealthResult(False, "connection refused (nothing listening yet)",
                                self._elapsed(started), refused=True)
        except HTTPClientError as exc:
            kind = "timed out" if exc.code == 599 else "failed"
            return HealthResult(False, "health check %s: %s" % (kind, exc), self._elapsed(started))
        except OSError as exc:
            return HealthResult(False, "health check failed: %s" % exc, self._elapsed(started),
                                refused=True)
        ok, detail = judge_response(response.code, response.body or b"")
        return HealthResult(ok, detail, self._elapsed(started))

    def _elapsed(self, started: float) -> float:
        return (self._clock() - started) * 1000.0

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


async def wait_until_healthy(
    check: Callable[[], Awaitable[HealthResult]],
    interval_s: float,
    retries: int,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
    poked: Optional[asyncio.Event] = None,
    clock: Callable[[], float] = time.monotonic,
    on_result: Callable[[HealthResult], None] = lambda r: None,
) -> Optional[HealthResult]:
    """Poll ``check`` until it succeeds; return the successful result, or None when
    ``retries`` scheduled checks have failed, ``timeout_s`` has passed, or ``alive()`` says
    the child is gone (design property 2).

    Scheduled checks run ``interval_s`` apart. Setting ``poked`` (the child printed something,
    e.g. "Running on ...") triggers an extra check at once that does not count as a retry, so
    readiness is seen within milliseconds of the child listening instead of up to one
    interval later.
    """
    deadline = clock() + timeout_s
    attempts = 0
    extra = False
    while alive():
        checked_at = clock()
        if poked is not None:
            # cleared before the check, not after: a poke that arrives while the check is in
            # flight ("Running on ..." printed just after a refused connect) must not be lost
            poked.clear()
        result = await check()
        on_result(result)
        if result.ok:
            return result
        if not extra:
            attempts += 1
            if attempts >= retries:
                return None
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        extra = False
        wait = min(interval_s, remaining)
        if poked is not None:
            try:
                await asyncio.wait_for(poked.wait(), wait)
                extra = True
                # a chatty child pokes on every line: at most one extra check per gap
                await asyncio.sleep(max(0.0, POKE_MIN_GAP_S - (clock() - checked_at)))
                continue
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(wait)
    return None


class HealthMonitor:
    """Keeps checking after startup, every ``interval_s``, on a PeriodicCallback.

    ``on_result`` receives every result on the IOLoop; the bridge turns consecutive failures
    into ``unhealthy`` and a success into ``ready``. A check still running when the next tick
    comes is not doubled: that tick is skipped.
    """

    def __init__(self, check: Callable[[], Awaitable[HealthResult]], interval_s: float,
                 on_result: Callable[[HealthResult], None]) -> None:
        self._check = check
        self._on_result = on_result
        self._busy = False
        self._callback = PeriodicCallback(self._tick, interval_s * 1000.0)

    def start(self) -> None:
        self._callback.start()

    def stop(self) -> None:
        self._callback.stop()

    @property
    def running(self) -> bool:
        return self._callback.is_running()

    async def check_now(self) -> Optional[HealthResult]:
        """Run one check now unless one is already in flight (then None)."""
        if self._busy:
            return None
        self._busy = True
        try:
            result = await self._check()
        finally:
            self._busy = False
        if self._callback.is_running():
            self._on_result(result)
        return result

    async def _tick(self) -> None:
        await self.check_now()
