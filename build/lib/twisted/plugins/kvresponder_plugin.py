"""
The ``twistd kvresponder`` plugin. Lazy: ``twistd --help`` does not import the server.
"""

from twisted.application.service import ServiceMaker

kvresponder = ServiceMaker(
    "KV Responder",
    "kvresponder.tap",
    "A self-discovering, multi-tenant, in-memory cache service.",
    "kvresponder",
)
