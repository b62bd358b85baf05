#!/usr/bin/env bash
# Contract test of the public API: schemathesis generates requests from docs/openapi.json (the same document a
# node serves at /<tenant>/openapi.json) and checks every answer of a live node against it: no 5xx, only
# documented statuses, content types, headers and bodies, 4xx for invalid input, 405 + Allow for methods a path
# does not list.
#
# Starts one node (twistd, tenant "schema") on free loopback ports, runs schemathesis, stops the node by its PID.
# Exits non-zero when schemathesis finds a failure (or the node does not start).
#
# Environment: PYTHON (python3), MAX_EXAMPLES (50 per operation), ST_TIMEOUT (seconds for the whole
# schemathesis run, 300), ST_SEED (a fixed seed for a reproducible run), ST_WORKERS (1), KEEP_LOGS (set: keep
# the node log and the report directory).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
MAX_EXAMPLES="${MAX_EXAMPLES:-50}"
ST_TIMEOUT="${ST_TIMEOUT:-300}"
ST_WORKERS="${ST_WORKERS:-1}"
TENANT=schema
SPEC="$PWD/docs/openapi.json"

log() { printf 'schemathesis.sh: %s\n' "$*" >&2; }

if ! command -v schemathesis >/dev/null 2>&1; then
    log "installing schemathesis (PyPI)"
    "$PYTHON" -m pip install --quiet schemathesis
fi
ST="$(command -v schemathesis || true)"
if [ -z "$ST" ]; then
    log "schemathesis is not on PATH after installing it"
    exit 2
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kv-schemathesis.XXXXXX")"
NODE_PID=""

stop_node() {
    if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then
        kill -TERM "$NODE_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$NODE_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$NODE_PID" 2>/dev/null; then
            log "node $NODE_PID did not exit after SIGTERM; SIGKILL"
            kill -KILL "$NODE_PID" 2>/dev/null || true
        fi
        wait "$NODE_PID" 2>/dev/null || true
    fi
    NODE_PID=""
}

cleanup() {
    stop_node
    if [ -n "${KEEP_LOGS:-}" ]; then
        log "logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r PORT UDP_PORT < <("$PYTHON" - <<'PY'
import socket
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.bind(("127.0.0.1", 0))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
print(tcp.getsockname()[1], udp.getsockname()[1])
PY
)
BASE="http://127.0.0.1:$PORT/$TENANT"

# The harness's way of running twistd (tests/harness.py TWISTD): any interpreter, whatever its scripts dir.
TWISTD="import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
# Only our own settings reach the node, not the caller's TENANT/PORT/ADMIN_TOKEN/...
env -u TENANT -u PORT -u ADMIN_TOKEN -u CLUSTER_SECRET -u DISCOVERY_DNS -u LOG_FILE -u LOG_LEVEL \
    -u JAEGER_ENDPOINT -u OTEL_EXPORTER_OTLP_ENDPOINT -u INSECURE_ADMIN \
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -c "$TWISTD" -n --pidfile= kvresponder --tenant "$TENANT" --port "$PORT" \
    --discovery-port "$UDP_PORT" --advertise-address 127.0.0.1 --node-id schema-1 --insecure-admin \
    >"$WORK/node.log" 2>&1 &
NODE_PID=$!
log "node $NODE_PID on $BASE (discovery udp $UDP_PORT)"

ready=""
for _ in $(seq 1 200); do
    if ! kill -0 "$NODE_PID" 2>/dev/null; then
        log "the node exited before it was ready:"
        tail -n 30 "$WORK/node.log" >&2
        exit 2
    fi
    if "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "$BASE/health/ready" >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.1
done
if [ -z "$ready" ]; then
    log "the node was not ready after 20 s:"
    tail -n 30 "$WORK/node.log" >&2
    exit 2
fi

# The served description must be the shipped one, but for its servers' default tenant (the node's own): it is
# what schemathesis is about to test against.
"$PYTHON" - "$BASE/openapi.json" "$SPEC" <<'PY'
import json, sys, urllib.request
served = json.load(urllib.request.urlopen(sys.argv[1], timeout=5))
with open(sys.argv[2], encoding="utf-8") as shipped:
    spec = json.load(shipped)
tenant = served["servers"][0]["variables"]["tenant"]
if not sys.argv[1].endswith("/%s/openapi.json" % (tenant["default"],)):
    sys.exit("schemathesis.sh: the node's description does not default to its own tenant: %r" % (tenant,))
tenant["default"] = spec["servers"][0]["variables"]["tenant"]["default"]
if served != spec:
    sys.exit("schemathesis.sh: the node serves a different openapi.json than %s" % (sys.argv[2],))
PY

# One deliberate allowance: a list cursor is an opaque token (base64url of the last key), so a schema-valid
# string the API never returned may be refused with 400 invalid_cursor, as the description says.
# No crash cache in the working tree (.schemathesis/): every run starts clean and leaves nothing behind.
cat >"$WORK/schemathesis.toml" <<'TOML'
[cache]
enabled = false

[[operations]]
include-path = "/kv"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
TOML

args=(--config-file "$WORK/schemathesis.toml" run "$SPEC" --url "$BASE" --checks all --max-examples "$MAX_EXAMPLES" --workers "$ST_WORKERS"
      --request-timeout 10 --generation-database none --no-color
      --report junit --report-dir "$WORK/report")
if [ -n "${ST_SEED:-}" ]; then
    args+=(--seed "$ST_SEED")
fi
log "schemathesis ${args[*]}"
status=0
# From the scratch directory, so that nothing schemathesis writes lands in the repository.
(cd "$WORK" && timeout --signal=TERM --kill-after=10 "$ST_TIMEOUT" "$ST" "${args[@]}") || status=$?
if [ "$status" -eq 124 ]; then
    log "schemathesis did not finish within ${ST_TIMEOUT}s"
fi
if ! kill -0 "$NODE_PID" 2>/dev/null; then
    log "the node died during the run:"
    tail -n 30 "$WORK/node.log" >&2
    status=3
elif grep -qE 'eliot:traceback|Traceback \(most recent' "$WORK/node.log"; then
    # Fine for schemathesis only if no failure was recorded; a traceback in the node's log is a bug either way.
    log "the node logged a traceback during the run:"
    grep -m 5 -E 'eliot:traceback|Traceback \(most recent' "$WORK/node.log" | cut -c1-2000 >&2 || true
    [ "$status" -ne 0 ] || status=4
fi
stop_node
exit "$status"
