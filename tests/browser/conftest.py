"""Make a browser test that could not run impossible to miss in the terminal summary."""
from __future__ import annotations

from typing import Any, List

NOT_RUN: List[str] = []  # filled by test_web_page._skip_loudly


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not NOT_RUN:
        return
    reasons = sorted(set(NOT_RUN))
    terminalreporter.section("BROWSER TEST NOT RUN", sep="!", red=True, bold=True)
    for reason in reasons:
        terminalreporter.write_line("The web page was NOT tested in a browser: " + reason,
                                    red=True, bold=True)
    terminalreporter.write_line("Install it with: apt-get update && apt-get install -y chromium "
                                "(CI does). Set BROWSER_TEST_REQUIRED=1 to make this a failure.",
                                red=True)
