#!/usr/bin/env bash
# Builds the container image from deploy/docker/Dockerfile with podman, as `docker build` would, on a machine
# that reaches Debian's packages and PyPI but no container registry (this project's machines and CI):
#   1. the base: Debian 12 (minbase) with python3 and python3-venv, made with mmdebstrap and imported into
#      podman as localhost/dicomweb-edge-base:bookworm (the Dockerfile's BASE_IMAGE; python:3.11-slim where
#      a registry is reachable). Its root filesystem is cached in .image-cache/, keyed by what goes into it
#      and the ISO week (so it takes Debian's security updates at least weekly);
#   2. the wheels of requirements/runtime.txt, hash-checked, into deploy/docker/wheels/ (again only when the
#      lock changed);
#   3. podman build, offline (--network=none: only those wheels), in the docker format (HEALTHCHECK).
# Usage: ./scripts/build-image.sh [TAG]     (default dicomweb-edge:VERSION). Prints each step's time and the
# image's size. podman runs with scripts/lib/containers.conf (CONTAINERS_CONF), as the tests run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib/setup.sh
source scripts/lib/setup.sh

ensure_debian_packages podman runc mmdebstrap
export CONTAINERS_CONF="$REPO_ROOT/scripts/lib/containers.conf"

python="${PYTHON:-$VENV/bin/python}"
[ -x "$python" ] || python=python3
version="$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
tag="${1:-dicomweb-edge:$version}"
base=localhost/dicomweb-edge-base:bookworm
cache="$REPO_ROOT/.image-cache"
mkdir -p "$cache"

took() { log "$1: $(( SECONDS - $2 )) s"; }

# --- 1. the base ---------------------------------------------------------------------------------------------
debootstrap_args=(
    --variant=minbase --include=python3,python3-venv,ca-certificates
    # /usr merged by mmdebstrap's hook, not the usrmerge package (which brings 50 MB of perl)
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    # as Debian's slim images: no manuals, documentation (but the copyrights) or translations
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    bookworm
)
mirrors=(
    "deb http://deb.debian.org/debian bookworm main"
    "deb http://deb.debian.org/debian bookworm-updates main"
    "deb http://deb.debian.org/debian-security bookworm-security main"
)
key="$(printf '%s\n' "${debootstrap_args[@]}" "${mirrors[@]}" "$(date -u +%G-W%V)" | sha256sum | cut -c1-16)"
rootfs="$cache/base-$key.tar"
start=$SECONDS
if [ "$(podman image inspect --format '{{index .Labels "dicomweb-edge.base"}}' "$base" 2>/dev/null)" = "$key" ]; then
    log "base $base ($key): already in podman's storage"
else
    if [ ! -s "$rootfs" ]; then
        log "base: mmdebstrap ${debootstrap_args[*]}"
        rm -f "$cache"/base-*.tar
        mmdebstrap --format=tar "${debootstrap_args[@]}" "$rootfs.part" "${mirrors[@]}" >"$cache/mmdebstrap.log" 2>&1 \
            || { tail -n 30 "$cache/mmdebstrap.log" >&2; log "mmdebstrap failed (log: $cache/mmdebstrap.log)"; exit 1; }
        mv "$rootfs.part" "$rootfs"
    fi
    podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "LABEL dicomweb-edge.base=$key" --change 'CMD ["/bin/bash"]' "$rootfs" "$base" >/dev/null
fi
took "base" "$start"

# --- 2. the wheels -------------------------------------------------------------------------------------------
start=$SECONDS
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { log "the wheels must be Python 3.11's, the base's: set PYTHON to a python3.11"; exit 1; }
wheels=deploy/docker/wheels
stamp="$wheels/.runtime-lock-sha256"  # the lock the wheels there were fetched for
if [ "$(cat "$stamp" 2>/dev/null)" != "$(sha256sum requirements/runtime.txt | cut -d' ' -f1)" ]; then
    rm -f "$wheels"/*.whl "$stamp"
    "$python" -m pip wheel --quiet --require-hashes --no-deps -r requirements/runtime.txt -w "$wheels"
    sha256sum requirements/runtime.txt | cut -d' ' -f1 > "$stamp"
fi
took "wheels" "$start"

# --- 3. the image ------------------------------------------------------------------------------------------
start=$SECONDS
podman build --quiet --pull=never --network=none --format=docker \
    --ignorefile deploy/docker/Dockerfile.dockerignore \
    --build-arg BASE_IMAGE="$base" --build-arg PIP_NO_INDEX=1 \
    -f deploy/docker/Dockerfile -t "$tag" . >/dev/null
took "podman build" "$start"
size="$(podman image inspect --format '{{.Size}}' "$tag")"
log "built $tag: $(( size / 1000000 )) MB"
