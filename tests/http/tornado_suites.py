"""What the two conformance tests share (tests/http/test_tornado_{server,client}_suites.py):
reading a deviations file, running Tornado's unittest suites in a subprocess and collecting
what failed, and comparing that with the list."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import unittest
from typing import Callable, Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_deviations(path: str) -> Dict[str, str]:
    """``{id: reason}`` from a deviations file (``id  # reason`` lines, ``#`` comments)."""
    out: Dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            test_id, sep, reason = text.partition("#")
            test_id = test_id.strip()
            assert sep and reason.strip(), "deviation without a reason: %r" % line
            assert test_id not in out, "listed twice: %s" % test_id
            out[test_id] = reason.strip()
    return out


def run_suite(suite: unittest.TestSuite,
              test_id: Callable[[unittest.TestCase], str]) -> Dict[str, object]:
    """Run ``suite`` here (the subprocess side): tests run, the ids that failed or errored
    (with the end of each traceback), the ids skipped."""

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


def subprocess_outcome(script: str, args: List[str], timeout: float) -> Dict[str, object]:
    """Run ``script --json args`` (its ``run_suites``) in a fresh interpreter: the suites
    configure Tornado process-wide, nothing of which may leak into pytest's process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, script, "--json"] + args, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, "suite runner failed:\n%s\n%s" % (
        proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads(lines[-1])


def assert_exactly_the_deviations(outcome: Dict[str, object], expected: Dict[str, str],
                                  at_least: int, deviations_path: str) -> None:
    """Fails on a test failing outside the list, and on a listed test that passes."""
    failed: List[str] = outcome["failed"]  # type: ignore[assignment]
    detail: Dict[str, str] = outcome["detail"]  # type: ignore[assignment]
    unexpected = [t for t in failed if t not in expected]
    now_passing = [t for t in expected if t not in failed]
    assert outcome["run"] > at_least, outcome["run"]
    assert not unexpected, "tests failing outside the deviation list:\n" + "\n".join(
        "%s\n%s" % (t, detail.get(t, "")) for t in unexpected)
    assert not now_passing, ("listed deviations that pass now (remove them from %s): %s"
                             % (os.path.basename(deviations_path), now_passing))


def main(run_suites: Callable[..., Dict[str, object]], args: List[str]) -> None:
    """The scripts' command line: ``--json`` for the parent test, else one failed id a line."""
    outcome = run_suites(*args)
    if "--json" in sys.argv:
        print(json.dumps(outcome))
        return
    for test_id in outcome["failed"]:  # type: ignore[union-attr]
        print(test_id)
        if "-v" in sys.argv:
            print(outcome["detail"][test_id])  # type: ignore[index]
    print("run %d, failed %d, skipped %d" % (outcome["run"], len(outcome["failed"]),
                                             len(outcome["skipped"])), file=sys.stderr)
