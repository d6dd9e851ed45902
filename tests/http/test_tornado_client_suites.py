"""Tornado's own HTTP client test suites, run against the gateway's upstream client.

``tornado.test.httpclient_test.HTTPClientCommonTestCase`` (what every ``AsyncHTTPClient``
implementation is expected to do) and the classes of ``tornado.test.simple_httpclient_test``
that test client behaviour (connection limits and queueing, timeouts, body producers,
``100-continue``, 1xx, 204/304/HEAD, limits, TLS, hostname mapping, malformed framing) are run
with :class:`~tornado_gateway.http.client.UpstreamHTTPClient` in place of Tornado's clients.

They run in a subprocess under ``unittest`` (Tornado's suites are ``unittest`` test cases that
configure ``AsyncHTTPClient`` process-wide: nothing of that may leak into this pytest process).
The ids of the tests that fail or error are compared with ``tornado_client_deviations.txt``,
which lists each expected deviation with its reason: this test fails when a test outside that
list fails, and also when a listed test passes (the list must stay exact).

``simple_httpclient_test`` names ``SimpleAsyncHTTPClient`` in its test bodies, its ``setUp``
methods and its ``get_http_client`` methods; the subprocess rebinds that module-level name to
the client under test, so those tests build the client under test. Its
``SimpleHTTPClientCommonTestCase`` is not run: it is ``HTTPClientCommonTestCase`` again, which
runs here once, as ``UpstreamHTTPClientCommonTestCase``.

Run by hand (prints the failures, one id a line)::

    python tests/http/test_tornado_client_suites.py [dotted.ClientClass]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Set

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEVIATIONS = os.path.join(HERE, "tornado_client_deviations.txt")
CLIENT = "tornado_gateway.http.client.UpstreamHTTPClient"

#: Classes of simple_httpclient_test run here (each looked at: what it tests is client behaviour,
#: not SimpleAsyncHTTPClient's internals). Not run: SimpleHTTPClientCommonTestCase (the common
#: tests, run once under their own name), SimpleHTTPClientTestMixin (abstract).
SIMPLE_CLASSES = (
    "SimpleHTTPClientTestCase",
    "SimpleHTTPSClientTestCase",
    "CreateAsyncHTTPClientTestCase",
    "HTTP100ContinueTestCase",
    "HTTP1xxLimitTestCase",
    "GzipResponseTestCase",
    "HTTP204NoContentTestCase",
    "HostnameMappingTestCase",
    "ResolveTimeoutTestCase",
    "TLSHandshakeTimeoutTestCase",
    "MaxHeaderSizeTest",
    "SimpleHTTPClientMaxBodySizeTestCase",
    "MaxBodySizeUntilCloseTest",
    "MaxBufferSizeUntilCloseTest",
    "MaxBufferSizeTest",
    "ChunkedWithContentLengthTest",
)


def read_deviations(path: str = DEVIATIONS) -> Dict[str, str]:
    """``{test id: reason}`` from the deviations file (``id  # reason`` lines)."""
    out: Dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            test_id, sep, reason = text.partition("#")
            assert sep and reason.strip(), "deviation without a reason: %r" % line
            out[test_id.strip()] = reason.strip()
    return out


def run_suites(client: str) -> Dict[str, object]:
    """Run the suites in this process (the subprocess side); returns the outcome."""
    import importlib
    import logging
    import unittest

    from tornado.httpclient import AsyncHTTPClient
    from tornado.test import httpclient_test, simple_httpclient_test

    module_name, _, class_name = client.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    AsyncHTTPClient.configure(cls)  # tests that use the default client
    simple_httpclient_test.SimpleAsyncHTTPClient = cls  # type: ignore[attr-defined]

    class UpstreamHTTPClientCommonTestCase(httpclient_test.HTTPClientCommonTestCase):
        def get_http_client(self) -> AsyncHTTPClient:
            return cls(force_instance=True)

    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    suite.addTests(loader.loadTestsFromTestCase(UpstreamHTTPClientCommonTestCase))
    for name in SIMPLE_CLASSES:
        suite.addTests(loader.loadTestsFromTestCase(getattr(simple_httpclient_test, name)))

    class Result(unittest.TestResult):
        def __init__(self) -> None:
            super().__init__()
            self.failed: Set[str] = set()
            self.detail: Dict[str, str] = {}

        def _note(self, test: unittest.TestCase, err: object) -> None:
            test_id = "%s.%s" % (type(test).__name__, test._testMethodName)
            self.failed.add(test_id)
            self.detail.setdefault(test_id, self._exc_info_to_string(err, test)[-800:])

        def addError(self, test, err):  # type: ignore[no-untyped-def]
            super().addError(test, err)
            self._note(test, err)

        def addFailure(self, test, err):  # type: ignore[no-untyped-def]
            super().addFailure(test, err)
            self._note(test, err)

        def addSubTest(self, test, subtest, err):  # type: ignore[no-untyped-def]
            super().addSubTest(test, subtest, err)
            if err is not None:
                self._note(test, err)

    # As Tornado's own runner (tornado.test.runtests): no access log lines. The suites' test
    # cases fail on any other unexpected log record of level INFO or above.
    logging.getLogger("tornado.access").setLevel(logging.CRITICAL)
    result = Result()
    suite.run(result)
    return {"run": result.testsRun, "failed": sorted(result.failed),
            "skipped": sorted("%s.%s" % (type(t).__name__, t._testMethodName)
                              for t, _why in result.skipped),
            "detail": result.detail}


def _subprocess_outcome(client: str = CLIENT) -> Dict[str, object]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", client],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, "suite runner failed:\n%s\n%s" % (
        proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(lines[-1])


@pytest.mark.timeout(240)
def test_tornado_client_suites_fail_exactly_the_listed_deviations() -> None:
    expected = read_deviations()
    outcome = _subprocess_outcome()
    failed: List[str] = outcome["failed"]  # type: ignore[assignment]
    detail: Dict[str, str] = outcome["detail"]  # type: ignore[assignment]
    unexpected = [t for t in failed if t not in expected]
    now_passing = [t for t in expected if t not in failed]
    assert outcome["run"] > 100, outcome["run"]
    assert not unexpected, "tests failing outside the deviation list:\n" + "\n".join(
        "%s\n%s" % (t, detail.get(t, "")) for t in unexpected)
    assert not now_passing, ("listed deviations that pass now (remove them from %s): %s"
                             % (os.path.basename(DEVIATIONS), now_passing))


def test_every_deviation_names_a_real_test() -> None:
    from tornado.test import httpclient_test, simple_httpclient_test

    known: Set[str] = set()
    common = httpclient_test.HTTPClientCommonTestCase
    known.update("UpstreamHTTPClientCommonTestCase." + n for n in dir(common)
                 if n.startswith("test_"))
    for name in SIMPLE_CLASSES:
        klass = getattr(simple_httpclient_test, name)
        known.update("%s.%s" % (name, n) for n in dir(klass) if n.startswith("test_"))
    missing = [t for t in read_deviations() if t not in known]
    assert not missing, missing


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--json"]
    outcome = run_suites(args[0] if args else CLIENT)
    if "--json" in sys.argv:
        print(json.dumps(outcome))
    else:
        for test_id in outcome["failed"]:  # type: ignore[union-attr]
            print(test_id)
        print("run %d, failed %d, skipped %d" % (outcome["run"], len(outcome["failed"]),
                                                 len(outcome["skipped"])), file=sys.stderr)
