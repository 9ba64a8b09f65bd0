#!/usr/bin/env bash
# Fetches the pinned prebuilt OHIF viewer (@ohif/app on npm) into .ohif/<version>/dist (git-ignored).
# Idempotent: does nothing when that version is already unpacked. Verifies the tarball against the
# registry's sha512 integrity pinned below before unpacking. Prints the dist directory.
#   ./scripts/fetch-ohif.sh            then: dicomweb-edge serve --viewer "$(./scripts/fetch-ohif.sh)" ...
# Downloads with npm (honours the npm registry configuration; nothing is npm-installed), else curl, else
# python3; needs tar and python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OHIF_VERSION="3.13.2"
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
OHIF_TARBALL="https://registry.npmjs.org/@ohif/app/-/app-${OHIF_VERSION}.tgz"

dest=".ohif/${OHIF_VERSION}"
if [ -f "$dest/dist/index.html" ] && [ -f "$dest/.complete-gz" ]; then
    printf '%s\n' "$PWD/$dest/dist"
    exit 0
fi

work="$(mktemp -d .ohif-download.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "[fetch-ohif] downloading @ohif/app@${OHIF_VERSION}" >&2
if command -v npm >/dev/null 2>&1; then
    # npm pack honours the user's registry configuration (a mirror, a proxy) and verifies nothing itself.
    (cd "$work" && npm pack --silent "@ohif/app@${OHIF_VERSION}" >/dev/null)
    mv "$work"/ohif-app-"${OHIF_VERSION}".tgz "$work/app.tgz"
elif command -v curl >/dev/null 2>&1; then
    curl -fsSL -o "$work/app.tgz" "$OHIF_TARBALL"
else
    python3 -c 'import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=120) as r, open(sys.argv[2], "wb") as f: shutil.copyfileobj(r, f)' \
        "$OHIF_TARBALL" "$work/app.tgz"
fi

actual="sha512-$(python3 -c 'import base64, hashlib, sys
print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$work/app.tgz")"
if [ "$actual" != "$OHIF_INTEGRITY" ]; then
    echo "[fetch-ohif] integrity mismatch for @ohif/app@${OHIF_VERSION}: got $actual" >&2
    exit 1
fi

mkdir -p "$work/unpacked"
tar -xzf "$work/app.tgz" -C "$work/unpacked" package/dist package/package.json
[ -f "$work/unpacked/package/dist/index.html" ] || { echo "[fetch-ohif] no dist/index.html in the tarball" >&2; exit 1; }
# gzip siblings, served to browsers that take gzip (proxy/http/viewer.py, like nginx's gzip_static).
find "$work/unpacked/package/dist" -type f -size +1k \( -name '*.js' -o -name '*.css' -o -name '*.html' \
    -o -name '*.json' -o -name '*.map' -o -name '*.wasm' -o -name '*.svg' \) -exec gzip -k -6 -n {} +
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$work/unpacked/package" "$dest"
touch "$dest/.complete-gz"
echo "[fetch-ohif] unpacked into $dest/dist" >&2
printf '%s\n' "$PWD/$dest/dist"
