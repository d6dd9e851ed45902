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

import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Set, Tuple

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEVIATIONS = os.path.join(HERE, "tornado_server_deviations.txt")
MODULES = ("httpserver_test", "web_test")

#: get_httpserver_options() names -> GatewayHTTPServer's keyword arguments.
OPTIONS = {"max_body_size": "max_body_size", "max_header_size": "max_header_size",
           "body_timeout": "body_timeout", "chunk_size": "chunk_size",
           "no_keep_alive": "no_keep_alive", "idle_connection_timeout": "head_timeout"}


def read_deviations(path: str = DEVIATIONS) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``({module.Class.test: reason}, {module.Class: reason})`` from the deviations file
    (``id  # reason`` lines): the tests expected to fail, and the classes not run."""
    tests: Dict[str, str] = {}
    classes: Dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            test_id, sep, reason = text.partition("#")
            test_id = test_id.strip()
            assert sep and reason.strip(), "deviation without a reason: %r" % line
            target = tests if test_id.count(".") == 2 else classes
            assert test_id not in target, "listed twice: %s" % test_id
            target[test_id] = reason.strip()
    return tests, classes


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
    import logging
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

    class Result(unittest.TestResult):
        def __init__(self) -> None:
            super().__init__()
            self.failed: Set[str] = set()
            self.detail: Dict[str, str] = {}

        def _note(self, test: unittest.TestCase, err: object) -> None:
            self.failed.add(test_id(test))
            self.detail.setdefault(test_id(test), self._exc_info_to_string(err, test)[-1500:])

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
            "skipped": sorted(test_id(t) for t, _why in result.skipped),
            "detail": result.detail}


def _subprocess_outcome() -> Dict[str, object]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, "suite runner failed:\n%s\n%s" % (
        proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(lines[-1])


@pytest.mark.timeout(300)
def test_tornado_server_suites_fail_exactly_the_listed_deviations() -> None:
    expected, _classes = read_deviations()
    outcome = _subprocess_outcome()
    failed: List[str] = outcome["failed"]  # type: ignore[assignment]
    detail: Dict[str, str] = outcome["detail"]  # type: ignore[assignment]
    unexpected = [t for t in failed if t not in expected]
    now_passing = [t for t in expected if t not in failed]
    assert outcome["run"] > 250, outcome["run"]
    assert not unexpected, "tests failing outside the deviation list:\n" + "\n".join(
        "%s\n%s" % (t, detail.get(t, "")) for t in unexpected)
    assert not now_passing, ("listed deviations that pass now (remove them from %s): %s"
                             % (os.path.basename(DEVIATIONS), now_passing))


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
    outcome = run_suites(tornado_server="--tornado" in sys.argv)
    if "--json" in sys.argv:
        print(json.dumps(outcome))
    else:
        for test_id in outcome["failed"]:  # type: ignore[union-attr]
            print(test_id)
            if "-v" in sys.argv:
                print(outcome["detail"][test_id])  # type: ignore[index]
        print("run %d, failed %d, skipped %d" % (outcome["run"], len(outcome["failed"]),
                                                 len(outcome["skipped"])), file=sys.stderr)
