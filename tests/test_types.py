"""The package type-checks: mypy, configured by pyproject.toml's [tool.mypy] (files, strictness, ignores),
finds nothing in `proxy/`. Every `# type: ignore` names its error code, and one that is no longer needed
is an error too (warn_unused_ignores)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from support import REPO_ROOT, missing


def test_mypy_finds_no_errors():
    if importlib.util.find_spec("mypy") is None:
        missing("mypy is not installed (it is in the `test` extra: pip install -e '.[test]')")
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
