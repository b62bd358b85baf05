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
def spec_for(tenant: str) -> dict:
    """
    The description as a node of ``tenant`` serves it: its servers' ``tenant`` variable defaults to that tenant,
    so that a client generated from it, or a "try it" page, calls this node's routes as they are.
    """
    spec = load_spec()
    servers = []
    for server in spec.get("servers", []):
        variables = server.get("variables", {})
        if "tenant" in variables:
            variables = dict(variables, tenant=dict(variables["tenant"], default=tenant))
            server = dict(server, variables=variables)
        servers.append(server)
    return dict(spec, servers=servers)
