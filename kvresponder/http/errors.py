"""
One mapping from failures to JSON error bodies.

Every error a client sees is ``{"error": "<code>", "message": "<sentence>"}`` with the right status, and
never a traceback.
"""

import json
from typing import Dict, Optional


class APIError(Exception):
    """
    A request failed in a way the client should hear about.

    :param int status: the HTTP status.
    :param str code: a stable machine-readable code.
    :param str message: a human sentence.
    :param headers: extra response headers (``Allow`` for 405).
    """

    def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[bytes, bytes]] = None):
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}, separators=(",", ":")).encode("utf-8")


def write_error(request, error: APIError) -> bytes:
    """
    Set the status and headers of ``error`` on ``request`` and return its body.
    """
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return error_body(error.code, error.message)


def not_found(message: str = "No such route.") -> APIError:
    return APIError(404, "not_found", message)


def method_not_allowed(allowed) -> APIError:
    allow = ", ".join(allowed)
    return APIError(405, "method_not_allowed", "This route accepts %s." % (allow,),
                    {b"Allow": allow.encode("ascii")})


def bad_request(code: str, message: str) -> APIError:
    return APIError(400, code, message)


def unavailable(message: str) -> APIError:
    return APIError(503, "unavailable", message)


def too_large(message: str) -> APIError:
    return APIError(413, "payload_too_large", message)


#: A 404's message under a tenant's prefix: every route the prefix serves.
NO_ROUTE_MESSAGE = "No such route; try kv, bulk, health, peers, metrics, diag, openapi.json or admin/log-levels."
