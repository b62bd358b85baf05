#!/usr/bin/env bash
# Makes PyPy for Python 3.11 able to run KV Responder on a Debian 12 host, whose own pypy3 is 3.9.
#
#   bash .ci/setup-pypy.sh [DIR]        # default DIR: $KV_PYPY_DIR or /var/cache/kv-pypy311
#
# Prints on stdout the path of DIR/python, a HOST executable that runs the PyPy 3.11 venv's python (with the
# project and its test extra installed) with the same arguments, cwd, environment and process id; everything
# else goes to stderr. Run as root (mmdebstrap, mounts and pivot_root need it).
#
# Debian 13's PyPy 3.11 needs trixie's glibc, so it lives in a Debian 13 root filesystem:
#   DIR/root    trixie from the Debian archive (mmdebstrap), with pypy3 and the tools the tests call (ip,
#               iptables, promtool, prometheus, bwrap, faketime; helm is copied from the host when it has one);
#               the venv is /opt/kv-pypy inside it.
#   DIR/enter   runs a command inside the root: `DIR/enter CMD ARGS...`.
#   DIR/python  is `DIR/enter /opt/kv-pypy/bin/python "$@"`, with the venv's bin first on PATH.
#
# `enter` does not fork: it execs unshare (a private mount namespace), mounts, pivots into the root and execs, so the pid a
# caller holds is the interpreter's own and its signals (SIGTERM drains a node) reach it. Inside the root the
# interpreter's sys.executable is the venv's python, so the processes it starts stay inside. It shares with
# the host: the network (and its namespaces, /run/netns), /dev, /proc, /sys, /run, /tmp, the repository, the
# caller's cwd, and read-only the resolver, the CA certificates and pip's configuration (with the local paths
# it names), so pip inside reaches the same indexes as pip outside.
#
# Idempotent and cached: the root is rebuilt only when its package list changes (a minute or two cold, about 1 GB
# with the venv), and pip then only installs what changed. A lock makes concurrent runs wait for each other.
set -euo pipefail

DIR="${1:-${KV_PYPY_DIR:-/var/cache/kv-pypy311}}"
SUITE=trixie
MIRROR="${KV_PYPY_MIRROR:-http://deb.debian.org/debian}"
# pypy3-venv brings the pip and setuptools wheels that Debian's ensurepip installs from.
# mount: its umount detaches the host's root after `enter` pivots into this one.
# git: the rolling-upgrade chaos test takes the previous version from the clone's history.
PACKAGES="pypy3,pypy3-venv,ca-certificates,procps,mount,iproute2,iptables,faketime,prometheus,bubblewrap,git"
VENV=/opt/kv-pypy
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$DIR/root"
SPEC="$SUITE $MIRROR $PACKAGES"

