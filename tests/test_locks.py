"""The hash-locked requirements (requirements/*.txt, written by scripts/lock.sh) agree with pyproject.toml.

The image installs requirements/runtime.txt and the scripts' .venv requirements/test.txt, both with
`pip install --require-hashes`: a dependency added to pyproject.toml without refreshing the locks, or a lock
edited by hand, fails here instead of in a user's build.
"""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
RUNTIME = REPO_ROOT / "requirements" / "runtime.txt"
TEST = REPO_ROOT / "requirements" / "test.txt"
TEST_EXTRAS = ("demo", "test", "redis")  # what scripts/lib/setup.sh's .venv holds (scripts/lock.sh)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)")


def pins(path) -> dict[str, tuple[str, int]]:
    """Locked distribution → (version, how many file hashes it has)."""
    found: dict[str, tuple[str, int]] = {}
    name = None
    for line in path.read_text().splitlines():
        if match := PIN.match(line):
            name = canonicalize_name(match.group(1))
            found[name] = (match.group(2), 0)
        elif name and line.strip().startswith("--hash=sha256:"):
            found[name] = (found[name][0], found[name][1] + 1)
    return found


def requirements(*extras: str) -> list[Requirement]:
    listed = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["build-system"]["requires"]]
    for extra in extras:
        listed += PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(r) for r in listed]


def assert_locked(path, wanted: list[Requirement]) -> None:
    locked = pins(path)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{path.name} lacks {requirement}: run ./scripts/lock.sh"
        assert requirement.specifier.contains(locked[name][0], prereleases=True), \
            f"{path.name} pins {name}=={locked[name][0]}, pyproject.toml asks {requirement}: run ./scripts/lock.sh"
    unhashed = [name for name, (_, hashes) in locked.items() if hashes == 0]
    assert unhashed == [], f"{path.name}: pinned without a hash"


def test_the_runtime_lock_holds_what_pyproject_asks_and_no_demo_packages():
    assert_locked(RUNTIME, requirements())
    demo_only = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["demo"]}
    assert demo_only == {"numpy", "pillow"}
    assert demo_only.isdisjoint(pins(RUNTIME)), "the proxy's own lock (and so the image) must not carry the demo's"


def test_the_test_lock_holds_the_extras_at_the_runtime_locks_versions():
    assert_locked(TEST, requirements(*TEST_EXTRAS))
    runtime, test = pins(RUNTIME), pins(TEST)
    differ = {name: (version, test[name][0]) for name, (version, _) in runtime.items() if test[name][0] != version}
    assert differ == {}, "requirements/test.txt must pin the runtime's packages at the same versions"
