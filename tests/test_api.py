"""
The public API of one node, through StubTreq against the real resource tree and the real Site: every route
and every error.
"""

import json
import re
import time

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet.task import Clock

from kvresponder.http.errors import APIError
from kvresponder.http.root import build_root
from kvresponder.http.site import PROBE_SECONDS, PROBES_OVER_CAP, KVSite
from kvresponder.node import Node

from .support import make_settings, stub_over


class API:
    def __init__(self, **overrides):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.node = Node(make_settings(**overrides), self.clock, http=None, join_settle=0.1)
        settings = self.node.settings
        self.site = KVSite(build_root(self.node), self.clock, metrics=self.node.metrics,
                           log_policy=self.node.log_policy, body_limit=settings.max_value_size,
                           max_connections=settings.max_connections)
        self.stub = stub_over(self.site)
        self.node.start()
        self.clock.advance(0.2)
        if settings.clustering != "disabled":
            # A node that may cluster and hears no peer serves once a heartbeat interval has passed.
            self.clock.advance(settings.heartbeat_interval)

    def raw(self, method, path, data=None, headers=None):
        d = self.stub.request(method, "http://127.0.0.1:3000" + path, data=data, headers=headers or {})
        self.stub.flush()
        responses = []
        d.addBoth(responses.append)
        self.stub.flush()
        response = responses[0]
        bodies = []
        self.stub.content(response).addBoth(bodies.append)
        self.stub.flush()
        return response, bodies[0]

    def call(self, method, path, body=None, headers=None, raw_body=None):
        headers = dict(headers or {})
        data = raw_body
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        response, content = self.raw(method, "/t1" + path, data, headers)
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = content
        return response.code, parsed, response

    def put(self, key, value, ttl=None):
        body = {"value": value}
        if ttl is not None:
            body["ttl"] = ttl
        return self.call("PUT", "/kv/" + key, body)


@pytest.fixture
def api():
    return API()


def assert_error(code, body, status, error):
    assert code == status, body
    assert set(body) == {"error", "message"}, body
    assert body["error"] == error
    assert isinstance(body["message"], str) and body["message"]


# -- kv -----------------------------------------------------------------------------------------------


def test_put_creates_then_replaces(api):
    """
    If a key is written twice, then the first PUT answers 201 and the second 200, with a newer version.
    """
    code, first, _ = api.put("greeting", "hello")
    assert code == 201
    assert first["key"] == "greeting" and first["expires_at"] is None
    code, second, _ = api.put("greeting", "bonjour")
    assert code == 200
    assert second["version"] != first["version"]
    code, body, _ = api.call("GET", "/kv/greeting")
    assert code == 200
    assert body == {"key": "greeting", "value": "bonjour", "version": second["version"], "expires_at": None}


def test_get_returns_the_value_byte_for_byte(api):
    """
    If a JSON value is stored, then GET embeds exactly its compact serialization.
    """
    api.put("doc", {"b": [1, 2.5, None, True], "a": "é"})
    response, content = api.raw("GET", "/t1/kv/doc")
    assert b'"value":{"b":[1,2.5,null,true],"a":"\xc3\xa9"}' in content


def test_get_of_absent_key_is_404(api):
    code, body, _ = api.call("GET", "/kv/nothing")
    assert_error(code, body, 404, "not_found")


def test_ttl_expires_the_key(api):
    """
    If a key is written with a ttl, then it is served until the ttl passes and never after.
    """
    code, body, _ = api.put("session", 1, ttl=5)
    assert code == 201
    assert body["expires_at"] == pytest.approx(api.clock.seconds() + 5, abs=0.01)
    api.clock.advance(4.9)
    assert api.call("GET", "/kv/session")[0] == 200
    api.clock.advance(0.2)
    assert api.call("GET", "/kv/session")[0] == 404
    assert "session" not in api.call("GET", "/kv")[1]["keys"]


def test_delete_existing_then_absent(api):
    """
    If a key is deleted, then DELETE answers 200, the key is gone, and a second DELETE answers 404.
    """
    api.put("k", 1)
    code, body, _ = api.call("DELETE", "/kv/k")
    assert code == 200 and body == {"key": "k", "deleted": True}
    assert api.call("GET", "/kv/k")[0] == 404
    code, body, _ = api.call("DELETE", "/kv/k")
    assert_error(code, body, 404, "not_found")


@pytest.mark.parametrize("raw, key", [
    ("plain", "plain"), ("a%22b", 'a"b'), ("a%5Cb", "a\\b"), ("%C3%A9t%C3%A9", "\u00e9t\u00e9"),
    ("tab%09", "tab\t"), ("nul%00", "nul\x00"), ("sp%20ace", "sp ace"), ("%E2%80%A8", "\u2028"),
])
def test_a_key_comes_back_in_the_body_exactly_as_written(api, raw, key):
    """
    If a key needs escaping in JSON (a quote, a backslash, a control character) or is not ASCII, then the
    GET body still parses and names the key exactly.
    """
    assert api.put(raw, 1)[0] == 201
    code, body, _ = api.call("GET", "/kv/" + raw)
    assert code == 200 and body["key"] == key and body["value"] == 1


def test_key_with_encoded_slash(api):
    """
    If a key contains a percent-encoded slash, then it is one key, listed with its slash.
    """
    assert api.put("a%2Fb", 1)[0] == 201
    code, body, _ = api.call("GET", "/kv/a%2Fb")
    assert code == 200 and body["key"] == "a/b"
    assert api.call("GET", "/kv")[1]["keys"] == ["a/b"]


def test_list_pages_through_every_key_exactly_once(api):
    """
    If keys are listed in pages, then following the cursors yields every key once, in order.
    """
    keys = ["k%03d" % (i,) for i in range(25)] + ["other"]
    for key in keys:
        api.put(key, key)
    seen = []
    cursor = None
    while True:
        path = "/kv?prefix=k&limit=7" + ("&cursor=" + cursor if cursor else "")
        code, body, _ = api.call("GET", path)
        assert code == 200
        assert body["count"] == len(body["keys"])
        seen.extend(body["keys"])
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == sorted(k for k in keys if k.startswith("k"))


def test_a_page_that_ends_on_the_longest_key_can_be_followed():
    """
    If a page ends on a key of 250 four-byte characters (1000 UTF-8 bytes, a 1334-character cursor), then
    its cursor is accepted and the next page follows it.
    """
    from urllib.parse import quote
    api = API(max_key_length=256)
    longest = "\U0001f600" * 256
    keys = ["a", "\U0001f600" * 250, longest, "\U0001f601"]
    for key in keys:
        assert api.put(quote(key, safe=""), 1)[0] == 201
    seen, cursor = [], None
    while True:
        code, body, _ = api.call("GET", "/kv?limit=1" + ("&cursor=" + cursor if cursor else ""))
        assert code == 200, body
        seen.extend(body["keys"])
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == sorted(keys)


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "limit=x", "cursor=%25%25%25",
                                   # int() takes these; a limit is plain ASCII digits.
                                   "limit=1_0", "limit=%202", "limit=2%20", "limit=%EF%BC%92", "limit=%D9%A3",
                                   "limit=+5", "limit=-1", "limit=" + "0" * 20 + "5"])
def test_list_rejects_bad_parameters(api, query):
    code, body, _ = api.call("GET", "/kv?" + query)
    assert code == 400, body
    assert body["error"] in ("invalid_limit", "invalid_cursor")


@pytest.mark.parametrize("query", ["limit=3&limit=abc", "limit=abc&limit=3", "prefix=a&prefix=b",
                                   "prefix=a&limit=2&prefix%3D=x&prefix=b"])
def test_a_list_parameter_given_twice_is_400(api, query):
    """
    If a query names a parameter of the listing twice, then the answer is 400, whichever of its values comes
    first: taking one would be a guess.
    """
    code, body, _ = api.call("GET", "/kv?" + query)
    assert_error(code, body, 400, "invalid_query")


