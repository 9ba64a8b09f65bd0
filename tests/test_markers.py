"""The `orthanc` marker names every test that starts a real Orthanc, so that `-m "not orthanc"` runs none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def collected(*args: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *args],
                         cwd=TESTS.parent, capture_output=True, text=True, timeout=120).stdout
    return {line.split("::")[1].split("[")[0] for line in out.splitlines() if "::" in line}


def test_tests_whose_module_starts_orthanc_are_marked():
    """A module fixture that calls orthanc_holding (here: the cache fault tests), not only the session's
    orthanc_a/orthanc_b; and only those tests: the module's pass-through tests use the sample archive."""
    marked = collected("-m", "orthanc", "tests/test_cache_faults_e2e.py", "tests/test_cache_belonging_e2e.py",
                       "tests/test_cache_disk.py")
    assert "test_a_full_cache_disk_at_start_up_leaves_the_cache_off_until_there_is_room" in marked
    assert "test_a_url_mixing_two_studies_is_answered_by_the_archive_not_the_cache" in marked
    assert "test_pass_through_a_confirmation_lasts_access_ttl" not in marked  # the sample archive
    assert not any(name.startswith("test_disk_tier") for name in marked)  # no server at all
