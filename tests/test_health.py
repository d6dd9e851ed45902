"""health: judging answers, one check through a fake HTTP client, the startup wait with a fake
clock, and the periodic monitor."""
import asyncio
import json
import types

import pytest
from tornado.httpclient import HTTPClientError

from tornado_gateway.supervisor.health import (HEALTH_PATH, HealthChecker, HealthMonitor, HealthResult,
                                    judge_response, wait_until_healthy)

GOOD = json.dumps({"training_samples": 3, "model_loaded": True,
                   "last_updated": "2024-01-01T00:00:00Z"}).encode()


@pytest.mark.parametrize("code,body,ok,detail", [
    (200, GOOD, True, "ok (model_loaded=True, training_samples=3)"),
    (500, GOOD, False, "HTTP 500"),
    (404, b"", False, "HTTP 404"),
    (200, b"<html>", False, "not JSON"),
    (200, b"\xff\xfe", False, "not JSON"),
    (200, b"[1, 2]", False, "not an object"),
    (200, b'{"training_samples": 1, "model_loaded": false}', False, "lacks last_updated"),
    (200, b"{}", False, "lacks training_samples, model_loaded, last_updated"),
])
def test_judge_response(code, body, ok, detail):
    got_ok, got_detail = judge_response(code, body)
    assert got_ok is ok and detail in got_detail


class FakeClient:
    def __init__(self, outcome):
        self.outcome = outcome
        self.requests = []
        self.closed = False

    async def fetch(self, request, raise_error=True):
        self.requests.append((request, raise_error))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        code, body = self.outcome
        return types.SimpleNamespace(code=code, body=body)

    def close(self):
        self.closed = True


def run_check(outcome, base="http://127.0.0.1:5001/"):
    client = FakeClient(outcome)
    ticks = iter([10.0, 10.25])
    checker = HealthChecker(base, 2.0, client=client, clock=lambda: next(ticks))
    result = asyncio.run(checker.check())
    return checker, client, result


def test_check_ok_builds_the_request():
    checker, client, result = run_check((200, GOOD))
    assert result.ok and not result.refused and result.latency_ms == 250.0
    request, raise_error = client.requests[0]
    assert request.url == "http://127.0.0.1:5001" + HEALTH_PATH == checker.url
    assert request.method == "GET" and raise_error is False
    assert request.request_timeout == 2.0 and request.connect_timeout == 2.0
    assert request.follow_redirects is False


def test_check_bad_status():
    _, _, result = run_check((503, b"busy"))
    assert not result.ok and "HTTP 503" in result.detail and not result.refused


def test_check_refused():
    _, _, result = run_check(ConnectionRefusedError(111, "refused"))
    assert not result.ok and result.refused and "refused" in result.detail


def test_check_timeout():
    _, _, result = run_check(HTTPClientError(599, "Timeout"))
    assert not result.ok and "timed out" in result.detail and not result.refused


def test_check_other_os_error_counts_as_refused():
    _, _, result = run_check(OSError(113, "No route to host"))
    assert not result.ok and result.refused and "No route" in result.detail


def test_close_closes_own_client():
    checker, client, _ = run_check((200, GOOD))
    checker.close()
    assert client.closed and checker._client is None
    checker.close()  # twice is fine


def test_default_client_is_a_separate_instance():
    from tornado.httpclient import AsyncHTTPClient

    async def main():
        checker = HealthChecker("http://127.0.0.1:1", 1.0)
        shared = AsyncHTTPClient()
        assert checker.client is not shared
        checker.close()

    asyncio.run(main())


# --- wait_until_healthy ---------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def scripted(results, clock=None, step=0.0):
    calls = []

    async def check():
        calls.append(1)
        if clock is not None:
            clock.now += step
        ok = results[min(len(calls) - 1, len(results) - 1)]
        return HealthResult(ok, "ok" if ok else "fail", 0.0)

    return check, calls


def test_wait_succeeds_after_failures():
    check, calls = scripted([False, False, True])
    seen = []
    result = asyncio.run(wait_until_healthy(check, 0.0, 5, 10.0, on_result=seen.append))
    assert result is not None and result.ok and len(calls) == 3
    assert [r.ok for r in seen] == [False, False, True]