@pytest.mark.parametrize("query", ["_=1&_=2", "limit", "limit&limit=2", "x&y=1&y=2&limit=2"])
def test_parameters_a_listing_does_not_take_and_parts_without_a_value_are_left_out(api, query):
    """
    If a query repeats a parameter the listing does not take (a cache-buster), or has a part without ``=``, then
    those are left out, as the API says of unlisted parameters.
    """
    for key in ("a", "b", "c"):
        assert api.put(key, 1)[0] == 201
    code, body, _ = api.call("GET", "/kv?" + query)
    assert code == 200, body
    assert body["keys"] == (["a", "b"] if "limit=2" in query else ["a", "b", "c"])


def test_a_conditional_delete_is_refused_but_a_delete_needs_no_content_headers(api):
    """
    If a DELETE (which has no body) carries a Content-Encoding or two Content-Types, then they are ignored, as
    for any request without a body; a precondition on it is still refused.
    """
    for headers in ({"Content-Encoding": "gzip"}, {"Content-Type": ["text/plain", "application/json"]}):
        assert api.put("k", 1)[0] == 201
        code, body, _ = api.call("DELETE", "/kv/k", headers=headers)
        assert code == 200, (headers, body)


def test_a_list_prefix_is_split_on_ampersands_only(api):
    """
    If a prefix holds a ``;``, then it is part of the prefix (URLs split a query on ``&``, not on ``;``); a
    ``+`` is a space, as in a form.
    """
    for key in ("x;p", "x#frag", "xy", "c x", "c+x"):
        assert api.put(key, 1)[0] == 201
    assert api.call("GET", "/kv?prefix=x;")[1]["keys"] == ["x;p"]
    assert api.call("GET", "/kv?prefix=x%3B&limit=5")[1]["keys"] == ["x;p"]
    assert api.call("GET", "/kv?prefix=c+")[1]["keys"] == ["c x"]
    assert api.call("GET", "/kv?prefix=c%2B")[1]["keys"] == ["c+x"]


def test_a_cursor_longer_than_any_key_is_400(api):
    """
    If a cursor decodes to more than any key's bytes (the pattern the API describes allows two more), then it is
    400, as any cursor this API did not return: peers refuse to list after it.
    """
    import base64

    cursor = base64.urlsafe_b64encode(b"a" * 1026).decode("ascii").rstrip("=")
    assert len(cursor) == 1368
    code, body, _ = api.call("GET", "/kv?cursor=" + cursor)
    assert_error(code, body, 400, "invalid_cursor")
    longest = base64.urlsafe_b64encode(b"a" * 1024).decode("ascii").rstrip("=")
    assert api.call("GET", "/kv?cursor=" + longest)[0] == 200


@pytest.mark.parametrize("cursor", ["YWJj%0A", "YWJj%0A%0A", "%0AYWJj"])
def test_a_cursor_with_a_newline_is_400_though_the_rest_is_one_the_api_returned(api, cursor):
    """
    If a cursor this API returned comes back with a newline before or after it, then it is 400: the pattern's
    ``$`` matched before a last newline, and the padded cursor was taken.
    """
    code, body, _ = api.call("GET", "/kv?cursor=" + cursor)
    assert_error(code, body, 400, "invalid_cursor")
    assert api.call("GET", "/kv?cursor=YWJj")[0] == 200


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, error", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_body"),
    (b'{"ttl": 5}', "missing_value"),
    (b'{"value": 1, "ttl": -1}', "invalid_ttl"),
    (b'{"value": 1, "ttl": "soon"}', "invalid_ttl"),
    (b'{"value": 1, "ttl": true}', "invalid_ttl"),
    (b'{"value": NaN}', "invalid_json"),
    (b'{"value": [1, -Infinity]}', "invalid_json"),
    (b'{"value": 1, "ttl": Infinity}', "invalid_json"),
    (b'{"value": 1, "tll": 5}', "invalid_body"),
    (b"\xff\xfe", "invalid_json"),
])
def test_bad_put_bodies_are_400_and_change_nothing(api, raw, error):
    """
    If a PUT body is malformed, then the answer is a JSON 400 and the key stays absent.
    """
    code, body, _ = api.call("PUT", "/kv/k", raw_body=raw, headers={"Content-Type": "application/json"})
    assert_error(code, body, 400, error)
    assert api.call("GET", "/kv/k")[0] == 404


def test_an_integer_of_more_digits_than_python_converts_is_refused_saying_so(api):
    """
    If a value holds an integer of more digits than Python converts (4300 by default), then the PUT is 400
    ``invalid_json`` saying so and the key stays absent; it was called "not valid JSON", which it is. One digit
    fewer is stored.
    """
    import sys

    limit = sys.get_int_max_str_digits()
    raw = b'{"value": %s}' % (b"1" * (limit + 1),)
    code, body, _ = api.call("PUT", "/kv/big", raw_body=raw, headers={"Content-Type": "application/json"})
    assert_error(code, body, 400, "invalid_json")
    assert "more than %d digits" % (limit,) in body["message"], body
    assert api.call("GET", "/kv/big")[0] == 404
    code, body, _ = api.call("PUT", "/kv/big", raw_body=b'{"value": %s}' % (b"1" * limit,),
                             headers={"Content-Type": "application/json"})
    assert code == 201, body


def test_the_words_nan_and_infinity_inside_strings_are_plain_text(api):
    code, body, _ = api.call("PUT", "/kv/words", raw_body=b'{"value": {"NaN": "Infinity and beyond"}}',
                             headers={"Content-Type": "application/json"})
    assert code == 201, body
    code, body, _ = api.call("GET", "/kv/words")
    assert code == 200 and body["value"] == {"NaN": "Infinity and beyond"}


def test_too_long_key_is_400(api):
    code, body, _ = api.put("x" * 251, 1)
    assert_error(code, body, 400, "invalid_key")
    assert api.put("x" * 250, 1)[0] == 201


@pytest.mark.parametrize("char", ["x", "\u00e9", "\u20ac", "\U0001f600"])
def test_the_key_limit_counts_characters_as_the_description_does(api, char):
    """
    If a key is 250 characters of 1, 2, 3 or 4 UTF-8 bytes each, then it is stored and read back by its path
    and by bulk; 251 such characters are refused with 400 and nothing is stored. JSON Schema's maxLength
    (docs/openapi.json, Key) counts code points: a byte limit refused schema-valid keys.
    """
    from urllib.parse import quote
    key = char * 250
    assert api.put(quote(key, safe=""), 1)[0] == 201
    code, body, _ = api.call("GET", "/kv/" + quote(key, safe=""))
    assert code == 200 and body["key"] == key
    code, body, _ = api.call("POST", "/bulk", {"put": [{"key": key, "value": 2}], "get": [key]})
    assert code == 200 and body["put"][0]["status"] == 200, body
    assert body["get"][key]["key"] == key
    longer = char * 251
    code, body, _ = api.put(quote(longer, safe=""), 1)
    assert_error(code, body, 400, "invalid_key")
    code, body, _ = api.call("POST", "/bulk", {"put": [{"key": longer, "value": 1}]})
    assert_error(code, body, 400, "invalid_key")
    assert api.call("GET", "/kv/" + quote(longer, safe=""))[0] == 400
    assert api.call("GET", "/kv?prefix=" + quote(char, safe=""))[1]["keys"] == [key]


def test_a_key_with_a_lone_surrogate_is_400_in_bulk(api):
    code, body, _ = api.call("POST", "/bulk", raw_body=b'{"put": [{"key": "a\\ud800", "value": 1}]}',
                             headers={"Content-Type": "application/json"})
    assert_error(code, body, 400, "invalid_key")


def test_invalid_utf8_key_is_400(api):
    code, body, _ = api.call("GET", "/kv/%FF")
    assert_error(code, body, 400, "invalid_key")


