# syntax=docker/dockerfile:1
# KV Responder image: one tenant's node, run as `twistd -n kvresponder`.
#
# The interpreter is CPython, chosen on the benchmarks in docs/PERFORMANCE.md.
# PyPy serves a single node's GETs about 3x faster, but a tenant runs as a
# replicated cluster, and there PyPy was slower than CPython (3-node PUT and
# mixed load at 0.3-0.7x, the peer-call path), it starts at about 270 MiB of
# RSS against CPython's 60 MiB (a per-pod cost, multiplied by replicas and
# tenants), and it holds 641 bytes per key against CPython's 383. Switching
# means changing PYTHON_IMAGE (e.g. pypy:3.9-slim) and nothing else.

ARG PYTHON_IMAGE=python:3.11-slim

# --- Stage 1: build wheels for the project and its dependencies -----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . /src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

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
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
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
