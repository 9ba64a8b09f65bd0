"""The command line's own answers (the commands that start servers are tested end to end elsewhere)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import proxy

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_packages_and_the_projects():
    """`dicomweb-edge --version` names the version pyproject.toml releases."""
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "--version"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    released = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.stdout.strip() == f"dicomweb-edge {released}" == f"dicomweb-edge {proxy.__version__}"


def test_the_license_file_is_the_one_pyproject_names():
    license_text = (ROOT / "LICENSE").read_text()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
