"""Finding Debian's Chromium for the browser tests (tests/test_page.py, test_report.py, test_inspect.py)."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM_MISSING = ("the browser check needs Chromium on PATH, not installed here (Debian: apt-get install chromium, "
                    "as root; .ci/run installs it); the checks that need no browser still ran")


def chromium() -> str:
    """The Chromium binary on PATH; skips the test (saying how to get it) when there is none."""
    path = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if path is None:
        pytest.skip(CHROMIUM_MISSING)
    return path
