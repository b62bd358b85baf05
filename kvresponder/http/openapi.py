"""
The OpenAPI 3.1 description of the public API, shipped in the package and served at
``/<tenant>/openapi.json``.
"""

import json
import os
from functools import lru_cache

SPEC_PATH = os.path.join(os.path.dirname(__file__), "openapi.json")


@lru_cache(maxsize=1)
def load_spec() -> dict:
    with open(SPEC_PATH, encoding="utf-8") as spec:
        return json.load(spec)


@lru_cache(maxsize=4)
def spec_for(tenant: str, max_key_length: int) -> dict:
    """
    The description as a node of ``tenant`` serves it: its servers' ``tenant`` variable defaults to that tenant,
    and a key's ``maxLength`` is the node's ``MAX_KEY_LENGTH``, so that a client generated from it, or a "try it"
    page, calls this node's routes as they are and checks keys as the node does.
    """
    spec = load_spec()
    components = spec["components"]
    schemas = components["schemas"]
    spec = dict(spec, components=dict(components, schemas=dict(
        schemas, Key=dict(schemas["Key"], maxLength=max_key_length))))
    servers = []
    for server in spec.get("servers", []):
        variables = server.get("variables", {})
        if "tenant" in variables:
            variables = dict(variables, tenant=dict(variables["tenant"], default=tenant))
            server = dict(server, variables=variables)
        servers.append(server)
    return dict(spec, servers=servers)
