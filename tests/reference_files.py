"""The reference files in ../shared/reference (tests only; the project never reads them at run time): MiniMind's
real tokenizer folders and the specs.

reference_folder(name) is ../shared/reference/NAME or, when it is missing, a skip on a developer's machine (a clone
without ../shared) and a failure under CI=true (CI has it, so the tests that need it must run there). Looked for in
$MINIMIND_REFERENCE_DIR, beside this checkout, and for a git worktree beside its main checkout."""
import os
from pathlib import Path

from tests.ci import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]


def reference_roots():
    roots = [Path(os.environ["MINIMIND_REFERENCE_DIR"])] if os.environ.get("MINIMIND_REFERENCE_DIR") else []
    roots.append(ROOT.parent / "shared" / "reference")
    git = ROOT / ".git"
    if git.is_file() and git.read_text().startswith("gitdir:"):  # a worktree: gitdir MAIN/.git/worktrees/NAME
        roots.append(Path(git.read_text().split(":", 1)[1].strip()).parents[2].parent / "shared" / "reference")
    return roots


def reference_folder(name: str) -> Path:
    roots = reference_roots()
    for root in roots:
        if (root / name).exists():
            return root / name
    skip_unless_ci(f"reference file {name} not found in {', '.join(map(str, roots))} (set MINIMIND_REFERENCE_DIR)")
