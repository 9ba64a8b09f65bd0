#!/usr/bin/env bash
# Runs the demo (dicomweb-edge demo). Orthanc is installed when apt is usable; the demo also runs without it.
# Arguments go to `dicomweb-edge demo`; `./scripts/demo.sh --viewer` also opens the studies in OHIF.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib/setup.sh
source scripts/lib/setup.sh

ensure_debian_packages --optional orthanc orthanc-dicomweb python3-venv
ensure_venv

# `--viewer` without a DIR serves the pinned OHIF build: fetch it first (a no-op once it is there).
args=("$@")
for i in "${!args[@]}"; do
    if [ "${args[$i]}" = "--viewer" ] && { [ $((i + 1)) -ge ${#args[@]} ] || [[ "${args[$((i + 1))]}" == --* ]]; }; then
        ./scripts/fetch-ohif.sh >/dev/null
    fi
done

exec .venv/bin/dicomweb-edge demo "$@"
