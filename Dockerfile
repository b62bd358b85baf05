# syntax=docker/dockerfile:1
# KV Responder image: one tenant's node, run as `twistd -n kvresponder`.
#
# The interpreter is PyPy, chosen on the benchmarks in docs/PERFORMANCE.md
# (run 6): it serves a node's GETs at about 1.1x the Node.js reference where
# CPython reaches 0.3x, its PUTs about 3.5x faster than CPython's, and a 3-node
# cluster's replicated writes about 2.2x faster. CPython keeps less memory
# (about 150 bytes a key of overhead against PyPy's 212, and a 60 MiB baseline
# against about 270 MiB), which is why the chart's default memory limit leaves
# PyPy its baseline (docs/DEPLOYMENT.md). To build on CPython instead, pass
# --build-arg PYTHON_IMAGE=python:3.11-slim; nothing else changes.

ARG PYTHON_IMAGE=pypy:3.9-slim

# --- Stage 1: build wheels for the project and its dependencies -----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . /src
# pypy3 in the PyPy images, python3 in the CPython ones.
RUN PY="$(command -v pypy3 || command -v python3)" \
    && "$PY" -m pip wheel --no-cache-dir --wheel-dir /wheels .

# --- Stage 2: runtime -----------------------------------------------------
FROM ${PYTHON_IMAGE}
# No bytecode or home directory writes at run time: the root filesystem is
# read-only in Kubernetes and only /tmp (an emptyDir) is writable.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    PORT=3000 \
    DISCOVERY_PORT=9999

# Install from the wheels without copying them into a layer, then build the
# Twisted plugin cache (dropin.cache) now: twistd cannot write it at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    PY="$(command -v pypy3 || command -v python3)" \
    && "$PY" -m pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
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
