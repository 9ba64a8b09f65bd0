#!/usr/bin/env bash
# Runs the demo (dicomweb-edge demo). Orthanc is installed when apt is usable; the demo also runs without it.
# Arguments go to `dicomweb-edge demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib/setup.sh
source scripts/lib/setup.sh

ensure_debian_packages --optional orthanc orthanc-dicomweb python3-venv
ensure_venv

exec .venv/bin/dicomweb-edge demo "$@"
