"""
Eliot types of the HTTP area.
"""

from eliot import ActionType, Field, MessageType

from . import DEBUG, INFO, WARNING, leveled

METHOD = Field.for_types("method", [str], "The HTTP method.")
ROUTE = Field.for_types("route", [str], "The route template, e.g. /kv/{key}.")
STATUS = Field.for_types("status", [int], "The response status code.")
DURATION = Field.for_types("duration_ms", [float], "Milliseconds spent serving the request.")

#: Requests that change state (bulk, admin writes; kv writes log it at debug only).
HTTP_REQUEST = leveled("http", INFO, ActionType(
    "kvresponder:http:request", [METHOD, ROUTE], [STATUS, DURATION],
    "A request was served on the HTTP interface."))

#: Requests that read (kv reads, health, metrics, peers, diag, lists): logged only at debug.
HTTP_READ = leveled("http", DEBUG, ActionType(
    "kvresponder:http:read", [METHOD, ROUTE], [STATUS, DURATION],
    "A read was served on the HTTP interface."))

HTTP_REJECTED = leveled("http", WARNING, MessageType(
    "kvresponder:http:rejected", [Field.for_types("reason", [str], "Why the request was refused."),
                                  Field.for_types("client", [str], "The client address.")],
    "A request or connection was refused before routing (too large, too many connections, no room among the "
    "bodies held, no valid Host, a request target that is not a path, an HTTP/1.0 request with a "
    "Transfer-Encoding)."))
