# shellcheck shell=bash
# Shared setup for scripts/test.sh and scripts/demo.sh (sourced, not run). Debian 12 is the reference system.
#   ensure_debian_packages [--optional] PKG...   install missing packages (apt-get, as root or via sudo)
#   ensure_venv                                  .venv: the locked dependencies, then the project (editable)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO_ROOT/.venv"

log() { printf '[setup] %s\n' "$*" >&2; }

# Prints the packages that are not installed (dpkg status "install ok installed").
missing_debian_packages() {
    local pkg status
    for pkg in "$@"; do
        status="$(dpkg -s "$pkg" 2>/dev/null || true)"
        grep -qx 'Status: install ok installed' <<<"$status" || printf '%s\n' "$pkg"
    done
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else log "need root (or sudo) to run: $*"; return 1
    fi
}

ensure_debian_packages() {
    local optional=0 missing=()
    if [ "${1:-}" = "--optional" ]; then optional=1; shift; fi
    if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        [ "$optional" -eq 1 ] && { log "no dpkg/apt-get: skipping optional packages $*"; return 0; }
        log "no dpkg/apt-get: install these yourself: $*"; return 1
    fi
    mapfile -t missing < <(missing_debian_packages "$@")
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    if as_root apt-get update -qq \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    then
        return 0
    fi
    [ "$optional" -eq 1 ] && { log "could not install optional packages: ${missing[*]} (continuing)"; return 0; }
    log "could not install: ${missing[*]}"; return 1
}

# Creates .venv if absent and installs into it the locked dependencies (requirements/test.txt: the proxy's,
# the demo's, the tests'; every file hash-checked) and then the project itself, editable, without resolving
# anything (scripts/lock.sh refreshes the lock). Re-installs only when the lock or pyproject.toml changed.
ensure_venv() {
    local stamp="$VENV/.dicomweb-edge-installed" lock="$REPO_ROOT/requirements/test.txt" want
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    want="$(cat "$lock" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "installing the locked dependencies (requirements/test.txt) and the project into $VENV"
        "$VENV/bin/python" -m pip install -q --require-hashes -r "$lock"
        # The build backend (setuptools) is in the lock: no unlocked download for building the project.
        (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .)
        printf '%s\n' "$want" > "$stamp"
    fi
}
