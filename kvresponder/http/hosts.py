"""
The Host header rule of RFC 9112 (3.2), which both request paths (Twisted's and the fast lane) apply: a server
must answer 400 to an HTTP/1.1 request without a Host header, and to any request with more than one, or with
one whose value is not a host. Proxies and caches in front of a node route by that header; a request they
and the node would read differently is refused, not guessed at.
"""

import re
from ipaddress import IPv6Address
from typing import List, Optional

_HOST_FORM = re.compile(
    rb"(?:\[(?:([0-9A-Fa-f:.]+)|[vV][0-9A-Fa-f]+\.[0-9A-Za-z._~!$&'()*+,;=:-]+)\]"
    rb"|(?:[0-9A-Za-z._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?\Z").match


def valid_host(value: bytes) -> bool:
    """
    Whether ``value`` is a Host header's value (RFC 9112, 3.2; RFC 3986, 3.2.2 and 3.2.3): in brackets, an IPv6
    address (an embedded IPv4 address included; no zone id, which RFC 9844 keeps out of URIs) or an IPvFuture
    literal; or a registered name or IPv4 address (unreserved characters, percent-encodings and sub-delimiters;
    possibly empty); then an optional port.
    """
    form = _HOST_FORM(value)
    if form is None:
        return False
    address = form.group(1)
    if address is None:
        return True
    try:
        IPv6Address(address.decode("ascii"))
    except ValueError:
        # Characters an address is made of, in no address's order: [:], [1], [1:2:3].
        return False
    return True


def host_refusal(version: bytes, hosts: Optional[List[bytes]]) -> Optional[str]:
    """
    Why a request with protocol ``version`` and the Host header values ``hosts`` (``None`` if it has none)
    must be answered 400, as RFC 9112 (3.2) requires: an HTTP/1.1 request without Host, any request with more
    than one, or one whose value is not a host and port. ``None`` if it need not.
    """
    if hosts is None:
        return "An HTTP/1.1 request needs a Host header." if version == b"HTTP/1.1" else None
    if len(hosts) != 1:
        return "A request may have one Host header, not %d." % (len(hosts),)
    if not valid_host(hosts[0]):
        return "The Host header is not a host with an optional port."
    return None