@pytest.mark.parametrize("path", ["/%FF/kv/x", "/other/%FF", "/t1/%FF", "/t1/health/%C3"])
def test_a_path_that_is_not_utf8_is_400_invalid_path_whichever_tenant_it_names(api, path):
    """
    If a path is not UTF-8 once percent-decoded, in its tenant segment or below another tenant's, then it is
    answered 400 ``invalid_path``, as the API's description says, not 404.
    """
    response, content = api.raw("GET", path, None, {})
    assert_error(response.code, json.loads(content), 400, "invalid_path")


def test_wrong_content_type_is_415(api):
    code, body, _ = api.call("PUT", "/kv/k", raw_body=b'{"value": 1}', headers={"Content-Type": "text/plain"})
    assert_error(code, body, 415, "unsupported_media_type")
    assert api.call("GET", "/kv/k")[0] == 404


@pytest.mark.parametrize("method, path, body, headers", [
    ("PUT", "/kv/k", {"value": "new"}, {"If-None-Match": "*"}),
    ("PUT", "/kv/k", {"value": "new"}, {"If-Match": '"v1"'}),
    ("PUT", "/kv/k", {"value": "new"}, {"If-Unmodified-Since": "Sun, 06 Dec 2026 10:00:00 GMT"}),
    ("DELETE", "/kv/k", None, {"If-Match": "*"}),
    ("POST", "/bulk", {"put": [{"key": "k", "value": "new"}]}, {"If-None-Match": "*"}),
    ("POST", "/bulk", {"delete": ["k"]}, {"If-Match": "*"}),
])
def test_a_conditional_write_is_refused_and_changes_nothing(api, method, path, body, headers):
    """
    If a write carries a precondition (``If-None-Match: *``, "create only", above all), then it is refused
    400, not done as if unconditional: there is nothing to hold the condition to, and the key is unchanged.
    """
    assert api.put("k", "old")[0] == 201
    code, answer, _ = api.call(method, path, body, headers=headers)
    assert_error(code, answer, 400, "unsupported_precondition")
    assert api.call("GET", "/kv/k")[1]["value"] == "old"


@pytest.mark.parametrize("headers, status, error", [
    ({"Content-Encoding": "gzip"}, 415, "unsupported_media_type"),
    ({"Content-Encoding": "identity, br"}, 415, "unsupported_media_type"),
    ({"Content-Type": "application/json; charset=latin-1"}, 415, "unsupported_media_type"),
    ({"Content-Type": 'application/json; CHARSET="utf-16"'}, 415, "unsupported_media_type"),
    ({"Content-Type": "application/json; charset=iso-8859-1"}, 415, "unsupported_media_type"),
    ({"Content-Type": ["text/plain", "application/json"]}, 400, "invalid_header"),
    ({"Content-Type": ["application/json", "application/json"]}, 400, "invalid_header"),
])
def test_a_write_whose_body_is_not_plain_utf8_json_is_refused_and_changes_nothing(api, headers, status, error):
    """
    If a write's body is coded (gzip), in another charset, or given two Content-Types, then it is refused and
    the key stays absent, single or bulk.
    """
    data = b'{"value": 1}'
    code, body, _ = api.call("PUT", "/kv/k", raw_body=data, headers=headers)
    assert_error(code, body, status, error)
    code, body, _ = api.call("POST", "/bulk", raw_body=b'{"put": [{"key": "k", "value": 1}]}', headers=headers)
    assert_error(code, body, status, error)
    assert api.call("GET", "/kv/k")[0] == 404


@pytest.mark.parametrize("headers", [
    {"Content-Encoding": "identity"},
    {"Content-Type": "application/json; charset=utf-8"},
    {"Content-Type": "Application/JSON;charset=UTF8"},
    {"Content-Type": "application/json; charset=us-ascii"},
])
def test_a_write_of_plain_utf8_json_so_labelled_is_taken(api, headers):
    headers = dict(headers)
    headers.setdefault("Content-Type", "application/json")
    code, body, _ = api.call("PUT", "/kv/k", raw_body=b'{"value": 1}', headers=headers)
    assert code == 201, body


def test_body_over_max_value_size_is_413_and_changes_nothing():
    """
    If the body is larger than MAX_VALUE_SIZE, then the answer is 413 and nothing is stored.
    """
    api = API(max_value_size="1Ki")
    code, body, _ = api.put("big", "x" * 2000)
    assert_error(code, body, 413, "payload_too_large")
    assert api.call("GET", "/kv/big")[0] == 404
    assert api.put("small", "x" * 500)[0] == 201


def test_a_body_within_the_limit_whose_value_as_stored_is_not_is_413_and_changes_nothing():
    """
    If a PUT's body is within MAX_VALUE_SIZE but its value, written again as JSON, is not (``1E15`` is stored as
    ``1000000000000000.0``), then the answer is 413 and nothing is stored, as a bulk write's is: a peer takes
    copies no larger than that, and a larger one closed its copy stream.
    """
    api = API(max_value_size="1Ki")
    body = json.dumps({"value": [1e15] * 150}).replace("1000000000000000.0", "1E15").encode()
    assert len(body) < 1024
    code, answer, _ = api.call("PUT", "/kv/grown", raw_body=body, headers={"Content-Type": "application/json"})
    assert_error(code, answer, 413, "payload_too_large")
    assert api.call("GET", "/kv/grown")[0] == 404


def test_a_body_the_budget_of_bodies_held_has_no_room_for_is_503_and_changes_nothing_where_it_cannot_be_refused_unread():
    """
    If the budget of bodies held has no room for a body (another request's holds it all), on a connection that
    cannot be handed over to refuse it unread (TLS; here an in-memory one), then the body is read and dropped,
    and the answer is 503 ``body_buffer_full`` with ``Retry-After: 1``; nothing is stored, and the room it never
    held is not given back.
    """
    api = API()
    budget = api.site.body_budget
    assert budget.reserve(budget.limit - 100 * 1024)
    code, body, response = api.put("big", "x" * (200 * 1024))
    assert_error(code, body, 503, "body_buffer_full")
    assert response.headers.getRawHeaders(b"retry-after") == [b"1"]
    assert api.call("GET", "/kv/big")[0] == 404
    assert budget.held == budget.limit - 100 * 1024
    assert api.put("small", "x" * 1000)[0] == 201
    budget.release(budget.held)
    assert api.put("big", "x" * (200 * 1024))[0] == 201


def test_value_larger_than_the_whole_budget_is_413():
    api = API(max_memory="64Ki", max_value_size="1Mi")
    code, body, _ = api.put("huge", "x" * 70000)
    assert_error(code, body, 413, "payload_too_large")


@pytest.mark.parametrize("method, path, allow", [
    ("POST", "/kv/k", "GET, HEAD, PUT, DELETE"),
    ("DELETE", "/kv", "GET, HEAD"),
    ("POST", "/health", "GET, HEAD"),
    ("DELETE", "/admin/log-levels", None),
])
def test_wrong_method_is_405_with_allow(api, method, path, allow):
    code, body, response = api.call(method, path)
    assert_error(code, body, 405, "method_not_allowed")
    header = response.headers.getRawHeaders(b"allow")
    assert header, "no Allow header"
    if allow is not None:
        assert header[0].decode() == allow


@pytest.mark.parametrize("path", ["/t1/nope", "/t1/kvx", "/t1/", "/t1", "/"])
def test_unknown_route_is_json_404(api, path):
    response, content = api.raw("GET", path)
    assert response.code == 404
    assert json.loads(content)["error"] == "not_found"


def test_other_tenant_is_404_naming_ours(api):
    """
    If a request names another tenant, then it gets a 404 that names the tenant this node serves.
    """
    response, content = api.raw("GET", "/t2/kv/k")
    body = json.loads(content)
    assert response.code == 404 and body["error"] == "not_found"
    assert "t1" in body["message"]


