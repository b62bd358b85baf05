"""
The names of the body limits a route can have. The resource tree says which one a request gets
(:meth:`~kvresponder.http.root.RootResource.body_limit_for`); the site holds their sizes
(:class:`~kvresponder.http.site.KVSite`), from MAX_VALUE_SIZE.
"""

#: A value: MAX_VALUE_SIZE. Every route that names no other limit.
VALUE = "value"
#: ``/bulk``: 8 × MAX_VALUE_SIZE.
BULK = "bulk"
#: ``/_internal/*``, peers' batches: max(64 MiB, 4 × MAX_VALUE_SIZE).
INTERNAL = "internal"
