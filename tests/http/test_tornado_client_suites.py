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

import os
import sys
from typing import Dict, Set

import pytest

import tornado_suites

HERE = os.path.dirname(os.path.abspath(__file__))
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
    """``{test id: reason}`` from the deviations file."""
    return tornado_suites.read_deviations(path)


def run_suites(client: str) -> Dict[str, object]:
    """Run the suites in this process (the subprocess side); returns the outcome."""
    import importlib
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

    return tornado_suites.run_suite(
        suite, lambda test: "%s.%s" % (type(test).__name__, test._testMethodName))


def _subprocess_outcome(client: str = CLIENT) -> Dict[str, object]:
    return tornado_suites.subprocess_outcome(os.path.abspath(__file__), [client], 180)


@pytest.mark.timeout(240)
def test_tornado_client_suites_fail_exactly_the_listed_deviations() -> None:
    tornado_suites.assert_exactly_the_deviations(_subprocess_outcome(), read_deviations(),
                                                 100, DEVIATIONS)


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
    tornado_suites.main(run_suites, [a for a in sys.argv[1:] if a != "--json"][:1] or [CLIENT])
