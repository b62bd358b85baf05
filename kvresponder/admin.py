"""
Who may use ``/admin/*``.

With ``ADMIN_TOKEN`` set, every admin request needs ``Authorization: Bearer <token>``. Without it, admin
reads are open and admin writes are refused, unless the operator explicitly chose ``--insecure-admin``.
"""

import hmac

from .http.errors import APIError


class AdminGuard:
    def __init__(self, token=None, insecure: bool = False) -> None:
        self._token = token.encode("utf-8") if token else None
        self.insecure = insecure

    @property
    def mode(self) -> str:
        if self._token is not None:
            return "token"
        return "insecure" if self.insecure else "read-only"

    def authorize(self, request, write: bool) -> None:
        """
        :raises APIError: 401 for a missing or wrong token, 403 for writes that are switched off.
        """
        if self._token is not None:
            # Exactly one: with two, which of them counts would depend on their order.
            headers = request.requestHeaders.getRawHeaders(b"authorization") or [b""]
            scheme, _, given = headers[0].partition(b" ")
            if (len(headers) != 1 or scheme.lower() != b"bearer"
                    or not hmac.compare_digest(given.strip(), self._token)):
                raise APIError(401, "unauthorized", "Admin routes need \"Authorization: Bearer <ADMIN_TOKEN>\".",
                               {b"WWW-Authenticate": b'Bearer realm="kvresponder-admin"'})
            return
        if write and not self.insecure:
            raise APIError(403, "admin_disabled", "Admin writes are off: set ADMIN_TOKEN, or start the node "
                                                  "with --insecure-admin on a trusted network.")
