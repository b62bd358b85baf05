"""
Who may call the internal routes (``/<tenant>/_internal/*``, the copy-stream upgrade included).

- With CLUSTER_SECRET: a peer whose request carries a valid signature (:class:`~kvresponder.peers.PeerAuthenticator`);
  anything else gets 401.
- Without it, and with ``--insecure-cluster``: anyone who can reach the port.
- Without either: no one. The node serves alone, and every internal call gets 403 ``cluster_disabled``, which
  names both settings, as Redis's protected mode names its own.
"""

from typing import Optional

from ..peers import AUTH_HEADER
from ..peertransport import LENGTH_AUTH_HEADER
from .errors import APIError

CLUSTER_DISABLED = APIError(
    403, "cluster_disabled",
    "This node serves alone: clustering needs CLUSTER_SECRET (the same on every node, at least 16 characters), "
    "or --insecure-cluster (INSECURE_CLUSTER=true) on a trusted network.")
UNAUTHORIZED = APIError(401, "unauthorized", "Internal routes need a valid cluster signature.")
REPLAYED = APIError(401, "unauthorized", "This signature was used already; sign each request afresh.")

#: :meth:`PeerGuard.length_signature`'s answers.
SIGNED_BY_PEER = "signed by a peer"
ANYONE = "anyone (--insecure-cluster)"
UNSIGNED = "unsigned"


class PeerGuard:
    """
    :param authenticator: a :class:`~kvresponder.peers.PeerAuthenticator`, or ``None`` without a secret.
    :param bool insecure: ``--insecure-cluster``: without a secret, let anyone in rather than no one.
    """

    def __init__(self, authenticator=None, insecure: bool = False) -> None:
        self._auth = authenticator
        self._insecure = insecure

    @property
    def authenticator(self):
        return self._auth

    @property
    def closed(self) -> bool:
        """Whether no one may call: no secret, and no --insecure-cluster."""
        return self._auth is None and not self._insecure

    def late_by(self, request, now: float, slack: float) -> float:
        """
        Seconds by which a signed request arrived later than ``slack`` after it was signed (0 when it did not,
        or without a secret): a captured request replayed within the signature's window arrives late by about
        the time since it was captured.

        :param now: this node's wall clock.
        """
        if self._auth is None:
            return 0.0
        signed = self._auth.signed_at(request.getHeader(AUTH_HEADER))
        if signed is None:
            return 0.0
        return max(0.0, now - signed - slack)

    def length_signature(self, headers, method: bytes, path: bytes, length: Optional[int]) -> str:
        """
        What a request's head (``headers``, Twisted ``Headers``) shows about who sends its body of ``length`` bytes
        (``None``: chunked), before the body is read: :data:`SIGNED_BY_PEER` when it is signed for that length
        with the cluster secret; :data:`ANYONE` with --insecure-cluster and no secret, where every head passes;
        :data:`UNSIGNED` otherwise (a chunked body, whose length no one can sign, included). Only a peer's or
        anyone's body may be larger than a client's; only a peer's is trusted to bound its own size.
        """
        if self.closed:
            return UNSIGNED
        if self._auth is None:
            return ANYONE
        if length is None:
            return UNSIGNED
        header = headers.getRawHeaders(LENGTH_AUTH_HEADER, [None])[0]
        if self._auth.verify_length(header, method, path, length) and self._auth.first_use(header):
            # Once: a captured head sent again, with any body of that length, must not skip the budget again.
            return SIGNED_BY_PEER
        return UNSIGNED

    def check_once(self, request) -> None:
        """
        :meth:`check` for a request without a body whose signature grants what a replay must not get again (a
        copy stream): a signature already used is refused 401.
        """
        self.check(request, b"")
        if self._auth is not None and not self._auth.first_use(request.getHeader(AUTH_HEADER)):
            raise REPLAYED

    def check(self, request, body: Optional[bytes]) -> None:
        """
        :param body: the request's body (the signature covers it).
        :raises APIError: 403 when clustering is disabled, 401 for a missing or bad signature.
        """
        if self.closed:
            raise CLUSTER_DISABLED
        if self._auth is None:
            return
        if not self._auth.verify(request.getHeader(AUTH_HEADER), request.method, request.path, body or b""):
            raise UNAUTHORIZED