def test_no_traceback_reaches_the_client(api, monkeypatch):
    """
    If a handler raises unexpectedly, then the client gets a JSON 500 without the exception's text.
    """
    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(api.node, "health", explode)
    response, content = api.raw("GET", "/t1/health")
    assert response.code == 500
    assert json.loads(content) == {"error": "internal_error",
                                   "message": "The server failed to handle this request."}
    assert b"secret internals" not in content and b"Traceback" not in content


# -- health, peers, diag, metrics ------------------------------------------------------------------


def test_health_answers_status_tenant_node_and_counts_and_its_live_and_ready_forms_answer_200(api):
    """
    If a ready node is asked for its health, then ``/health`` names its status, tenant and node with its uptime,
    keys and peers, and ``/health/live`` and ``/health/ready`` answer 200.
    """
    code, body, _ = api.call("GET", "/health")
    assert code == 200
    assert body["status"] == "ok" and body["tenant"] == "t1" and body["node"] == "n1"
    assert {"uptime_s", "keys", "peers"} <= set(body)
    assert api.call("GET", "/health/live")[0] == 200
    assert api.call("GET", "/health/ready")[0] == 200


def test_readiness_is_503_while_draining(api):
    api.node.begin_leaving()
    code, body, _ = api.call("GET", "/health/ready")
    assert code == 503 and body["status"] == "draining"
    assert api.call("GET", "/health/live")[0] == 200


def test_readiness_is_503_before_joining():
    api = API.__new__(API)
    api.clock = Clock()
    api.node = Node(make_settings(), api.clock, http=None, join_settle=5)
    api.site = KVSite(build_root(api.node), api.clock)
    api.stub = stub_over(api.site)
    api.node.start()
    assert api.call("GET", "/health/ready")[0] == 503
    api.clock.advance(5.1)
    assert api.call("GET", "/health/ready")[0] == 200


def test_peers_is_an_empty_list_alone(api):
    assert api.call("GET", "/peers")[:2] == (200, [])


def test_a_read_sent_to_a_stopped_node_is_told_it_is_stopping_not_starting(api):
    """
    If a read reaches a node that has stopped (between the end of its drain and its listener closing), then it is
    503 ``unavailable`` saying the node is stopping, not that it is "not serving yet".
    """
    api.node.stop()
    code, body, _ = api.call("GET", "/kv/anything")
    assert_error(code, body, 503, "unavailable")
    assert "stopping" in body["message"], body


def test_diag_redacts_secrets():
    api = API(cluster_secret="s" * 20, admin_token="t" * 20)
    code, body, _ = api.call("GET", "/diag")
    assert code == 200
    assert body["config"]["cluster_secret"] == "<set>" and body["config"]["admin_token"] == "<set>"
    text = json.dumps(body)
    assert "s" * 20 not in text and "t" * 20 not in text
    assert {"version", "python", "reactor", "store", "uptime_s", "open_connections"} <= set(body)


def test_diag_says_what_the_node_does_where_its_configuration_leaves_it_to_the_node():
    """
    If WRITE_QUORUM and LISTEN_ADDRESS are left unset (``null`` in ``config``), then ``effective`` says what the
    node does: the copies a write needs now (the replication factor, or the ring's size when smaller) and where
    it listens; a WRITE_QUORUM that is set is shown as it is.
    """
    body = API(replicas="2").call("GET", "/diag")[1]
    assert body["config"]["write_quorum"] is None and body["config"]["listen_address"] is None
    assert body["effective"]["write_quorum"] == 1  # alone in its ring
    assert body["effective"]["listen"].startswith("tcp:")
    strict = API(replicas="2", write_quorum="2", cluster_secret="s" * 20).call("GET", "/diag")[1]
    assert strict["effective"]["write_quorum"] == 2


def test_if_log_levels_were_changed_at_run_time_then_diag_shows_the_levels_in_force():
    """
    If an operator raised the log levels at run time, then ``/diag`` (the node's effective configuration) shows the
    levels the node logs at now, not only the ``LOG_LEVEL`` it started with: a node left at debug costs a third of
    its write rate, and ``/diag`` is where an operator looks for such a setting.
    """
    api = API(insecure_admin="true")
    assert api.call("PUT", "/admin/log-levels", {"levels": {"store": "debug"}})[0] == 200
    body = api.call("GET", "/diag")[1]
    assert body["log_levels"] == api.call("GET", "/admin/log-levels")[1]["levels"]
    assert body["log_levels"]["store"] == "debug" and body["log_levels"]["http"] == "info"


def test_diag_says_a_node_without_a_cluster_secret_serves_alone(api):
    """
    If CLUSTER_SECRET is not set, then /diag says the node does not cluster, and lists no warning for it (it
    is closed, not open).
    """
    body = api.call("GET", "/diag")[1]
    assert body["cluster_authenticated"] is False and body["cluster"] == "disabled"
    assert not any("cluster" in warning.lower() for warning in body["security_warnings"])


def test_diag_warns_about_insecure_clustering():
    """
    If the node clusters without a secret (--insecure-cluster), then /diag lists it under security_warnings.
    """
    body = API(insecure_cluster="true").call("GET", "/diag")[1]
    assert body["cluster"] == "insecure"
    assert any("--insecure-cluster" in warning and "CLUSTER_SECRET" in warning
               for warning in body["security_warnings"])


def test_diag_says_a_node_with_a_cluster_secret_is_authenticated():
    body = API(cluster_secret="s" * 20, insecure_cluster="true").call("GET", "/diag")[1]
    assert body["cluster"] == "authenticated" and body["cluster_authenticated"] is True
    assert not any("cluster" in warning.lower() for warning in body["security_warnings"])


def test_a_write_to_the_list_route_is_a_405_counted_under_the_list_route(api):
    """
    If a PUT or DELETE is sent to the list's route (``/kv`` or ``/kv/``), then it is a 405 that
    kv_http_requests_total counts under route ``/kv``, not under a key's route.
    """
    for method, path in (("PUT", "/t1/kv/"), ("DELETE", "/t1/kv")):
        response, content = api.raw(method, path)
        assert response.code == 405, content
    text = api.raw("GET", "/t1/metrics")[1].decode()
    assert 'kv_http_requests_total{method="PUT",route="/kv",status="405",tenant="t1"} 1.0' in text
    assert 'kv_http_requests_total{method="DELETE",route="/kv",status="405",tenant="t1"} 1.0' in text
    assert 'route="/kv/{key}",status="405"' not in text


def test_metrics_count_requests_by_route_template(api):
    """
    If keys are read (two hits, one miss), then kv_http_requests_total counts them under the route template,
    never the key, and kv_cache_operations_total tells hits from misses.
    """
    api.put("secret-key-name", 1)
    api.call("GET", "/kv/secret-key-name")
    api.call("GET", "/kv/secret-key-name")
    api.call("GET", "/kv/absent")
    response, content = api.raw("GET", "/t1/metrics")
    text = content.decode()
    assert response.code == 200
    assert 'kv_http_requests_total{method="GET",route="/kv/{key}",status="200",tenant="t1"} 2.0' in text
    assert 'kv_http_requests_total{method="GET",route="/kv/{key}",status="404",tenant="t1"} 1.0' in text
    assert 'kv_cache_operations_total{op="get",result="hit",tenant="t1"} 2.0' in text
    assert 'kv_cache_operations_total{op="get",result="miss",tenant="t1"} 1.0' in text
    assert "secret-key-name" not in text
    assert 'kv_store_keys{tenant="t1"} 1.0' in text
    assert 'kv_replication_operations_total{op="put",result="success",tenant="t1"} 1.0' in text


