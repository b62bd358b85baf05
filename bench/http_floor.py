"""
What answering HTTP costs before any cache work, on one interpreter, in one invocation: the same `wrk` GET of one
URL against

- ``protocol``: a bare Twisted ``Protocol`` that frames requests by their blank line and Content-Length and answers
  each with the same small JSON body (the floor of a Twisted server: the reactor and two system calls);
- ``twisted_web``: a bare ``twisted.web`` ``Site`` whose leaf resource returns that body (Twisted's HTTP server:
  ``HTTPChannel``, ``Request``, traversal);
- ``kvresponder``: a KV Responder node answering a GET of a stored key (through its fast lane).

    python3 bench/http_floor.py [--interpreter cpython|pypy] [--duration 10] [--warmup 15]

Why the kv routes have a lane of their own (ARCHITECTURE.md, "Serving HTTP"): the gap between the first two.
"""

import os
import re
import subprocess
import sys
import time
import urllib.request

import benchlib as b

BODY = b'{"key":"k1","value":"hello world","version":"1.0.n1","expires_at":null}'

SERVER = r'''
import sys
from twisted.internet import protocol, reactor
from twisted.web import resource, server

BODY = %r
port, kind = int(sys.argv[1]), sys.argv[2]
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %%d\r\n\r\n" %% len(BODY)) + BODY


class Bare(protocol.Protocol):
    buffer = b""

    def dataReceived(self, data):
        buffer = self.buffer + data
        out = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            length = 0
            head = buffer[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:line_end if line_end >= 0 else None])
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length:]
            out.append(ANSWER)
        self.buffer = buffer
        if out:
            self.transport.write(b"".join(out))


class Leaf(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        return BODY


if kind == "protocol":
    factory = protocol.Factory.forProtocol(Bare)
else:
    factory = server.Site(Leaf())
    factory.displayTracebacks = False
reactor.listenTCP(port, factory, interface="127.0.0.1")
reactor.run()
''' % (BODY,)


def wrk(url: str, seconds: float, connections: int, threads: int) -> dict:
    out = subprocess.run(["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % max(1, round(seconds)), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        raise RuntimeError("wrk gave no rate:\n" + out)
    return {"rps": float(rate.group(1)), "requests": int(total.group(1))}


def measure(process: b.Process, url: str, args) -> dict:
    wrk(url, args.warmup, args.connections, args.threads)
    cpu = process.cpu_seconds()
    result = wrk(url, args.duration, args.connections, args.threads)
    result["cpu_us_per_request"] = round((process.cpu_seconds() - cpu) / max(result["requests"], 1) * 1e6, 1)
    return result


def main() -> dict:
    args = b.parser(__doc__.strip().splitlines()[0], warmup=15.0).parse_args()
    python = b.interpreter_path(args.interpreter)
    results = {}
    try:
        for kind in ("protocol", "twisted_web"):
            port = b.free_port()
            process = b.Process(kind, [python, "-c", SERVER, str(port), kind], b.node_env(), port,
                                "http://127.0.0.1:%d/%s" % (port, b.TENANT))
            process.wait_ready()
            results[kind] = measure(process, process.base + "/kv/k1", args)
            process.stop()
            time.sleep(1)
        node = b.start_node(python)
        node.wait_ready()
        request = urllib.request.Request(node.base + "/kv/k1", data=b'{"value": "hello world"}', method="PUT",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        results["kvresponder"] = measure(node, node.base + "/kv/k1", args)
    finally:
        b.stop_all()
    floor = results["protocol"]["rps"]
    for result in results.values():
        result["ratio_to_protocol"] = round(result["rps"] / floor, 3) if floor else None
    data = b.finish("http_floor", args, python, {"results": results})
    print("http_floor (%s): protocol %.0f, twisted.web %.0f, KV Responder %.0f req/s" % (
        args.interpreter, results["protocol"]["rps"], results["twisted_web"]["rps"], results["kvresponder"]["rps"]),
        file=sys.stderr)
    return data


if __name__ == "__main__":
    os.chdir(b.REPO)
    main()
