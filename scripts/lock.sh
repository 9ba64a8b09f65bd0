#!/usr/bin/env bash
# Refreshes the hash-locked requirements from pyproject.toml (run it after changing a dependency there):
#   requirements/runtime.txt  the proxy's dependencies and its build backend: the container image installs these
#   requirements/test.txt     the same versions plus the demo, test and redis extras: the .venv of the scripts
# Both are for CPython 3.11 on Linux (Debian 12's python3, the image's base); every file of each pinned release
# is hashed, so pip installs them with --require-hashes on any machine of that kind.
# Arguments go to `uv pip compile`, e.g. ./scripts/lock.sh --upgrade (newest releases) or
# --upgrade-package starlette. Needs uv (in .venv once ./scripts/test.sh has run, or on PATH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

uv=.venv/bin/uv
[ -x "$uv" ] || uv="$(command -v uv || true)"
[ -n "$uv" ] || { echo "lock.sh: needs uv: ./scripts/test.sh installs it into .venv (or: pip install uv)" >&2; exit 1; }

# pip builds the project itself from source: its build backend ([build-system] requires) is locked too.
build_requires() {
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))'
}

compile() {
    build_requires | "$uv" pip compile --quiet --generate-hashes --python-version 3.11 --python-platform linux \
        --no-strip-markers --custom-compile-command ./scripts/lock.sh pyproject.toml - "$@"
}

# The test environment first (it holds every extra, the cloud ones too: azure-identity's msal caps cryptography),
# then the proxy's own dependencies at the versions it settled on: the two locks agree.
compile --extra demo --extra test --extra redis -o requirements/test.txt "$@"
compile -c requirements/test.txt -o requirements/runtime.txt "$@"
echo "lock.sh: wrote requirements/runtime.txt and requirements/test.txt" >&2
