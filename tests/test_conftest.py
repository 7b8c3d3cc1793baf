"""tests/conftest.py's rule: under CI=true a test that pytest.importorskip skipped fails instead."""
from types import SimpleNamespace

from tests.conftest import fail_import_skip_in_ci


def skipped(reason):
    return SimpleNamespace(skipped=True, outcome="skipped", longrepr=("tests/test_x.py", 3, reason))


def test_an_import_skip_fails_under_ci_and_only_there(monkeypatch):
    missing = "Skipped: could not import 'matplotlib': No module named 'matplotlib'"
    monkeypatch.delenv("CI", raising=False)
    report = skipped(missing)
    fail_import_skip_in_ci(report)
    assert report.outcome == "skipped"
    monkeypatch.setenv("CI", "true")
    fail_import_skip_in_ci(report)
    assert report.outcome == "failed"
    assert report.longrepr == f"CI=true, and the dev extra's package is missing: {missing}"
    other = skipped("Skipped: needs CUDA")  # every other skip stays one
    fail_import_skip_in_ci(other)
    assert other.outcome == "skipped"
