"""Fixtures for the end-to-end CLI tests (shared helpers live in tests/integration)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
from gw_realproc import orphans  # noqa: E402,F401  (fixture)