def test_a_node_alone_counts_the_one_copy_of_each_write_alike_for_kv_and_bulk(api):
    """
    If a node alone in its ring takes writes through the kv routes and through /bulk, then
    kv_replication_operations_total counts one stored copy a write either way (before, the kv routes' copies
    were not counted, and the replication panels moved with bulk traffic only).
    """
    api.put("a", 1)
    api.call("DELETE", "/kv/a")
    api.call("POST", "/bulk", {"put": [{"key": "b", "value": 2}, {"key": "c", "value": 3}], "delete": ["b"]})
    text = api.raw("GET", "/t1/metrics")[1].decode()
    assert 'kv_replication_operations_total{op="put",result="success",tenant="t1"} 3.0' in text
    assert 'kv_replication_operations_total{op="delete",result="success",tenant="t1"} 2.0' in text


# -- admin ------------------------------------------------------------------------------------------


def test_log_levels_read_and_change_with_token():
    api = API(admin_token="a" * 20)
    auth = {"Authorization": "Bearer " + "a" * 20}
    assert api.call("GET", "/admin/log-levels")[0] == 401
    code, body, _ = api.call("GET", "/admin/log-levels", headers=auth)
    assert code == 200 and body["levels"]["http"] == "info"
    code, body, _ = api.call("PUT", "/admin/log-levels", {"level": "debug"}, headers=auth)
    assert code == 200 and set(body["levels"].values()) == {"debug"}
    assert api.node.log_policy.enabled("http", 10)
    code, body, _ = api.call("PUT", "/admin/log-levels", {"levels": {"store": "error"}}, headers=auth)
    assert code == 200 and body["levels"]["store"] == "error" and body["levels"]["http"] == "debug"


def test_with_an_admin_token_no_admin_route_or_method_is_told_to_a_caller_without_it():
    """
    If ADMIN_TOKEN is set, then a request under admin/ without it gets 401, whatever its method or path, rather
    than a 405 or 404 that would tell which admin routes and methods there are (every admin request needs the
    token, says the contract); with the token those answers are as before; without a token set, as before too.
    """
    api = API(admin_token="a" * 20)
    auth = {"Authorization": "Bearer " + "a" * 20}
    for method, path in (("DELETE", "/admin/log-levels"), ("POST", "/admin/log-levels"), ("GET", "/admin/nothing"),
                         ("GET", "/admin/"), ("GET", "/admin"), ("DELETE", "/%61dmin/log-levels"),
                         ("GET", "/%61dmin/nothing"), ("GET", "/admin/x?y=1")):
        code, body, _ = api.call(method, path)
        assert (code, body["error"]) == (401, "unauthorized"), (method, path, code, body)
        assert api.call(method, path, headers=auth)[0] in (404, 405), (method, path)
    assert api.call("GET", "/nothing")[0] == 404
    open_api = API()
    assert open_api.call("DELETE", "/admin/log-levels")[0] == 405
    assert open_api.call("GET", "/admin/nothing")[0] == 404


def test_admin_writes_without_token_are_refused_by_default(api):
    code, body, _ = api.call("PUT", "/admin/log-levels", {"level": "debug"})
    assert_error(code, body, 403, "admin_disabled")
    assert api.node.log_policy.levels()["http"] == "info"


def test_wrong_admin_token_is_401():
    api = API(admin_token="a" * 20)
    code, body, _ = api.call("PUT", "/admin/log-levels", {"level": "debug"},
                             headers={"Authorization": "Bearer " + "b" * 20})
    assert_error(code, body, 401, "unauthorized")


@pytest.mark.parametrize("scheme", ["Basic", "Token", "Bearer:", ""])
def test_the_admin_token_under_another_scheme_is_401(scheme):
    """
    If the right token comes under a scheme other than Bearer (any case), then it is refused 401 and the levels
    are unchanged.
    """
    api = API(admin_token="a" * 20)
    code, body, _ = api.call("PUT", "/admin/log-levels", {"level": "debug"},
                             headers={"Authorization": (scheme + " " + "a" * 20).strip()})
    assert_error(code, body, 401, "unauthorized")
    assert api.node.log_policy.levels()["http"] == "info"
    assert api.call("GET", "/admin/log-levels", headers={"Authorization": "bEaReR " + "a" * 20})[0] == 200


def test_two_authorization_headers_are_401_whichever_holds_the_token():
    """
    If an admin request carries two Authorization headers, the right token in one of them, then it is refused
    401 whatever their order, and the levels are unchanged (which one counted depended on their order).
    """
    api = API(admin_token="a" * 20)
    right, wrong = "Bearer " + "a" * 20, "Bearer " + "b" * 20
    for pair in ([right, wrong], [wrong, right]):
        code, body, _ = api.call("PUT", "/admin/log-levels", {"level": "debug"}, headers={"Authorization": pair})
        assert_error(code, body, 401, "unauthorized")
    assert api.node.log_policy.levels()["http"] == "info"


@pytest.mark.parametrize("body", [{"level": "loud"}, {"levels": {"nowhere": "debug"}}, {"levels": {"http": 3}},
                                  {}, {"level": "debug", "extra": 1},
                                  {"level": "debug", "levels": {"http": "debug", "store": "loud"}},
                                  {"level": None}])
def test_bad_log_levels_are_400_and_change_nothing(body):
    api = API(insecure_admin="true")
    code, answer, _ = api.call("PUT", "/admin/log-levels", body)
    assert_error(code, answer, 400, answer["error"])
    assert set(api.node.log_policy.levels().values()) == {"info"}


def test_insecure_admin_allows_writes():
    api = API(insecure_admin="true")
    assert api.call("PUT", "/admin/log-levels", {"level": "warning"})[0] == 200
    assert not api.node.log_policy.enabled("http", 20)


@pytest.mark.parametrize("body, expected", [
    ({"level": "warn"}, {"warning"}), ({"level": "WARN"}, {"warning"}), ({"level": "Debug"}, {"debug"}),
    ({"levels": {"http": "Warn", "store": "ERROR"}}, {"warning", "error", "info"}),
])
def test_admin_log_levels_take_any_letter_case_and_warn_as_warning(body, expected):
    """
    If an admin write names a level in any letter case, or ``warn`` (the seed's name), then it is set under
    its canonical name.
    """
    api = API(insecure_admin="true")
    code, answer, _ = api.call("PUT", "/admin/log-levels", body)
    assert code == 200 and set(answer["levels"].values()) == expected
    assert set(api.node.log_policy.levels().values()) == expected


# -- bulk -------------------------------------------------------------------------------------------


def test_bulk_puts_gets_and_deletes_and_its_gets_see_the_values_before_its_puts(api):
    """
    If a bulk request puts, gets and deletes, then each gets its own status; its gets run before its puts (as
    the README says), so a key it both puts and gets reads the value it held before.
    """
    api.put("old", 1)
    code, body, _ = api.call("POST", "/bulk", {
        "put": [{"key": "a", "value": {"x": 1}}, {"key": "old", "value": 2, "ttl": 60}],
        "get": ["old", "missing"], "delete": ["gone"]})
    assert code == 200, body
    assert [(p["key"], p["status"]) for p in body["put"]] == [("a", 201), ("old", 200)]
    assert body["get"]["missing"] is None
    assert body["get"]["old"]["value"] == 1
    assert body["delete"] == [{"key": "gone", "status": 404}]
    assert api.call("GET", "/kv/a")[1]["value"] == {"x": 1}


def test_bad_bulk_is_400_and_changes_nothing(api):
    code, body, _ = api.call("POST", "/bulk", {"put": [{"key": "a", "value": 1}, {"key": "", "value": 2}]})
    assert_error(code, body, 400, "invalid_key")
    assert api.call("GET", "/kv/a")[0] == 404


# -- property ---------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@hsettings(max_examples=60, deadline=None)
@given(value=json_values)
def test_json_values_round_trip_exactly(value):
    """
    If any JSON value is stored, then GET returns an equal value.
    """
    api = API()
    code, _, _ = api.put("v", value)
    assert code == 201
    code, body, _ = api.call("GET", "/kv/v")
    assert code == 200
    assert body["value"] == value
    assert json.dumps(body["value"], sort_keys=True) == json.dumps(value, sort_keys=True)


# -- resource limits --------------------------------------------------------------------------------

