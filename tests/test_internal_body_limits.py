"""
What a caller without the cluster secret can make a node read before its signature is checked, and what peers
still send.
"""

import os
import socket
import time

import pytest

from .harness import Cluster, rss_bytes


@pytest.fixture
def cluster(log_dir):
    nodes = Cluster("bodies", log_dir)
    try:
        yield nodes
    finally:
        nodes.stop()


def _temp_bytes(pid: int, directory: str) -> int:
    """Bytes in the files under ``directory`` (deleted or not) that process ``pid`` holds open."""
    total = 0
    fds = "/proc/%d/fd" % (pid,)
    for fd in os.listdir(fds):
        try:
            target = os.readlink(os.path.join(fds, fd))
            if target.startswith(directory):
                total += os.stat(os.path.join(fds, fd)).st_size
        except OSError:
            pass
    return total


@pytest.mark.e2e
def test_an_unsigned_internal_body_is_refused_before_it_is_buffered(cluster, log_dir):
    """
    If a caller without the cluster secret sends ``/_internal/apply`` a body larger than a bulk request's limit
    (the internal routes take up to 64 MiB from peers), then the node answers at once, from the head, without
    reading the body into memory or its temporary directory (the chart's /tmp is a 64Mi emptyDir): otherwise every
    connection (up to MAX_CONNECTIONS) could make it hold up to 64 MiB before the signature is even checked.
    """
    tmp = os.path.join(log_dir, "tmp")
    os.mkdir(tmp)
    node = cluster.add(env={"TMPDIR": tmp})
    before = rss_bytes(node.process.pid)
    declared = 48 * 1024 * 1024
    sock = socket.create_connection(("127.0.0.1", node.port))
    try:
        sock.sendall(b"POST /%s/_internal/apply HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-KV-Auth: %.3f:%s\r\nContent-Length: %d\r\n\r\n"
                     % (cluster.tenant.encode(), time.time(), b"0" * 64, declared))
        chunk = b" " * (1024 * 1024)
        sent = 0
        sock.settimeout(5)
        try:
            while sent < declared - len(chunk):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        time.sleep(0.5)
        held = _temp_bytes(node.process.pid, tmp)
        assert held < 2 * 1024 * 1024, "the node spooled %d bytes of an unsigned body to %s" % (held, tmp)
        grown = rss_bytes(node.process.pid) - before
        assert grown < 24 * 1024 * 1024, "the node holds %d MB more for an unsigned body" % (grown >> 20,)
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 413") or head.startswith(b"HTTP/1.1 401"), head[:200]
    finally:
        sock.close()


@pytest.mark.e2e
def test_a_peers_signed_body_over_a_bulk_limit_is_still_taken(cluster):
    """
    If a peer sends ``/_internal/apply`` a body larger than a bulk request's limit (8 x MAX_VALUE_SIZE) with its
    head signed for that length, then it is taken; the same body without the head's signature gets 413.
    """
    import json

    import requests

    from kvresponder.discovery import derive_key
    from kvresponder.peertransport import PeerAuthenticator

    node = cluster.add()
    signer = PeerAuthenticator(derive_key(cluster.env["CLUSTER_SECRET"], "peer"), time.time)
    path = "/%s/_internal/apply" % (cluster.tenant,)
    version = [int(time.time() * 1000), 0, "n9"]
    body = json.dumps({"entries": [{"k": "big-%d" % (index,), "v": json.dumps("x" * (700 * 1024)), "ver": version}
                                   for index in range(14)]}).encode("utf-8")
    assert len(body) > 8 * 1024 * 1024
    headers = {"Content-Type": "application/json",
               "X-KV-Auth": signer.sign(b"POST", path.encode("ascii"), body).decode("ascii")}
    url = "http://127.0.0.1:%d%s" % (node.port, path)
    unsigned_head = requests.post(url, data=body, headers=headers, timeout=10)
    assert unsigned_head.status_code == 413, unsigned_head.text
    headers["X-KV-Auth-Length"] = signer.sign_length(b"POST", path.encode("ascii"), len(body)).decode("ascii")
    signed = requests.post(url, data=body, headers=headers, timeout=10)
    assert signed.status_code == 200, signed.text
    assert len(node.get("big-13").json()["value"]) == 700 * 1024


