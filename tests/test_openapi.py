"""
The OpenAPI 3.1 description of the public API.

``kvresponder/http/openapi.json`` is the source: the package ships it and every node serves it at
``/<tenant>/openapi.json``; ``docs/openapi.json`` is a byte-for-byte copy for readers (and for
``.ci/schemathesis.sh``). These tests keep the three in step, keep the description valid, keep it complete
(every public route and method of the code, nothing else), check real in-memory answers against it, and
run schemathesis against a live node.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from jsonschema import Draft202012Validator

from kvresponder.http.api import PublicAPI
from kvresponder.http.openapi import SPEC_PATH, load_spec
from kvresponder.membership import Heartbeat

from .conftest import require_tool
from .test_api import API

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_PATH = os.path.join(REPO, "docs", "openapi.json")
SCRIPT = os.path.join(REPO, ".ci", "schemathesis.sh")
METHODS = ("get", "head", "put", "post", "delete", "patch", "options", "trace")


@pytest.fixture(scope="module")
def spec():
    with open(SPEC_PATH, encoding="utf-8") as shipped:
        return json.load(shipped)


def operations(spec):
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def resolve(spec, node):
    while "$ref" in node:
        kind, name = node["$ref"].split("/")[-2:]
        node = spec["components"][kind][name]
    return node


# -- one description, three places -----------------------------------------------------------------


def test_docs_copy_is_the_shipped_file():
    """
    If docs/openapi.json is read, then it is byte for byte the file the package ships and serves.
    """
    with open(SPEC_PATH, "rb") as shipped, open(DOCS_PATH, "rb") as docs:
        assert docs.read() == shipped.read(), (
            "docs/openapi.json differs from kvresponder/http/openapi.json (the source): copy it over")


def test_node_serves_the_shipped_file_with_its_own_tenant_as_the_servers_default(spec):
    """
    If a client asks a node for /<tenant>/openapi.json, then it gets the shipped description, as JSON, with the
    node's tenant as the default of the servers' ``tenant`` variable, and nothing else changed.
    """
    api = API()
    code, body, response = api.call("GET", "/openapi.json")
    assert code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert spec == load_spec()
    assert spec["servers"][0]["variables"]["tenant"]["default"] == "tenant"
    assert body["servers"][0]["variables"]["tenant"]["default"] == "t1"
    body["servers"][0]["variables"]["tenant"]["default"] = "tenant"
    assert body == spec
    assert api.call("HEAD", "/openapi.json")[0] == 200


@pytest.mark.parametrize("max_key_length", [8, 256])
def test_node_serves_its_own_max_key_length_as_the_keys_max_length(spec, max_key_length):
    """
    If a node runs with another MAX_KEY_LENGTH, then the description it serves says so (``Key.maxLength``), so
    that a client generated from it refuses the keys the node refuses and takes those it takes; the shipped file,
    and the rest of the served one, are unchanged.
    """
    api = API(max_key_length=max_key_length)
    code, body, _ = api.call("GET", "/openapi.json")
    assert code == 200 and body["components"]["schemas"]["Key"]["maxLength"] == max_key_length
    assert api.put("k" * max_key_length, 1)[0] == 201
    assert api.put("k" * (max_key_length + 1), 1)[0] == 400
    shipped = load_spec()["components"]["schemas"]["Key"]["maxLength"]
    assert spec["components"]["schemas"]["Key"]["maxLength"] == 250 == shipped
    body["components"]["schemas"]["Key"]["maxLength"] = 250
    body["servers"][0]["variables"]["tenant"]["default"] = "tenant"
    assert body == spec


def test_description_is_valid_openapi_3_1(spec):
    """
    If the description is checked by openapi-spec-validator, then it is a valid OpenAPI 3.1 document.
    """
    try:
        from openapi_spec_validator import OpenAPIV31SpecValidator
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("openapi-spec-validator is not installed (it belongs to the test extra)")
        pytest.skip("openapi-spec-validator is not installed")
    assert spec["openapi"].startswith("3.1.")
    errors = [error.message for error in OpenAPIV31SpecValidator(spec).iter_errors()]
    assert not errors, errors


def test_schemas_are_valid_json_schema(spec):
    """
    If every schema of the description is checked against the JSON Schema 2020-12 metaschema, then none is
    malformed.
    """
    for name, schema in spec["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)


# -- complete, and nothing more ----------------------------------------------------------------------


def code_routes():
    """
    Every public route of the code as (OpenAPI path, set of methods): PublicAPI's Klein rules, and the kv
    leaf's routes, found by asking it (a method it refuses answers 405 with Allow).
    """
    routes = {}
    for rule in PublicAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(method.lower() for method in rule.methods or ())
    api = API()
    for path, probe in [("/kv", "/kv"), ("/kv/{key}", "/kv/some-key")]:
        code, _, response = api.call("PROPFIND", probe)
        assert code == 405
        allow = response.headers.getRawHeaders(b"allow")[0].decode("ascii")
        routes[path] = {method.strip().lower() for method in allow.split(",")}
    return routes


def test_every_public_route_and_method_is_described(spec):
    """
    If the routes the code serves are listed, then each path and each of its methods is in the description,
    and the description lists no path or method the code does not serve (nor any internal route).
    """
    described = {path: {m for m in METHODS if m in item} for path, item in spec["paths"].items()}
    assert code_routes() == described
    assert not [path for path in spec["paths"] if "_internal" in path]


def test_every_operation_documents_its_errors(spec):
    """
    If an operation takes a body, then it documents 400, 413 and 415; every operation documents 503 (the
    connection cap); admin operations document 401 (and writes 403) and bearer security; and every 4xx/5xx
    answer is the error schema (or, for readiness, the readiness body).
    """
    ids = [operation["operationId"] for _, _, operation in operations(spec)]
    assert len(ids) == len(set(ids))
    for path, method, operation in operations(spec):
        statuses = set(operation["responses"])
        label = "%s %s" % (method.upper(), path)
        assert "503" in statuses, label
        assert any(status.startswith("2") for status in statuses), label
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= statuses, label
            assert list(operation["requestBody"]["content"]) == ["application/json"], label
        if path.startswith("/admin/"):
            assert "401" in statuses, label
            assert {"bearerAuth": []} in operation["security"], label
            if method == "put":
                assert "403" in statuses, label
        for status, response in operation["responses"].items():
            response = resolve(spec, response)
            if int(status) < 400 or method == "head":
                continue
            schema = response["content"]["application/json"]["schema"]
            if path == "/health/ready" and status == "503":
                assert {"$ref": "#/components/schemas/Error"} in schema["oneOf"]
            else:
                assert schema == {"$ref": "#/components/schemas/Error"}, label


def test_head_mirrors_get(spec):
    """
    If a path answers GET, then it answers HEAD with the same statuses and no body.
    """
    for path, item in spec["paths"].items():
        if "get" in item:
            assert set(item["head"]["responses"]) == set(item["get"]["responses"]), path
            for response in item["head"]["responses"].values():
                assert "content" not in resolve(spec, response), path


# -- real answers match the description -------------------------------------------------------------


def check_answer(spec, method, path, code, body, response):
    """
    The answer has a status the operation documents, the documented content type, and a body the
    documented schema accepts.
    """
    operation = spec["paths"][path][method.lower()]
    assert str(code) in operation["responses"], "%s %s answered an undocumented %d: %r" % (
        method, path, code, body)
    documented = resolve(spec, operation["responses"][str(code)])
    if method == "HEAD":
        assert "content" not in documented
        return
    [content_type] = response.headers.getRawHeaders(b"content-type")
    media = documented["content"][content_type.decode("ascii")]
    if content_type == b"application/json":
        validator = Draft202012Validator({"components": spec["components"], **media["schema"]})
        errors = [error.message for error in validator.iter_errors(body)]
        assert not errors, (method, path, code, errors, body)


def exchanges():
    """
    A request that reaches each documented status of each operation, where one node in memory can reach it.
    """
    auth = {"Authorization": "Bearer " + "a" * 20}
    json_type = {"Content-Type": "application/json"}
    return [
        # (node settings, setup, method, spec path, request path, body, raw body, headers, expected status)
        ({}, [("PUT", "/kv/a", {"value": 1})], "GET", "/kv/{key}", "/kv/a", None, None, {}, 200),
        ({}, [], "GET", "/kv/{key}", "/kv/nothing", None, None, {}, 404),
        ({}, [], "GET", "/kv/{key}", "/kv/%FF", None, None, {}, 400),
        ({}, [("PUT", "/kv/a", {"value": 1})], "HEAD", "/kv/{key}", "/kv/a", None, None, {}, 200),
        ({}, [], "HEAD", "/kv/{key}", "/kv/nothing", None, None, {}, 404),
        ({}, [], "HEAD", "/kv/{key}", "/kv/" + "x" * 251, None, None, {}, 400),
        ({}, [], "PUT", "/kv/{key}", "/kv/a", {"value": {"x": [1, None]}, "ttl": 30}, None, {}, 201),
        ({}, [("PUT", "/kv/a", {"value": 1})], "PUT", "/kv/{key}", "/kv/a", {"value": 2}, None, {}, 200),
        ({}, [], "PUT", "/kv/{key}", "/kv/a", None, b'{"ttl": 5}', json_type, 400),
        ({}, [], "PUT", "/kv/{key}", "/kv/a", None, b'{"value": 1}', {"Content-Type": "text/plain"}, 415),
        ({"max_value_size": "1Ki"}, [], "PUT", "/kv/{key}", "/kv/a", {"value": "x" * 2000}, None, {}, 413),
        ({"max_memory": "64Ki"}, [], "PUT", "/kv/{key}", "/kv/a", {"value": "x" * 70000}, None, {}, 413),
        ({}, [("PUT", "/kv/a", {"value": 1})], "DELETE", "/kv/{key}", "/kv/a", None, None, {}, 200),
        ({}, [], "DELETE", "/kv/{key}", "/kv/a", None, None, {}, 404),
        ({}, [], "DELETE", "/kv/{key}", "/kv/%C3", None, None, {}, 400),
        ({}, [("PUT", "/kv/k1", {"value": 1}), ("PUT", "/kv/k2", {"value": 1})],
         "GET", "/kv", "/kv?prefix=k&limit=1", None, None, {}, 200),
        ({}, [], "GET", "/kv", "/kv?limit=0", None, None, {}, 400),
        ({}, [], "HEAD", "/kv", "/kv", None, None, {}, 200),
        ({}, [], "HEAD", "/kv", "/kv?cursor=%25", None, None, {}, 400),
        ({}, [("PUT", "/kv/old", {"value": 1, "ttl": 60})], "POST", "/bulk", "/bulk",
         {"get": ["old", "missing"], "put": [{"key": "new", "value": [1], "ttl": None}], "delete": ["old", "x"]},
         None, {}, 200),
        ({}, [], "POST", "/bulk", "/bulk", {"get": [1]}, None, {}, 400),
        ({}, [], "POST", "/bulk", "/bulk", None, b"{}", {"Content-Type": "application/xml"}, 415),
        ({"max_value_size": "1Ki"}, [], "POST", "/bulk", "/bulk",
         {"put": [{"key": "k", "value": "x" * 9000}]}, None, {}, 413),
        ({}, [], "GET", "/health", "/health", None, None, {}, 200),
        ({}, [], "HEAD", "/health", "/health", None, None, {}, 200),
        ({}, [], "GET", "/health/live", "/health/live", None, None, {}, 200),
        ({}, [], "HEAD", "/health/live", "/health/live", None, None, {}, 200),
        ({}, [], "GET", "/health/ready", "/health/ready", None, None, {}, 200),
        ({}, [], "HEAD", "/health/ready", "/health/ready", None, None, {}, 200),
        ({}, ["drain"], "GET", "/health/ready", "/health/ready", None, None, {}, 503),
        ({}, ["drain"], "HEAD", "/health/ready", "/health/ready", None, None, {}, 503),
        ({}, [], "GET", "/peers", "/peers", None, None, {}, 200),
        ({}, ["peer"], "GET", "/peers", "/peers", None, None, {}, 200),
        ({}, [], "HEAD", "/peers", "/peers", None, None, {}, 200),
        ({}, [], "GET", "/metrics", "/metrics", None, None, {}, 200),
        ({}, [], "HEAD", "/metrics", "/metrics", None, None, {}, 200),
        ({}, [], "GET", "/diag", "/diag", None, None, {}, 200),
        ({"cluster_secret": "s" * 20, "admin_token": "a" * 20}, [], "GET", "/diag", "/diag", None, None, {},
         200),
        ({}, [], "HEAD", "/diag", "/diag", None, None, {}, 200),
        ({}, [], "GET", "/openapi.json", "/openapi.json", None, None, {}, 200),
        ({}, [], "HEAD", "/openapi.json", "/openapi.json", None, None, {}, 200),
        ({}, [], "GET", "/admin/log-levels", "/admin/log-levels", None, None, {}, 200),
        ({}, [], "HEAD", "/admin/log-levels", "/admin/log-levels", None, None, {}, 200),
        ({"admin_token": "a" * 20}, [], "GET", "/admin/log-levels", "/admin/log-levels", None, None, auth, 200),
        ({"admin_token": "a" * 20}, [], "GET", "/admin/log-levels", "/admin/log-levels", None, None, {}, 401),
        ({"admin_token": "a" * 20}, [], "HEAD", "/admin/log-levels", "/admin/log-levels", None, None, {}, 401),
        ({"admin_token": "a" * 20}, [], "PUT", "/admin/log-levels", "/admin/log-levels",
         {"levels": {"http": "DEBUG"}}, None, auth, 200),
        ({"insecure_admin": "true"}, [], "PUT", "/admin/log-levels", "/admin/log-levels",
         {"level": "warning"}, None, {}, 200),
        ({"insecure_admin": "true"}, [], "PUT", "/admin/log-levels", "/admin/log-levels",
         {"level": "loud"}, None, {}, 400),
        ({"insecure_admin": "true"}, [], "PUT", "/admin/log-levels", "/admin/log-levels",
         None, b"level=debug", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"insecure_admin": "true", "max_value_size": "1Ki"}, [], "PUT", "/admin/log-levels",
         "/admin/log-levels", {"level": "x" * 2000}, None, {}, 413),
        ({"admin_token": "a" * 20}, [], "PUT", "/admin/log-levels", "/admin/log-levels",
         {"level": "debug"}, None, {"Authorization": "Bearer wrong"}, 401),
        ({}, [], "PUT", "/admin/log-levels", "/admin/log-levels", {"level": "debug"}, None, {}, 403),
    ]


EXCHANGES = exchanges()


@pytest.mark.parametrize("case", EXCHANGES, ids=["%s %s %d" % (c[2], c[4][:40], c[8]) for c in EXCHANGES])
def test_answers_match_the_description(spec, case):
    """
    If each operation is driven to each status one node can reach, then the answer has that status, and the
    description documents it, its content type and its body.
    """
    settings, setup, method, path, request_path, body, raw_body, headers, expected = case
    api = API(**settings)
    for step in setup:
        if step == "drain":
            api.node.begin_leaving()
        elif step == "peer":
            api.node.membership.observe(Heartbeat("n2", 1, "10.0.0.2", 3000, "alive", 1))
        else:
            assert api.call(*step)[0] in (200, 201)
    code, answer, response = api.call(method, request_path, body=body, raw_body=raw_body, headers=headers)
    assert code == expected, answer
    check_answer(spec, method, path, code, answer, response)


def test_every_documented_status_is_exercised(spec):
    """
    If the exchanges above are listed, then together they reach every documented status of every operation
    that one healthy node can reach (not 503, which needs unreachable replicas or the connection cap).
    """
    reached = {(case[2].lower(), case[3], str(case[8])) for case in EXCHANGES}
    missing = []
    for path, method, operation in operations(spec):
        for status in operation["responses"]:
            if status == "503" and path != "/health/ready":
                continue
            if (method, path, status) not in reached:
                missing.append("%s %s %s" % (method.upper(), path, status))
    assert not missing, missing


# -- schemathesis against a live node ---------------------------------------------------------------


@pytest.mark.e2e
def test_schemathesis_finds_no_nonconformance():
    """
    If schemathesis drives a live node from the description (every check: no 5xx, documented statuses,
    content types, headers and schemas, invalid input refused, 405 + Allow, stateful links), then it finds
    nothing, and the node logs no traceback.
    """
    require_tool("schemathesis")
    env = dict(os.environ)
    env.setdefault("MAX_EXAMPLES", "30")
    env.setdefault("ST_TIMEOUT", "240")
    env["PYTHON"] = sys.executable
    result = subprocess.run(["bash", SCRIPT], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=420)
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, output[-12000:]
