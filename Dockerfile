# syntax=docker/dockerfile:1
# KV Responder image: one tenant's node, run as `twistd -n --pidfile= kvresponder`.
#
# The interpreter is PyPy for Python 3.11, chosen on the benchmarks in
# docs/PERFORMANCE.md: it serves a node's reads and writes several times
# faster than CPython. CPython keeps less memory (a smaller baseline), which
# is why the chart's default memory limit leaves PyPy its baseline
# (docs/DEPLOYMENT.md). To build on CPython instead, pass
# --build-arg PYTHON_IMAGE=python:3.11-slim (3.12, 3.13 and 3.14 too).
#
# The base needs only `pypy3` or `python3` on PATH, pip (or ensurepip, which
# installs it), and groupadd/useradd. The dependencies come from the lock file
# of the base's interpreter, requirements/<implementation><version>.txt
# (pypy311.txt, cpython311.txt, ...), with every file's hash checked. What is
# built from source (the project, and zope.interface and markupsafe on PyPy) is
# built with the build system of requirements/build.txt, hash-checked too, not
# with what pip's build isolation would fetch unchecked.

ARG PYTHON_IMAGE=pypy:3.11-slim

# --- Stage 1: wheels for the project and its locked dependencies ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . /src
# Dependencies that PyPI has only as source (zope.interface on PyPy) are built
# here, from a file whose hash the lock names, so the runtime stage needs
# neither the network nor a compiler.
RUN PY="$(command -v pypy3 || command -v python3)" \
    && { "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --default-pip; } \
    && LOCK="requirements/$("$PY" -c 'import sys; print("%s%d%d" % ((sys.implementation.name,) + sys.version_info[:2]))').txt" \
    && { [ -f "$LOCK" ] || { echo "no lock file $LOCK for this interpreter: see requirements/refresh.sh" >&2; exit 1; }; } \
    && PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-cache-dir --require-hashes --ignore-installed \
       -r requirements/build.txt \
    && "$PY" -m pip wheel --no-cache-dir --require-hashes --no-build-isolation --check-build-dependencies \
       --wheel-dir /wheels -r "$LOCK" \
    && "$PY" -m pip wheel --no-cache-dir --no-deps --no-build-isolation --check-build-dependencies \
       --wheel-dir /wheels .

# --- Stage 2: runtime -----------------------------------------------------
FROM ${PYTHON_IMAGE}
# No bytecode or home directory writes at run time: the root filesystem is
# read-only in Kubernetes and only /tmp (an emptyDir) is writable.
# LISTEN_ADDRESS: a bare PORT listens on every interface of the container, so
# `docker run -p 3000:3000` reaches it even without POD_IP (a laptop run of
# the service itself listens on loopback).
# PYPY_GC_INCREMENT_STEP: PyPy marks the heap of a major collection 4 MB a
# step, between requests; its default here marked a node's whole heap in one
# step of about 40 ms (docs/PERFORMANCE.md). CPython ignores it.
# PYPY_GC_NURSERY: PyPy sizes its young generation from the cache the CPU
# reports (4 MB on one machine measured, about 150 MB on another); a request's
# objects that outlive a minor collection are copied, and a replicated write's
# live until its replicas answer. At 4 MB the 3-node write rate was 10-20 %
# lower (docs/PERFORMANCE.md). The same size everywhere, at the cost of its
# size in RSS.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYPY_GC_INCREMENT_STEP=4MB \
    PYPY_GC_NURSERY=24MB \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/tmp \
    PORT=3000 \
    LISTEN_ADDRESS=0.0.0.0 \
    DISCOVERY_PORT=9999

# Install only the wheels of stage 1 (no index: what the lock pinned, nothing
# else), without copying them into a layer, then build the Twisted plugin
# cache (dropin.cache) now: twistd cannot write it at run time. The image owns
# its interpreter, so pip may install into it even where the base marks it as
# managed by the system (PEP 668), and beside, not over, packages the system
# installed (pip cannot uninstall those: Debian's python3-packaging, say).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    PY="$(command -v pypy3 || command -v python3)" \
    && { "$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --default-pip; } \
    && PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-cache-dir --no-index --ignore-installed \
       --find-links=/wheels /wheels/*.whl \
    && "$PY" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && groupadd --system --gid 10001 kvresponder \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin kvresponder

# Fixed numeric uid/gid, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
WORKDIR /tmp

EXPOSE 3000/tcp 9999/udp

# No HEALTHCHECK: the probe path depends on TENANT (/<tenant>/health/live),
# and Kubernetes uses the chart's liveness/readiness probes instead.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "kvresponder"]