def _connect(site, clock):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _limited_site(clock, **kwargs):
    node = Node(make_settings(), clock, http=None)
    return KVSite(build_root(node), clock, **kwargs)


def test_a_request_trickled_slowly_is_cut_off():
    """
    If a client sends its headers a byte at a time (slow loris), then the connection is aborted once the
    request deadline passes, even though bytes keep arriving.
    """
    clock = Clock()
    site = _limited_site(clock, timeout=10)
    protocol, transport = _connect(site, clock)
    for byte in b"GET /t1/health HTTP/1.1\r\nHost: x\r\n":
        protocol.dataReceived(bytes([byte]))
        clock.advance(0.5)
        if transport.disconnecting or getattr(transport, "disconnected", False):
            break
    assert clock.seconds() <= 11
    assert transport.disconnecting


def test_a_slow_request_on_a_busy_connection_gets_its_own_full_deadline():
    """
    If a keep-alive connection served a prompt request and then trickles the next one, then the deadline
    counts from the second request's first byte: the connection's one timer re-arms for the time left
    instead of cutting the second request off when the first one's period ends.
    """
    clock = Clock()
    site = _limited_site(clock, timeout=10)
    protocol, transport = _connect(site, clock)
    protocol.dataReceived(b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in transport.value()
    clock.advance(8)
    protocol.dataReceived(b"GET /t1/health/live HTTP/1.1\r\n")
    clock.advance(9.5)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    # Whichever of the idle check and the request's deadline came first, the request cut short is told.
    assert transport.value().count(b"HTTP/1.1 408 Request Timeout\r\n") == 1


def test_an_idle_connection_is_closed_after_the_timeout():
    clock = Clock()
    site = _limited_site(clock, timeout=10)
    protocol, transport = _connect(site, clock)
    clock.advance(9.5)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_a_connection_kept_busy_outlives_the_idle_timeout():
    """
    If requests keep arriving on a keep-alive connection, then it stays open long past one idle period,
    and closes one period after the last of them.
    """
    clock = Clock()
    site = _limited_site(clock, timeout=10)
    protocol, transport = _connect(site, clock)
    for _ in range(10):
        protocol.dataReceived(b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(4)
    assert not transport.disconnecting
    assert transport.value().count(b"200 OK") == 10
    clock.advance(5.5)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_an_idle_keep_alive_connection_schedules_one_timer_not_one_per_request():
    clock = Clock()
    scheduled = []
    original = clock.callLater

    def counting(*args, **kwargs):
        scheduled.append(args[1])
        return original(*args, **kwargs)

    clock.callLater = counting
    site = _limited_site(clock, timeout=10)
    protocol, transport = _connect(site, clock)
    protocol.dataReceived(b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    del scheduled[:]
    for _ in range(50):
        protocol.dataReceived(b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().count(b"200 OK") == 51
    assert scheduled == []


def test_a_prompt_request_is_not_cut_off():
    clock = Clock()
    site = _limited_site(clock, timeout=10)
    protocol, transport = _connect(site, clock)
    protocol.dataReceived(b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(9)
    assert b"200 OK" in transport.value()
    clock.advance(2)
    assert b"200 OK" in transport.value()


def test_connections_over_the_cap_get_503():
    """
    If a connection comes over MAX_CONNECTIONS, then its request gets 503 ``too_many_connections`` once its head
    has arrived (the whole head, so that closing does not reset the connection under the answer), and it closes.
    """
    clock = Clock()
    site = _limited_site(clock, max_connections=2)
    first = _connect(site, clock)
    _connect(site, clock)  # the second, still within the cap
    third_protocol, third = _connect(site, clock)
    assert site.open_connections == 2
    third_protocol.dataReceived(b"PUT /t1/kv/a HTTP/1.1\r\nHost: x\r\n")
    assert third.value() == b""
    third_protocol.dataReceived(b"Content-Length: 2\r\n\r\n")
    assert third.value().startswith(b"HTTP/1.1 503")
    assert b"too_many_connections" in third.value() and third.disconnecting
    # As every other answer (RFC 9110, 6.6.1).
    assert b"\r\nDate: " in third.value()
    first[0].connectionLost(None)
    assert site.open_connections == 1


def test_a_connection_over_the_cap_that_sends_no_request_is_refused_after_a_moment():
    clock = Clock()
    site = _limited_site(clock, max_connections=1)
    _connect(site, clock)
    protocol, transport = _connect(site, clock)
    clock.advance(PROBE_SECONDS - 0.1)
    assert transport.value() == b""
    clock.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 503") and transport.disconnecting
    protocol.connectionLost(None)
    assert site.probing == 0


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_the_probes_are_answered_over_the_connection_cap(method):
    """
    If every connection the node takes is held by clients, then a kubelet's liveness probe still gets 200 and its
    readiness probe the node's readiness, with their usual bodies (none for HEAD): a busy node is not restarted.
    """
    clock = Clock()
    site = _limited_site(clock, max_connections=1)
    _connect(site, clock)
    answers = {}
    for path in (b"/t1/health/live", b"/t1/health/ready?x=1"):
        protocol, transport = _connect(site, clock)
        protocol.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.31\r\n"
                              b"Accept: */*\r\nConnection: close\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        answers[path] = (head.split(b" ")[1], body)
        assert transport.disconnecting and b"Content-Length: " in head
        protocol.connectionLost(None)
    live_code, live_body = answers[b"/t1/health/live"]
    ready_code, ready_body = answers[b"/t1/health/ready?x=1"]
    assert live_code == b"200" and ready_code == b"503"  # the node here never started: not ready
    if method == b"GET":
        assert json.loads(live_body)["status"] == "alive" and json.loads(ready_body)["status"] == "starting"
    else:
        assert live_body == b"" and ready_body == b""
    assert site.probing == 0


def test_past_a_few_waiting_connections_over_the_cap_the_next_are_refused_unread():
    """
    If more connections come over the cap than it reads for a probe at once, then the next ones get their 503
    at once, unread: a flood over the cap is not held open.
    """
    clock = Clock()
    site = _limited_site(clock, max_connections=1)
    _connect(site, clock)
    waiting = [_connect(site, clock) for _ in range(PROBES_OVER_CAP)]
    assert all(transport.value() == b"" for _, transport in waiting)
    _, refused = _connect(site, clock)
    assert refused.value().startswith(b"HTTP/1.1 503") and refused.disconnecting


def test_oversized_headers_are_refused():
    clock = Clock()
    site = _limited_site(clock, max_header_bytes=1024)
    protocol, transport = _connect(site, clock)
    protocol.dataReceived(b"GET /t1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    assert b"200 OK" not in transport.value()
    assert transport.value().startswith(b"HTTP/1.1 4") or transport.disconnecting


def test_a_collector_runs_once_half_the_budget_has_turned_over():
    """
    If a collection function is given (PyPy), then it runs each time half the budget has been dropped,
    and not before.
    """
    clock, calls, node, write, _ = _collecting_node(max_memory="8Mi")
    write(0, 30)
    clock.advance(0.3)
    assert calls == []
    write(30, 170)
    clock.advance(0.3)
    assert len(calls) == 1
    clock.advance(1)
    assert len(calls) == 1


def test_a_collector_runs_as_a_growing_store_takes_in_a_quarter_more():
    """
    If the store is being filled (nothing dropped), then the collector still runs each time the store has
    taken in a quarter more than it held at the last collection (at least 16 MiB), and not in between.
    """
    clock, calls, node, fill, _ = _collecting_node()

    def write(first, count):
        fill(first, count)
        clock.advance(0.3)

    write(0, 150)
    assert calls == []
    write(150, 30)
    assert len(calls) == 1
    write(180, 100)
    assert len(calls) == 1
    write(280, 80)
    assert len(calls) == 2
    assert node.store.released_bytes == 0


def test_a_collector_runs_once_the_store_is_left_alone_after_a_burst_of_writes():
    """
    If a burst of writes takes in less than the growth threshold, then the collector runs once the store has
    been left alone for IDLE_RECLAIM_SECONDS, and only once; a later trickle of writes (under an eighth of
    what the store holds, though over 4 MiB) does not make it run again, and a later burst does.
    """
    from kvresponder.node import IDLE_RECLAIM_SECONDS
    clock, calls, node, write, run_for = _collecting_node()
    write(0, 600)  # 60 MB, then left alone
    run_for(0.25)
    assert len(calls) == 1  # the growth threshold (16 MiB) on the first tick
    write(600, 140)  # 14 MB: under a quarter of 60 MB
    run_for(IDLE_RECLAIM_SECONDS - 0.5)
    assert len(calls) == 1
    run_for(1.0)
    assert len(calls) == 2
    run_for(10)
    assert len(calls) == 2
    write(740, 60)  # 6 MB: over 4 MiB, under an eighth of 74 MB
    run_for(IDLE_RECLAIM_SECONDS + 1)
    assert len(calls) == 2
    write(800, 60)  # 6 + 6 = 12 MB since: over an eighth of the 86 MB held
    run_for(0.5)
    assert len(calls) == 2
    run_for(IDLE_RECLAIM_SECONDS)
    assert len(calls) == 3


def test_a_collector_runs_once_the_store_is_left_alone_after_a_burst_of_deletes():
    """
    If a burst of deletes drops more than an eighth of what the store holds (but less than half the budget),
    then the collector runs once the store has been left alone for IDLE_RECLAIM_SECONDS.
    """
    from kvresponder.node import IDLE_RECLAIM_SECONDS
    from kvresponder.store import Entry
    clock, calls, node, write, run_for = _collecting_node()
    write(0, 600)
    run_for(IDLE_RECLAIM_SECONDS + 1)
    assert len(calls) == 1
    for i in range(100):  # 10 MB dropped, a sixth of what it held
        node.store.apply(Entry("k%d" % (i,), None, node.hlc.now()))
    run_for(IDLE_RECLAIM_SECONDS - 0.5)
    assert len(calls) == 1
    run_for(1.0)
    assert len(calls) == 2


def test_a_collection_asked_for_while_one_is_under_way_is_asked_for_again():
    """
    If the collector is still busy with the last reclaim when the threshold is reached (it answers False),
    then the node keeps the threshold's baseline and asks again on its next tick, rather than waiting for a
    whole new threshold.
    """
    busy = [True]
    clock, calls, node, write, run_for = _collecting_node(max_memory="8Mi", busy=busy)
    write(0, 200)
    run_for(0.25)
    assert len(calls) == 1  # asked, but busy: not started
    run_for(0.25)
    assert len(calls) == 2  # asked again
    busy[0] = False
    run_for(0.25)
    assert len(calls) == 3  # started this time
    run_for(1)
    assert len(calls) == 3  # and the baseline moved: nothing more to do


def _collecting_node(max_memory="1Gi", busy=None):
    from kvresponder.store import Entry
    clock = Clock()
    calls = []

    def collect():
        calls.append(clock.seconds())
        return False if busy is not None and busy[0] else None
    node = Node(make_settings(max_memory=max_memory), clock, http=None, join_settle=0.1, collect=collect)
    node.start()
    value = b'"' + b"v" * 100000 + b'"'

    def write(first, count):
        for i in range(first, first + count):
            node.store.apply(Entry("k%d" % (i,), value, node.hlc.now()))

    def run_for(seconds):
        # Tick by tick, as the reactor runs the node's 0.25 s loop.
        for _ in range(int(round(seconds / 0.25))):
            clock.advance(0.25)
    return clock, calls, node, write, run_for


def test_a_form_post_reaches_its_route_and_gets_a_json_415():
    """
    If a POST claims to be a form (multipart, and not even well-formed), then Twisted does not parse it
    before the route runs: the route answers 415 in the API's JSON format.
    """
    clock = Clock()
    site = _limited_site(clock)
    protocol, transport = _connect(site, clock)
    protocol.dataReceived(b"POST /t1/bulk HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                          b"Content-Length: 10\r\n\r\n{\"get\":[]}")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 415")
    assert b"\"error\":\"unsupported_media_type\"" in body


@pytest.mark.parametrize("method", [b"BOGUS", b"X" * 5000, b"get", b"PROPFIND"])
def test_a_method_http_does_not_define_is_counted_as_other_not_as_its_own_label(method):
    """
    Whatever a client sends as its method, the request metrics name one of HTTP's methods or ``other``: a label
    per made-up method would add series to every scrape, for good (a few hundred requests with long random
    methods took a node's /metrics from 0.5 to 77 MB).
    """
    clock = Clock()
    node = Node(make_settings(), clock, http=None)
    site = KVSite(build_root(node), clock, metrics=node.metrics)
    for path in (b"/t1/kv/x", b"/t1/health", b"/t1/nowhere"):
        protocol, transport = _connect(site, clock)
        protocol.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 "), transport.value()[:80]
    exposition = node.metrics.exposition().decode("utf-8")
    methods = set(re.findall(r'kv_http_requests_total\{[^}]*method="([^"]*)"', exposition))
    assert methods == {"other"}, methods


@pytest.mark.parametrize("scheme", [b"http", b"HTTPS"])
def test_a_request_target_in_absolute_form_is_served_as_its_path(scheme):
    """
    The absolute form (``PUT http://host:3000/t1/kv/k``), which a server must accept as well as a proxy does
    (RFC 9112, 3.2.2), reaches the route its path names: it got the 404 of another tenant's prefix.
    """
    clock = Clock()
    node = Node(make_settings(), clock, http=None)
    node.start()
    clock.advance(1)
    site = KVSite(build_root(node), clock, metrics=node.metrics)
    authority = scheme + b"://127.0.0.1:3000"
    body = b'{"value": "absolute"}'
    protocol, transport = _connect(site, clock)
    protocol.dataReceived(b"PUT " + authority + b"/t1/kv/k?x=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                          b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    protocol.dataReceived(b"GET " + authority + b"/t1/kv/k HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = transport.value()
    assert answers.startswith(b"HTTP/1.1 201 "), answers[:200]
    assert answers.count(b"HTTP/1.1 200 OK") == 1 and b'"value":"absolute"' in answers, answers


@pytest.mark.parametrize("request_line", [b"CONNECT example.com:443 HTTP/1.1", b"GET t1/kv/k HTTP/1.1",
                                          b"DELETE example.com/t1/kv/k HTTP/1.1"])
def test_a_request_target_that_is_no_path_is_refused_400_and_the_connection_serves_on(request_line):
    """
    If a request's target is neither a path, nor the absolute form, nor ``*`` (``CONNECT``'s authority form, a
    bare word), then it is answered 400 ``bad_request`` saying the server takes paths and is no proxy, and the
    next request on the connection is served. Such a target was read as a path: 404, naming the tenant served.
    """
    clock = Clock()
    node = Node(make_settings(), clock, http=None)
    node.start()
    clock.advance(1)
    site = KVSite(build_root(node), clock, metrics=node.metrics)
    protocol, transport = _connect(site, clock)
    protocol.dataReceived(request_line + b"\r\nHost: example.com\r\n\r\n")
    protocol.dataReceived(b"GET /t1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = transport.value()
    assert answers.startswith(b"HTTP/1.1 400 "), answers[:200]
    first = answers.split(b"HTTP/1.1 200 OK")[0]
    assert b'"error":"bad_request"' in first and b"not a proxy" in first, first
    assert answers.count(b"HTTP/1.1 200 OK") == 1 and node.store.get("k") is None, answers


def _nested(depth: int, inner: str = '"x"') -> bytes:
    return ('{"value":' + "[" * depth + inner + "]" * depth + "}").encode("utf-8")


@pytest.mark.parametrize("inner", ['"x"', '"]]]]"', '"\\\\"', '"\\"[[[["', '{"k[":"\\\\\\"{"}'])
def test_a_value_nested_to_the_limit_is_taken_and_one_level_more_is_refused_whatever_its_strings_hold(inner):
    """
    Brackets, escaped quotes and escaped backslashes inside strings do not count towards a value's depth; the
    brackets outside them do (an object counts as a level, as an array does).
    """
    from kvresponder.http.api import MAX_VALUE_DEPTH, parse_put
    extra = 1 if inner.startswith("{") else 0
    value, _ = parse_put(_nested(MAX_VALUE_DEPTH - extra, inner), b"application/json")
    assert value.count(b"[") >= MAX_VALUE_DEPTH - extra
    with pytest.raises(APIError) as caught:
        parse_put(_nested(MAX_VALUE_DEPTH + 1 - extra, inner), b"application/json")
    assert caught.value.code == "invalid_json" and "nested deeper" in caught.value.message


def test_a_body_built_to_make_the_depth_check_backtrack_is_refused_at_once():
    """
    The depth check is linear in the body: a megabyte of escaped quotes behind 502 open brackets (which a
    regular expression over the strings took minutes to scan, on the reactor's thread) is refused in a moment.
    """
    from kvresponder.http.api import parse_put
    body = b'{"value":' + b"[" * 502 + b'"' + b'\\"' * 500_000
    started = time.monotonic()
    with pytest.raises(APIError):
        parse_put(body, b"application/json")
    assert time.monotonic() - started < 2.0


def test_if_a_site_is_built_on_a_clock_then_its_timers_run_on_that_clock_and_not_the_global_reactor():
    """
    If the site is given a Clock as its reactor, then the end of its turn and its channels' idle timeouts are
    timed on that Clock: nothing below the tap uses the global reactor.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    clock = Clock()
    site = KVSite(build_root(Node(make_settings("t1", "n1"), clock, http=None)), clock, timeout=30)
    assert site.reactor is clock
    assert site.seconds == clock.seconds
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(StringTransport())
    assert any(call.getTime() == 30 for call in clock.getDelayedCalls())


@pytest.mark.parametrize("levels, message", [
    ({"level": "loud"}, 'Unknown log level "loud"; levels are '),
    ({"levels": {"nowhere": "info"}}, 'Unknown log area "nowhere"; areas are '),
])
def test_an_unknown_log_level_or_area_is_refused_in_a_sentence_and_changes_nothing(levels, message):
    """
    If an admin names a level or an area that does not exist, then the 400 ``invalid_level`` says so in a sentence
    (a capital, a full stop), as every other error does, and the levels stay as they were.
    """
    api = API(insecure_admin="true")
    before = api.call("GET", "/admin/log-levels")[1]
    code, body, _ = api.call("PUT", "/admin/log-levels", levels)
    assert_error(code, body, 400, "invalid_level")
    assert body["message"].startswith(message) and body["message"].endswith("."), body
    assert api.call("GET", "/admin/log-levels")[1] == before


@pytest.mark.parametrize("put, error, message", [
    ({"key": "k", "value": 1, "tll": 5}, "invalid_body",
     'put[1]: Unknown field "tll"; a put takes "key", "value" and "ttl".'),
    ({"key": "k", "ttl": 5}, "missing_value", 'put[1]: Each put must have a "value".'),
])
def test_a_bulk_put_with_a_wrong_field_is_refused_naming_the_put_and_a_puts_fields(api, put, error, message):
    """
    If one put of a bulk body has an unknown field or no value, then the 400 names that put (its list and
    index) and the fields of a put (its key among them), not those of a single write's body, and nothing is
    stored.
    """
    code, body, _ = api.call("POST", "/bulk", {"put": [{"key": "other", "value": 1}, put]})
    assert_error(code, body, 400, error)
    assert body["message"] == message
    assert api.call("GET", "/kv/other")[0] == 404


@pytest.mark.parametrize("bulk, error, where", [
    ({"get": ["a", 5]}, "invalid_key", "get[1]: "),
    ({"delete": ["a", "b", ""]}, "invalid_key", "delete[2]: "),
    ({"put": [{"key": "a", "value": 1}, {"key": "b", "value": 1, "ttl": -1}]}, "invalid_ttl", "put[1]: "),
    ({"put": [{"key": "x" * 300, "value": 1}]}, "invalid_key", "put[0]: "),
])
def test_a_bulk_request_refused_for_one_item_names_the_item(api, bulk, error, where):
    """
    If one item of a bulk request is bad, then the 400's message starts with the list and index of that item:
    a request holds up to a thousand operations.
    """
    code, body, _ = api.call("POST", "/bulk", bulk)
    assert_error(code, body, 400, error)
    assert body["message"].startswith(where), body


def test_a_number_too_small_for_a_double_is_stored_as_zero_as_documented(api):
    """
    If a value holds a number below a double's smallest (1e-400), then it is stored as 0.0, as the API's
    description says (only overflow is refused).
    """
    code, body, _ = api.call("PUT", "/kv/tiny", raw_body=b'{"value": [1e-400, -1e-400]}',
                             headers={"Content-Type": "application/json"})
    assert code == 201, body
    assert api.call("GET", "/kv/tiny")[1]["value"] == [0.0, -0.0]


@pytest.mark.parametrize("method, path", [("POST", "/bulk%2F"), ("POST", "/%2Fbulk"), ("GET", "/health%2Fready"),
                                          ("GET", "/health/ready%2F"), ("GET", "/diag%2F"), ("GET", "/kv%2Fe"),
                                          ("POST", "/_internal%2Fapply")])
def test_a_slash_sent_encoded_outside_a_key_names_no_route(api, method, path):
    """
    If a path holds an encoded slash (``%2F``) anywhere but in a key, then it is 404: ``/t1/bulk%2F`` used to run a
    bulk request and ``/t1/health%2Fready`` to answer the probe, while ``/t1/kv%2Fe`` was 404. Nothing is done.
    """
    code, body, _ = api.call(method, path, {"put": [{"key": "e", "value": 1}]} if method == "POST" else None)
    assert_error(code, body, 404, "not_found")
    assert api.call("GET", "/kv/e")[0] == 404


def test_a_key_may_hold_an_encoded_slash(api):
    assert api.put("a%2Fb", 1)[0] == 201
    assert api.call("GET", "/kv/a%2Fb")[1]["value"] == 1
    assert api.call("GET", "/kv/a/b")[1]["value"] == 1


@pytest.mark.parametrize("method, path", [("POST", "//bulk"), ("GET", "//kv/a"), ("GET", "//health"),
                                          ("GET", "//metrics")])
def test_an_empty_segment_after_the_tenant_names_no_route(api, method, path):
    """
    If a path has an empty segment right after the tenant (``/t1//bulk``), then it is 404 whatever follows: it
    used to run a bulk request while ``/t1//kv/a`` was 404. Nothing is done.
    """
    code, body, _ = api.call(method, path, {"put": [{"key": "e", "value": 1}]} if method == "POST" else None)
    assert_error(code, body, 404, "not_found")
    assert api.call("GET", "/kv/e")[0] == 404


@pytest.mark.parametrize("raw, message", [
    (b"", "The body is empty: send JSON."),
    (b"  \n", "The body is empty: send JSON."),
    (b'{"value":', "The body is not valid JSON (at character 9 of 9)."),
    (b'{"value": 1,}', "The body is not valid JSON (at character 12 of 13)."),
])
def test_a_body_that_is_not_json_is_refused_with_the_same_words_on_every_interpreter(api, raw, message):
    """
    If a write's body is empty, cut off or otherwise not JSON, then it is 400 ``invalid_json`` with a message that
    says where, in the same words on CPython and PyPy (PyPy's own named a NUL the client never sent).
    """
    code, body, _ = api.call("PUT", "/kv/j", raw_body=raw, headers={"Content-Type": "application/json"})
    assert_error(code, body, 400, "invalid_json")
    assert body["message"] == message
