"""Tornado's own server test suites, run against the gateway's HTTP server.

``tornado.test.httpserver_test`` (what ``HTTPServer`` does on the wire) and
``tornado.test.web_test`` (``RequestHandler`` and ``Application`` as served) are run with
``AsyncHTTPTestCase.get_http_server`` patched to serve each test's application with
:class:`~tornado_gateway.http.server.GatewayHTTPServer` instead of Tornado's ``HTTPServer``.
The options a test asks its server for (``get_httpserver_options``) are passed on where the
gateway's server has them (``max_body_size``, ``max_header_size``, ``body_timeout``,
``chunk_size``, ``no_keep_alive``; ``idle_connection_timeout`` is its ``head_timeout``); the
others (``xheaders``, ``protocol``, ``decompress_request``, TLS) it does not have, and the
tests that depend on them are listed deviations.

The suites run in a subprocess under ``unittest`` (the patch must not leak into this pytest
process). Only the test cases served through ``get_http_server`` are run (the
``AsyncHTTPTestCase`` subclasses: the others build their own ``HTTPServer`` or none and test
nothing of this server). The ids of the tests that fail or error are compared with
``tornado_server_deviations.txt``, which lists each expected deviation with its reason: this
test fails when a test outside that list fails, and also when a listed test passes (the list
must stay exact). Test classes that cannot run here at all (they need a TLS server) are
listed there too, as ``module.Class``, and are not run.

Run by hand (prints the failures, one id a line; ``--tornado`` runs Tornado's own server)::

    python tests/http/test_tornado_server_suites.py [--tornado]
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Tuple

import pytest

import tornado_suites

HERE = os.path.dirname(os.path.abspath(__file__))
DEVIATIONS = os.path.join(HERE, "tornado_server_deviations.txt")
MODULES = ("httpserver_test", "web_test")

#: get_httpserver_options() names -> GatewayHTTPServer's keyword arguments.
OPTIONS = {"max_body_size": "max_body_size", "max_header_size": "max_header_size",
           "body_timeout": "body_timeout", "chunk_size": "chunk_size",
           "no_keep_alive": "no_keep_alive", "idle_connection_timeout": "head_timeout"}


def read_deviations(path: str = DEVIATIONS) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``({module.Class.test: reason}, {module.Class: reason})`` from the deviations file:
    the tests expected to fail, and the classes not run."""
    listed = tornado_suites.read_deviations(path)
    tests = {k: v for k, v in listed.items() if k.count(".") == 2}
    return tests, {k: v for k, v in listed.items() if k.count(".") != 2}


def _served_classes(skip: Dict[str, str]) -> List[Tuple[str, Any]]:
    """``(module.Class, class)`` of every test case served through get_http_server, but the
    classes not run."""
    import importlib
    import unittest

    from tornado.testing import AsyncHTTPTestCase

    out = []
    for module_name in MODULES:
        module = importlib.import_module("tornado.test." + module_name)
        for name in sorted(dir(module)):
            klass = getattr(module, name)
            if not (isinstance(klass, type) and issubclass(klass, AsyncHTTPTestCase)) \
                    or klass.__module__ != module.__name__:
                continue
            if not unittest.TestLoader().getTestCaseNames(klass):
                continue  # a base class without tests of its own
            class_id = "%s.%s" % (module_name, name)
            if class_id not in skip:
                out.append((class_id, klass))
    return out


def run_suites(tornado_server: bool = False) -> Dict[str, object]:
    """Run the suites in this process (the subprocess side); returns the outcome."""
    import unittest

    from tornado.testing import AsyncHTTPTestCase

    from tornado_gateway.http.server import GatewayHTTPServer

    if not tornado_server:
        def get_http_server(self: AsyncHTTPTestCase) -> GatewayHTTPServer:
            options = self.get_httpserver_options()
            return GatewayHTTPServer(self._app, **{  # type: ignore[attr-defined]
                OPTIONS[k]: v for k, v in options.items() if k in OPTIONS})

        AsyncHTTPTestCase.get_http_server = get_http_server  # type: ignore[assignment]

    _tests, skip = read_deviations()
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    prefix: Dict[type, str] = {}
    for class_id, klass in _served_classes(skip):
        prefix[klass] = class_id
        suite.addTests(loader.loadTestsFromTestCase(klass))

    def test_id(test: unittest.TestCase) -> str:
        return "%s.%s" % (prefix.get(type(test), type(test).__name__), test._testMethodName)

    return tornado_suites.run_suite(suite, test_id)


def _subprocess_outcome() -> Dict[str, object]:
    return tornado_suites.subprocess_outcome(os.path.abspath(__file__), [], 240)


@pytest.mark.timeout(300)
def test_tornado_server_suites_fail_exactly_the_listed_deviations() -> None:
    expected, _classes = read_deviations()
    tornado_suites.assert_exactly_the_deviations(_subprocess_outcome(), expected, 250,
                                                 DEVIATIONS)


def test_every_deviation_names_a_real_test_and_every_class_not_run_is_served() -> None:
    import importlib
    import unittest

    from tornado.testing import AsyncHTTPTestCase

    tests, classes = read_deviations()
    for class_id in classes:
        module_name, name = class_id.split(".")
        klass = getattr(importlib.import_module("tornado.test." + module_name), name, None)
        # only a class that would be run may be listed as not run
        assert isinstance(klass, type) and issubclass(klass, AsyncHTTPTestCase), class_id
    served = dict(_served_classes(classes))
    known = {"%s.%s" % (class_id, n) for class_id, klass in served.items()
             for n in unittest.TestLoader().getTestCaseNames(klass)}
    missing = [t for t in tests if t not in known]
    assert not missing, missing


if __name__ == "__main__":
    tornado_suites.main(run_suites, ["--tornado" in sys.argv])
