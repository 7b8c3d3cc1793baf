"""CI=true: CI installs everything the tests need (the dev extra, chromium, ../shared), so a test that finds
something missing there fails instead of skipping."""
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_unless_ci(message: str):
    """pytest.skip(message), or pytest.fail(message) under CI=true."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: the tests that need it must run)")
    pytest.skip(message)