@pytest.mark.e2e
def test_a_joining_node_receives_handoff_batches_larger_than_a_value(log_dir):
    """
    If a node joins a node holding many keys, then the batches that move its share to it (each up to 4 MiB, far
    over a small ``MAX_VALUE_SIZE``) are taken: the peers sign their heads' lengths.
    """
    nodes = Cluster("bodies", log_dir, env={"MAX_VALUE_SIZE": "64Ki", "REPLICATION_FACTOR": "1"})
    try:
        first = nodes.add()
        for index in range(120):
            assert first.put("k%03d" % (index,), "v" * (40 * 1024)).status_code == 201
        second = nodes.add()
        nodes.wait_formed()
        nodes.wait_for(lambda: second.metric("kv_store_keys") >= 30 and first.metric("kv_store_keys") < 100,
                       timeout=30, message="the joining node's share handed to it")
    finally:
        nodes.stop()


@pytest.mark.e2e
def test_a_large_bulk_body_is_not_spooled_to_the_temporary_directory(cluster, log_dir):
    """
    If a client sends a /bulk body of several MiB (within its limit, 8 x MAX_VALUE_SIZE) and pauses before its
    end, then nothing of it is written to the node's temporary directory (the chart's /tmp is an emptyDir with a
    64Mi size limit, which a few concurrent bulk bodies spooled there would pass, and the pod would be evicted);
    the request is served once its body is in.
    """
    tmp = os.path.join(log_dir, "tmp")
    os.mkdir(tmp)
    node = cluster.add(env={"TMPDIR": tmp})
    value = "v" * (512 * 1024)
    body = ('{"put": [%s]}' % (", ".join('{"key": "b%d", "value": "%s"}' % (i, value) for i in range(12)),)).encode()
    sock = socket.create_connection(("127.0.0.1", node.port))
    try:
        sock.sendall(b"POST /%s/bulk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (cluster.tenant.encode(), len(body)))
        sock.sendall(body[:-10])
        time.sleep(0.5)
        held = _temp_bytes(node.process.pid, tmp)
        assert held == 0 and not os.listdir(tmp), "the node spooled %d bytes of a bulk body to %s" % (held, tmp)
        sock.sendall(body[-10:])
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 "), node.log_tail(5)
    finally:
        sock.close()



@pytest.mark.e2e
def test_many_clients_sending_large_bodies_at_once_hold_no_more_than_the_body_buffer(cluster):
    """
    If 24 clients each declare a /bulk body of 8 MiB (its limit) and send 7 MiB of it, then the node holds the
    bodies of as many as MAX_BODY_BUFFER fits (by default 64 MiB: eight), and answers the others 503
    ``body_buffer_full`` at once, unread: its memory grows by about the buffer, not by all 24 bodies (168 MiB).
    Once the held ones are answered, a new bulk request is taken.
    """
    node = cluster.add()
    declared = 8 * 1024 * 1024
    chunk = b" " * (1024 * 1024)
    before = rss_bytes(node.process.pid)
    head = (b"POST /%s/bulk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (cluster.tenant.encode(), declared))
    socks = []
    try:
        for _ in range(24):
            sock = socket.create_connection(("127.0.0.1", node.port))
            sock.settimeout(5)
            socks.append(sock)
            try:
                sock.sendall(head)
                for _ in range(7):
                    sock.sendall(chunk)
            except OSError:
                pass
        time.sleep(1.0)
        grown = rss_bytes(node.process.pid) - before
        answers = []
        for sock in socks:
            sock.settimeout(0.2)
            try:
                answers.append(sock.recv(65536))
            except (socket.timeout, OSError):
                answers.append(b"")
        refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 503 ")]
        assert all(b'"body_buffer_full"' in answer for answer in refused), refused[:1]
        assert len(refused) == 16 and answers.count(b"") == 8, [answer[:40] for answer in answers]
        assert grown < 110 * 1024 * 1024, "the node holds %d MiB more for 24 bodies" % (grown >> 20,)
    finally:
        for sock in socks:
            sock.close()
    body = b'{"put": [{"key": "after", "value": "%s"}]}' % (b"v" * (900 * 1024),)
    import requests
    answer = requests.post(node.url + "/bulk", data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 200, answer.text
