#!/usr/bin/env bash
# The project's test command. Installs what is missing (Debian packages, .venv), lints, then runs pytest.
# Arguments go to pytest, e.g. ./scripts/test.sh -k qido -x
# Under CI=true, tests needing a missing tool fail instead of skipping, and "no tests ran" (5) fails too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib/setup.sh
source scripts/lib/setup.sh

ensure_debian_packages orthanc orthanc-dicomweb nginx wrk dcmtk python3-venv chromium redis-server systemd prometheus tinyproxy \
    podman runc mmdebstrap  # (the last three: tests/test_image_e2e.py builds and runs the image)
ensure_venv
# The OHIF end-to-end test (tests/test_viewer_e2e.py) needs the pinned viewer build, in git-ignored .ohif/.
./scripts/fetch-ohif.sh >/dev/null

lint_paths=()
for dir in proxy tests benchmarks; do [ -d "$dir" ] && lint_paths+=("$dir"); done
.venv/bin/ruff check "${lint_paths[@]}"

exec .venv/bin/python -m pytest -q --durations=15 "$@"
