#!/usr/bin/env bash
# Regenerates docs/images/viewer.png (the README's picture of OHIF reading both archives through the proxy):
# runs the OHIF end-to-end test, which saves screenshots, then puts the study list and the open CT side by side.
# Installs what it needs like scripts/test.sh (Debian's chromium and Orthanc, .venv, the pinned OHIF build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib/setup.sh
source scripts/lib/setup.sh

ensure_debian_packages orthanc orthanc-dicomweb chromium python3-venv
ensure_venv
./scripts/fetch-ohif.sh >/dev/null

shots="$(mktemp -d)"
trap 'rm -rf "$shots"' EXIT
DICOMWEB_EDGE_SCREENSHOTS="$shots" .venv/bin/python -m pytest -q tests/test_viewer_e2e.py \
    -k "study_list or ct_study" -p no:cacheprovider
mkdir -p docs/images
.venv/bin/python - "$shots" docs/images/viewer.png <<'PY'
import sys
from pathlib import Path

from PIL import Image

shots, out = Path(sys.argv[1]), sys.argv[2]
left, right = (Image.open(shots / name).convert("RGB") for name in ("study-list.png", "ct.png"))
scale = 0.5
size = (int(left.width * scale), int(left.height * scale))
canvas = Image.new("RGB", (size[0] * 2 + 8, size[1]), "black")
canvas.paste(left.resize(size, Image.LANCZOS), (0, 0))
canvas.paste(right.resize(size, Image.LANCZOS), (size[0] + 8, 0))
canvas.save(out, optimize=True)
print(f"wrote {out} ({canvas.width}x{canvas.height})")
PY
