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
