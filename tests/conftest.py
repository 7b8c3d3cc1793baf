"""Shared test setup. On a machine without CUDA, Triton kernels run under the interpreter, which must be switched
on before anything imports triton. Under CI=true a test skipped because a package did not import fails instead."""
import os

import pytest
import torch

from tests.ci import in_ci

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fail_import_skip_in_ci(report):
    """Turn `report` (a test's or a module's) from skipped to failed when it was skipped by pytest.importorskip and
    CI=true: CI installs the dev extra, so a package missing there is a broken install (a dependency lost from
    setup.py), not an optional part, and its tests must not vanish into the skip count."""
    if in_ci() and report.skipped and "could not import" in str(report.longrepr):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"CI=true, and the dev extra's package is missing: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    fail_import_skip_in_ci((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    fail_import_skip_in_ci((yield).get_result())
