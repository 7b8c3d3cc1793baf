"""The real MiniMind tokenizer folders in ../shared/reference (tests only; the project never reads them at run time).

`reference_folder(name)` is the folder, or, when it is missing, a skip on a developer's machine and a failure under
CI=true (where the real-file tests must run). MINIMIND_REFERENCE_DIR points elsewhere (e.g. from a git worktree)."""
import os
from pathlib import Path

import pytest

REFERENCE = Path(os.environ.get("MINIMIND_REFERENCE_DIR",
                                Path(__file__).resolve().parents[2] / "shared" / "reference"))


def reference_folder(name: str) -> Path:
    path = REFERENCE / name
    if not (path / "tokenizer.json").is_file():
        message = f"reference tokenizer {path} absent"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true needs the real-file tests (set MINIMIND_REFERENCE_DIR)")
        pytest.skip(message)
    return path