log() { printf 'setup-pypy: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "needs root (mmdebstrap, mount, pivot_root)"; exit 1; }
mkdir -p "$DIR"
exec 9>"$DIR/lock"
flock 9

apt_install() {
    log "apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

# -- the Debian 13 root ------------------------------------------------------------------------------------
if [ "$(cat "$ROOT/etc/kv-pypy311-spec" 2>/dev/null)" != "$SPEC" ]; then
    command -v mmdebstrap >/dev/null 2>&1 || apt_install mmdebstrap
    log "building the $SUITE root at $ROOT (mmdebstrap: $PACKAGES)"
    started=$(date +%s)
    rm -rf "$ROOT.new"
    mmdebstrap --quiet --variant=apt --include="$PACKAGES" "$SUITE" "$ROOT.new" "$MIRROR" >&2
    echo "$SPEC" > "$ROOT.new/etc/kv-pypy311-spec"
    rm -rf "$ROOT"
    mv "$ROOT.new" "$ROOT"
    log "root built in $(( $(date +%s) - started )) s"
fi
# The tests render the chart with helm (a static binary): the host's, when it has one.
if host_helm="$(command -v helm 2>/dev/null)" && ! cmp -s "$host_helm" "$ROOT/usr/local/bin/helm"; then
    install -m 0755 "$host_helm" "$ROOT/usr/local/bin/helm"
fi

# -- the host-side commands --------------------------------------------------------------------------------
# Read-only host paths pip needs inside: its configuration files, the CA certificates, and the local
# indexes/wheel directories that configuration (or PIP_* variables) names.
readonly_paths=(/etc/resolv.conf /etc/hosts /etc/ssl/certs /etc/pip.conf /etc/xdg/pip)
if command -v python3 >/dev/null 2>&1; then
    while IFS= read -r path; do readonly_paths+=("$path"); done < <(
        python3 -m pip config list 2>/dev/null | python3 -c '
import re, sys
for line in sys.stdin:
    value = line.split("=", 1)[1].strip().strip("\x27\"") if "=" in line else ""
    for word in value.split():
        path = re.sub(r"^file://", "", word)
        if path.startswith("/"):
            print(path.rstrip("/"))
' | sort -u)
fi
existing=()
for path in "${readonly_paths[@]}"; do [ -e "$path" ] && existing+=("$path"); done

cat > "$DIR/enter.new" <<EOF
#!/bin/sh
# Runs a command inside the Debian 13 root $ROOT (made by .ci/setup-pypy.sh), in the caller's cwd, with the
# same process id: unshare and the shell exec, nothing forks. The mounts live in a private mount namespace.
[ \$# -gt 0 ] || set -- /bin/bash
exec unshare --mount --propagation private -- /bin/sh -c '
    set -e
    root=\$1; shift
    # The root a mount point of its own, so that / inside is one (bwrap and ip netns remount it).
    mount --bind "\$root" "\$root"
    bind() {  # bind SOURCE [ro]: SOURCE at the same path inside the root
        if [ -d "\$1" ]; then mkdir -p "\$root\$1"; else mkdir -p "\$root\$(dirname "\$1")"; [ -e "\$root\$1" ] || : > "\$root\$1"; fi
        mount --rbind "\$1" "\$root\$1"
        if [ "\${2:-}" = ro ]; then mount -o remount,bind,ro "\$root\$1"; fi
    }
    for path in /dev /proc /sys /run /tmp $REPO; do bind "\$path"; done
    for path in ${existing[*]}; do bind "\$path" ro; done
    case "\$PWD" in
        /|/tmp|/tmp/*|$REPO|$REPO/*) ;;
        *) bind "\$PWD" ;;
    esac
    # pivot_root, not chroot: the kernel refuses a chrooted process a user namespace (bwrap --unshare-user).
    # With new and old root the same directory, the old root lands on top and is then detached.
    here=\$PWD
    cd "\$root"
    pivot_root . .
    umount -l .
    exec /usr/bin/env --chdir="\$here" "\$@"
' sh "$ROOT" "\$@"
EOF
cat > "$DIR/python.new" <<EOF
#!/bin/sh
# PyPy 3.11's venv python ($VENV inside $ROOT), run from the host: see .ci/setup-pypy.sh.
PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin VIRTUAL_ENV=$VENV \\
    exec "$DIR/enter" $VENV/bin/python "\$@"
EOF
chmod 0755 "$DIR/enter.new" "$DIR/python.new"
mv "$DIR/enter.new" "$DIR/enter"
mv "$DIR/python.new" "$DIR/python"
ENTER="$DIR/enter"
PY="$DIR/python"

# -- the venv ----------------------------------------------------------------------------------------------
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    log "creating the venv $VENV inside the root"
    "$ENTER" rm -rf "$VENV"
    "$ENTER" pypy3 -m venv "$VENV" >&2
fi
# Binary wheels only for cryptography (no Rust toolchain on the machine; it ships PyPy 3.11 wheels), capped at
# the releases whose wheels load on Debian 13's PyPy 7.3.19 (see the constraints file). --upgrade-strategy
# only-if-needed (pip's default) leaves what satisfies them alone.
( cd "$REPO" && "$PY" -m pip install --quiet --disable-pip-version-check \
    --only-binary=cryptography --constraint "$REPO/.ci/pypy311-constraints.txt" "$REPO[test]" ) >&2

"$PY" -c "import kvresponder.tap, treq, klein, eliot, prometheus_client, opentelemetry.sdk, cryptography" >&2
# Every native module the suite loads (an "undefined symbol" here means a cap in the constraints file).
"$PY" -c "import pytest, pytest_twisted, hypothesis, jsonschema, openapi_spec_validator, pydantic, yaml, requests, schemathesis" >&2
log "ok: $("$PY" -c 'import sys, platform, kvresponder; print(platform.python_implementation(), sys.version.split()[0], "kvresponder", kvresponder.__version__)')"
echo "$PY"
