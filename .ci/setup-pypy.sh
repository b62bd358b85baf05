#!/usr/bin/env bash
# Makes Debian's PyPy (pypy3, PyPy 3.9) able to run KV Responder: a venv with the project and its test extra.
#
#   bash .ci/setup-pypy.sh [VENV]        # default VENV: /opt/kv-pypy
#
# Prints the venv's python path on stdout (everything else goes to stderr). Idempotent: an existing venv
# is reused and pip only installs what is missing or changed.
#
# How pip gets into the venv, first that works:
#   1. `pypy3 -m venv` — Debian's ensurepip installs pip from /usr/share/python-wheels (python3-pip-whl,
#      pulled in by the apt package pypy3-venv; installed here when we are root and it is missing);
#   2. `pypy3 -m venv --without-pip`, then pip bootstrapped from its own wheel downloaded from PyPI
#      (`python3 -m pip download pip`, then `pypy3 <pip wheel>/pip install <pip wheel>`).
# On PyPy, setup.cfg pins cryptography<44, whose PyPy wheels exist (no Rust toolchain needed).
set -euo pipefail

VENV="${1:-${KV_PYPY_VENV:-/opt/kv-pypy}}"
PYPY="${PYPY:-pypy3}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

log() { printf 'setup-pypy: %s\n' "$*" >&2; }

apt_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    log "apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

if ! command -v "$PYPY" >/dev/null 2>&1; then
    apt_install pypy3 || { log "no $PYPY and cannot apt-get install pypy3"; exit 1; }
fi
log "using $("$PYPY" -c 'import sys, platform; print(sys.executable, platform.python_implementation(), sys.version.split()[0], sys.pypy_version_info[:3])')"

venv_ok() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

if ! venv_ok; then
    # pypy3-venv brings the pip/setuptools wheels that Debian's ensurepip installs from.
    if ! ls /usr/share/python-wheels/pip-*.whl >/dev/null 2>&1; then
        apt_install pypy3-venv || log "could not install pypy3-venv; will bootstrap pip from PyPI"
    fi
    rm -rf "$VENV"
    if "$PYPY" -m venv "$VENV" >&2 && venv_ok; then
        log "venv with pip created by ensurepip at $VENV"
    else
        log "ensurepip unavailable: bootstrapping pip from its PyPI wheel"
        rm -rf "$VENV"
        "$PYPY" -m venv --without-pip "$VENV" >&2
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
            python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" pip >&2
        else
            log "no CPython pip to download with"; exit 1
        fi
        wheel="$(ls "$work"/pip-*.whl | head -n1)"
        # A pip wheel runs from itself: python pip-X.whl/pip install pip-X.whl
        "$VENV/bin/python" "$wheel/pip" install --quiet --no-index "$wheel" >&2
        venv_ok || { log "pip bootstrap failed"; exit 1; }
    fi
fi

# A pip new enough for current wheels' metadata; setuptools/wheel for building the project itself.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23" setuptools wheel >&2
# Binary wheels only for cryptography (no Rust toolchain on the machine).
( cd "$REPO" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --only-binary=cryptography "cryptography<44" "$REPO[test]" ) >&2

"$VENV/bin/python" -c "import kvresponder.tap, treq, klein, eliot, prometheus_client, opentelemetry.sdk" >&2
log "ok: $("$VENV/bin/python" -c 'import sys, kvresponder; print(sys.version.split()[0], "kvresponder", kvresponder.__version__)')"
echo "$VENV/bin/python"
