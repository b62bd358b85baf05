"""
What tracing costs: the same single-node GET and PUT load with tracing off (no endpoint, the default) and
on (every request a server span, exported in batches over OTLP/HTTP to a local sink that accepts and drops
them).

    python3 bench/tracing_overhead.py [--interpreter cpython|pypy] [--duration S]
"""

import http.server
import threading

import benchlib as b
from single import measure


class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main() -> dict:
    p = b.parser("Tracing off against tracing on (OTLP/HTTP to a local sink), single node GET and PUT.")
    args = p.parse_args()
    python = b.interpreter_path(args.interpreter)
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = "http://127.0.0.1:%d" % (sink.server_address[1],)
    results = {}
    try:
        for mode in ("get", "put"):
            for label, env in (("off", {}), ("on", {"JAEGER_ENDPOINT": endpoint})):
                node = b.start_node(python, env=env)
                results["%s_%s" % (mode, label)] = measure(node, mode, "kv.lua", True, args)
    finally:
        sink.shutdown()
    data = {"description": "tracing off vs on", "results": results, "ratio_on_to_off": {
        mode: b.ratio(results[mode + "_on"]["rps"], results[mode + "_off"]["rps"]) for mode in ("get", "put")}}
    return b.finish("tracing_overhead", args, python, data)


if __name__ == "__main__":
    main()