def test_wait_gives_up_after_retries():
    check, calls = scripted([False])
    assert asyncio.run(wait_until_healthy(check, 0.0, 4, 10.0)) is None
    assert len(calls) == 4


def test_wait_gives_up_at_the_timeout():
    clock = Clock()
    check, calls = scripted([False], clock, step=1.0)
    assert asyncio.run(wait_until_healthy(check, 0.0, 100, 3.0, clock=clock)) is None
    assert len(calls) == 3


def test_wait_stops_when_child_is_gone():
    check, calls = scripted([False])
    alive = iter([True, True, False])
    assert asyncio.run(wait_until_healthy(check, 0.0, 100, 10.0,
                                          alive=lambda: next(alive))) is None
    assert len(calls) == 2


def test_wait_sleeps_the_interval_between_checks():
    check, calls = scripted([False, True])

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await wait_until_healthy(check, 0.05, 5, 10.0)
        return loop.time() - t0

    assert asyncio.run(main()) >= 0.045


def test_poke_checks_at_once_and_does_not_count_as_a_retry():
    async def main():
        poked = asyncio.Event()
        calls = []

        async def check():
            calls.append(asyncio.get_running_loop().time())
            if len(calls) <= 3:
                # the child prints something while its first checks fail
                asyncio.get_running_loop().call_soon(poked.set)
            return HealthResult(len(calls) == 4, "x", 0.0)

        t0 = asyncio.get_running_loop().time()
        # retries=2: without the "extra" rule, the second failing check would end the wait
        result = await wait_until_healthy(check, 10.0, 2, 60.0, poked=poked)
        return result, calls, asyncio.get_running_loop().time() - t0

    result, calls, took = asyncio.run(main())
    assert result is not None and result.ok
    assert len(calls) == 4
    assert took < 10.0  # the pokes cut the 10 s interval


def test_a_poke_during_a_failing_check_is_not_lost():
    async def main():
        poked = asyncio.Event()
        calls = []

        async def check():
            calls.append(1)
            if len(calls) == 1:
                poked.set()  # the child says "listening" while the first connect is refused
                await asyncio.sleep(0)
            return HealthResult(len(calls) == 2, "x", 0.0)

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await wait_until_healthy(check, 5.0, 3, 60.0, poked=poked)
        return result, len(calls), loop.time() - t0

    result, n, took = asyncio.run(main())
    assert result is not None and result.ok and n == 2
    assert took < 1.0  # the second check followed the poke, not the 5 s interval


# --- HealthMonitor -------------------------------------------------------------------------

def test_monitor_reports_every_tick_and_stops():
    async def main():
        results = []
        check, calls = scripted([True, False, True])
        mon = HealthMonitor(check, 0.005, results.append)
        assert not mon.running
        mon.start()
        assert mon.running
        while len(results) < 3:
            await asyncio.sleep(0.005)
        mon.stop()
        n = len(calls)
        await asyncio.sleep(0.03)
        return [r.ok for r in results[:3]], n, len(calls), mon.running

    oks, before, after, running = asyncio.run(main())
    assert oks == [True, False, True] and before == after and not running


def test_monitor_skips_a_tick_while_a_check_is_in_flight():
    async def main():
        gate = asyncio.Event()
        calls = []

        async def slow():
            calls.append(1)
            await gate.wait()
            return HealthResult(True, "ok", 0.0)

        results = []
        mon = HealthMonitor(slow, 1000.0, results.append)
        mon.start()
        first = asyncio.ensure_future(mon.check_now())
        await asyncio.sleep(0)
        assert await mon.check_now() is None  # busy: not doubled
        gate.set()
        r = await first
        mon.stop()
        return calls, results, r

    calls, results, r = asyncio.run(main())
    assert len(calls) == 1 and r.ok and results == [r]


def test_monitor_not_running_does_not_report():
    async def main():
        results = []
        check, _ = scripted([True])
        mon = HealthMonitor(check, 1.0, results.append)
        r = await mon.check_now()
        return r, results

    r, results = asyncio.run(main())
    assert r.ok and results == []
