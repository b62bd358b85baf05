"""
Typed, validated settings: one place for every default and every check.

Each setting comes from its command-line option if given, else from its environment variable, else from its
default. A bad value raises :class:`SettingsError` with a one-line message naming the option and the value.
"""

import ipaddress
import re
import secrets
import socket
import urllib.parse
import zlib
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Mapping, Optional

from .hlc import NODE_ID_PATTERN
from .http.limits import default_body_buffer
from .log import canonical_level

TENANT_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
DISCOVERY_MODES = ("multicast", "dns", "both")
_SIZE_UNITS = {"": 1, "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3,
               "k": 1000, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}
_SIZE = re.compile(r"^\s*(\d+)\s*(Ki|Mi|Gi|k|K|M|G)?\s*$")


class SettingsError(ValueError):
    """
    A setting is missing or invalid. The message is one line and names the option and its value.
    """


def parse_size(text: str) -> int:
    """
    A byte count: ``"1048576"``, ``"512Ki"``, ``"256Mi"``, ``"1Gi"`` (or decimal ``k``/``M``/``G``).
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError("not a size")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]


def discovery_group_for(tenant: str) -> str:
    """
    The tenant's multicast group, 239.255.x.y, from a stable hash of its name. The Helm chart computes the
    same address with sprig's ``adler32sum``; keep the two in step.
    """
    checksum = zlib.adler32(tenant.encode("utf-8"))
    return "239.255.%d.%d" % (1 + (checksum >> 16) % 254, 1 + (checksum & 0xFFFF) % 254)


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value < 1e9):
        raise ValueError("must be a positive number of seconds")
    return value


#: The largest MAX_CLOCK_OFFSET: two nodes each within the bound of the cluster's clocks may be twice it apart, and
#: must still take each other's heartbeats (replay window: 30 s plus the bound) and signed calls (60 s).
MAX_CLOCK_OFFSET_LIMIT = 20.0


def _clock_bound(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_CLOCK_OFFSET_LIMIT:
        raise ValueError("must be at most %g seconds: nodes twice the bound apart would refuse each other's "
                         "heartbeats and calls" % (MAX_CLOCK_OFFSET_LIMIT,))
    return value


def _seconds_from_zero(text: str) -> float:
    value = float(text)
    if not (value >= 0 and value < 1e9):
        raise ValueError("must be a number of seconds, 0 or more")
    return value


def _http_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in text):
        raise ValueError("must be the collector's http:// or https:// URL (e.g. http://jaeger:4318)")
    if parts.port == 0:  # reading it raises ValueError for a port that is not a number
        raise ValueError("must name a port above 0")
    return text


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError("must be between %d and %d" % (low, high))
        return value
    return parse


def _tenant(text: str) -> str:
    if len(text) > 40 or not TENANT_PATTERN.match(text):
        raise ValueError("must be a DNS label ([a-z0-9]([-a-z0-9]*[a-z0-9])?) of at most 40 characters")
    return text


def _ipv4(text: str) -> str:
    return str(ipaddress.IPv4Address(text))


def _multicast_group(text: str) -> str:
    address = ipaddress.IPv4Address(text)
    if not address.is_multicast:
        raise ValueError("must be an IPv4 multicast address")
    return str(address)


def _choice(options) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError("must be one of %s" % ", ".join(options))
        return value
    return parse


def _size(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_size(text)
        if value < low:
            raise ValueError("must be at least %d bytes" % (low,))
        if high is not None and value > high:
            raise ValueError("must be at most %d bytes" % (high,))
        return value
    return parse


def _port_endpoint(text: str) -> str:
    text = text.strip()
    if text.isdigit():
        port = int(text)
        if not 0 <= port <= 65535:
            raise ValueError("must be a port number or a server endpoint string")
        return text
    if ":" not in text:
        raise ValueError("must be a port number or a server endpoint string")
    return text


def _node_id(text: str) -> str:
    if not NODE_ID_PATTERN.match(text):
        raise ValueError("must be 1-63 letters, digits, '-', '_' or '.'")
    return text


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _log_level(text: str) -> str:
    level = canonical_level(text.strip())
    if level is None:
        raise ValueError("must be one of debug, info, warning (or warn), error")
    return level


def _text(text: str) -> str:
    return text


def _secret(text: str) -> str:
    if len(text) < 16:
        raise ValueError("must be at least 16 characters (generate one with: python3 -c "
                         "'import secrets; print(secrets.token_urlsafe(32))')")
    return text


@dataclass(frozen=True)
class Option:
    """
    How one setting is read: its ``--flag``, its environment variables (first set wins), its default and
    its parser.
    """
    name: str
    env: tuple
    default: Optional[str]
    parse: Callable[[str], object]
    help: str
    secret: bool = False

    @property
    def is_flag(self) -> bool:
        """
        Whether the setting is true or false: on the command line, a flag that takes no value.
        """
        return self.parse is _bool


#: Every setting, in the order ``--help`` lists them.
OPTIONS = (
    Option("tenant", ("TENANT",), None, _tenant, "Tenant served by this node (a DNS label). Required."),
    Option("port", ("PORT",), "3000", _port_endpoint, "HTTP port, or a Twisted server endpoint string."),
    Option("listen-address", ("LISTEN_ADDRESS",), None, _ipv4,
           "IPv4 address a bare --port listens on (default: 127.0.0.1 if the advertise address is loopback, "
           "else 0.0.0.0)."),
    Option("advertise-address", ("ADVERTISE_ADDRESS", "POD_IP"), "127.0.0.1", _ipv4,
           "IPv4 address peers use to reach this node."),
    Option("advertise-port", ("ADVERTISE_PORT",), None, _int_in(1, 65535),
           "HTTP port peers use (default: the listening port)."),
    Option("node-id", ("NODE_ID",), None, _node_id, "This node's id (default: generated at start)."),
    Option("discovery-mode", ("DISCOVERY_MODE",), "both", _choice(DISCOVERY_MODES),
           "multicast, dns or both (DNS seeds only with --discovery-dns)."),
    Option("discovery-port", ("DISCOVERY_PORT",), "9999", _int_in(1, 65535), "UDP discovery port."),
    Option("discovery-group", ("DISCOVERY_GROUP",), None, _multicast_group,
           "Multicast group (default: 239.255.x.y derived from the tenant)."),
    Option("discovery-interface", ("DISCOVERY_INTERFACE",), None, _ipv4,
           "Interface address for multicast (default: the advertise address)."),
    Option("discovery-dns", ("DISCOVERY_DNS",), None, _text,
           "Host name whose A records are discovery seeds (a headless Service)."),
    Option("discovery-ttl", ("DISCOVERY_TTL",), "1", _int_in(1, 255), "Multicast TTL."),
    Option("heartbeat-interval", ("HEARTBEAT_INTERVAL",), "5", _positive_float, "Seconds between heartbeats."),
    Option("peer-timeout", ("PEER_TIMEOUT",), None, _positive_float,
           "Seconds of silence before a peer is dead (default: 3 heartbeat intervals)."),
    Option("replicas", ("REPLICATION_FACTOR",), "2", _int_in(1, 16), "Copies kept of each key."),
    Option("write-quorum", ("WRITE_QUORUM",), None, _int_in(1, 16),
           "Copies needed to acknowledge a write (default: replicas, capped by live nodes)."),
    Option("vnodes", ("VNODES",), "128", _int_in(1, 4096), "Virtual nodes per node on the hash ring."),
    Option("max-memory", ("MAX_MEMORY",), "256Mi", _size(64 * 1024), "Store budget in bytes (Ki/Mi/Gi)."),
    Option("max-value-size", ("MAX_VALUE_SIZE",), "1Mi", _size(64), "Largest request body in bytes (8 times for /bulk), and largest value of a bulk put."),
    Option("max-body-buffer", ("MAX_BODY_BUFFER",), None, _size(1024 * 1024),
           "Bytes of request bodies over 64 KiB held at once, over all connections; past it a request with one "
           "gets 503 body_buffer_full (default: the larger of 64 MiB and two /bulk bodies)."),
    Option("max-key-length", ("MAX_KEY_LENGTH",), "250", _int_in(1, 256),
           "Longest key, in characters (Unicode code points)."),
    # At most 256 KiB: a line is buffered until it ends, and scanned again at each read, so a client trickling one
    # line costs the node time that grows with the square of the cap (whole seconds of the reactor a connection
    # at a few MiB).
    Option("max-header-bytes", ("MAX_HEADER_BYTES",), "16Ki", _size(1024, 256 * 1024),
           "Largest request line plus headers, and of any one line of them."),
    Option("tombstone-grace", ("TOMBSTONE_GRACE",), "600", _positive_float,
           "Seconds a delete's tombstone (or an expired overwrite's) is kept."),
    Option("drain-timeout", ("DRAIN_TIMEOUT",), "20", _positive_float,
           "Seconds a SIGTERM'd node spends handing off its data."),
    Option("serve-after-leaving", ("SERVE_AFTER_LEAVING",), "2", _seconds_from_zero,
           "Seconds a SIGTERM'd node keeps serving requests after it begins leaving, at least (at most "
           "DRAIN_TIMEOUT): for clients and proxies that still send it requests until they see it gone."),
    Option("anti-entropy-interval", ("ANTI_ENTROPY_INTERVAL",), "30", _positive_float,
           "Seconds between anti-entropy rounds."),
    Option("peer-request-timeout", ("PEER_REQUEST_TIMEOUT",), "2", _positive_float,
           "Seconds before a peer call fails over."),
    Option("max-clock-offset", ("MAX_CLOCK_OFFSET",), "0.5", _clock_bound,
           "Seconds this node's clock may be off the cluster's before it refuses client requests; also how far "
           "ahead a peer's versions may be for this node's clock to adopt them (twice it, for its heartbeats)."),
    Option("replication-stream", ("REPLICATION_STREAM",), "true", _bool,
           "Send the copies of writes, and reads of keys this node does not own, to each peer over one upgraded "
           "connection (false: a request a batch)."),
    Option("request-timeout", ("REQUEST_TIMEOUT",), "30", _positive_float,
           "Seconds an idle or slow client connection may stay open."),
    Option("max-connections", ("MAX_CONNECTIONS",), "1024", _int_in(1, 1000000),
           "Open client connections accepted at once."),
    Option("log-level", ("LOG_LEVEL",), "info", _log_level, "debug, info, warning (or warn) or error."),
    Option("log-file", ("LOG_FILE",), None, _text, "Write Eliot logs to this file instead of stdout."),
    Option("log-buffer", ("LOG_BUFFER",), "16Mi", _size(64 * 1024, 1024 * 1024 * 1024),
           "Bytes of log lines held while the log stream falls behind (Ki/Mi/Gi); past it, lines are dropped "
           "and counted."),
    Option("otlp-endpoint", ("JAEGER_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"), None, _http_url,
           "OTLP/HTTP endpoint for traces (e.g. http://jaeger:4318)."),
    Option("cluster-secret", ("CLUSTER_SECRET",), None, _secret,
           "Shared secret authenticating discovery and peer calls.", secret=True),
    Option("cluster-secret-file", ("CLUSTER_SECRET_FILE",), None, _text,
           "File holding the cluster secret, read at start (instead of --cluster-secret)."),
    Option("admin-token", ("ADMIN_TOKEN",), None, _secret, "Bearer token for /admin/* (reads and writes, once set).", secret=True),
    Option("admin-token-file", ("ADMIN_TOKEN_FILE",), None, _text,
           "File holding the admin token, read at start (instead of --admin-token)."),
    Option("insecure-admin", ("INSECURE_ADMIN",), "false", _bool,
           "Allow admin writes without ADMIN_TOKEN."),
    Option("insecure-cluster", ("INSECURE_CLUSTER",), "false", _bool,
           "Cluster without CLUSTER_SECRET: accept unsigned heartbeats and peer calls (a trusted network only)."),
)


@dataclass(frozen=True)
class Settings:
    """
    The validated configuration of one node.
    """
    tenant: str
    port: str
    listen_address: Optional[str]
    advertise_address: str
    advertise_port: int
    node_id: str
    discovery_mode: str
    discovery_port: int
    discovery_group: str
    discovery_interface: str
    discovery_dns: Optional[str]
    discovery_ttl: int
    heartbeat_interval: float
    peer_timeout: float
    replicas: int
    write_quorum: Optional[int]
    vnodes: int
    max_memory: int
    max_value_size: int
    max_key_length: int
    max_header_bytes: int
    tombstone_grace: float
    drain_timeout: float
    anti_entropy_interval: float
    peer_request_timeout: float
    request_timeout: float
    max_connections: int
    log_level: str
    log_file: Optional[str]
    log_buffer: int
    #: Left out of the repr: it may carry credentials (see :func:`without_userinfo`).
    otlp_endpoint: Optional[str] = field(repr=False)
    cluster_secret: Optional[str] = field(default=None, repr=False)
    admin_token: Optional[str] = field(default=None, repr=False)
    cluster_secret_file: Optional[str] = None
    admin_token_file: Optional[str] = None
    insecure_admin: bool = False
    replication_stream: bool = True
    max_clock_offset: float = 0.5
    insecure_cluster: bool = False
    max_body_buffer: Optional[int] = None
    serve_after_leaving: float = 2.0

    @property
    def multicast_enabled(self) -> bool:
        return self.discovery_mode in ("multicast", "both")

    @property
    def clustering(self) -> str:
        """
        Who this node clusters with: ``authenticated`` (peers that hold CLUSTER_SECRET), ``insecure`` (anyone,
        with --insecure-cluster and no secret), or ``disabled`` (no secret: it serves alone).
        """
        if self.cluster_secret:
            return "authenticated"
        return "insecure" if self.insecure_cluster else "disabled"

    @property
    def dns_enabled(self) -> bool:
        return self.discovery_mode in ("dns", "both") and bool(self.discovery_dns)

    @property
    def listen_endpoint(self) -> str:
        """
        The server endpoint string. A bare port listens on ``listen_address`` when one is set (the image sets
        0.0.0.0, so that a container without POD_IP is reachable on its published port); otherwise on
        loopback when the node advertises loopback (a laptop, a test), and on every interface otherwise (a
        pod). An endpoint string names its own interface.
        """
        if self.port.isdigit():
            interface = self.listen_address
            if interface is None:
                interface = "127.0.0.1" if self.advertise_address.startswith("127.") else "0.0.0.0"
            return "tcp:%s:interface=%s" % (self.port, interface)
        return self.port

    def redacted(self) -> Dict[str, object]:
        """
        The effective configuration with every secret replaced by whether it is set.
        """
        result = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in ("cluster_secret", "admin_token"):
                value = "<set>" if value else None
            elif item.name == "otlp_endpoint" and value:
                value = without_userinfo(value)
            result[item.name] = value
        return result


def without_userinfo(url: str) -> str:
    """
    ``url`` with any user name and password in it replaced by ``<redacted>``: the OTLP exporter sends them as
    Basic credentials, and the configuration is shown by ``/diag`` (which needs no token) and logged at start.
    """
    scheme, separator, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not separator or "@" not in authority:
        return url
    return "%s://<redacted>@%s%s%s" % (scheme, authority.rpartition("@")[2], slash, path)


def _attribute(option: Option) -> str:
    return _attribute_of(option.name)


def _attribute_of(name: str) -> str:
    return name.replace("-", "_")


#: Variables earlier versions read, with what replaced them: a node refuses to start with one of them set
#: rather than quietly run with a different limit than its operator asked for.
RETIRED = {
    "MAX_KEY_BYTES": "set MAX_KEY_LENGTH, the longest key in characters (Unicode code points), instead",
}


#: Secrets that can also come from a file, each with its file's option: (secret, file option).
_SECRET_FILES = (("cluster-secret", "cluster-secret-file"), ("admin-token", "admin-token-file"))


def _read_secret_file(path: str, source: str) -> str:
    """
    The secret held in a file (a mounted Kubernetes Secret), without its trailing newline.
    """
    try:
        with open(path, encoding="utf-8") as secret_file:
            text = secret_file.read()
    except OSError as error:
        raise SettingsError("%s: cannot read %r: %s" % (source, path, error.strerror or error))
    except UnicodeDecodeError:
        raise SettingsError("%s: %r is not UTF-8 text" % (source, path))
    # `echo secret > file` and `kubectl create secret --from-file` keep the line's end.
    return text.rstrip("\r\n")


def load_settings(given: Mapping[str, Optional[str]], environ: Mapping[str, str],
                  new_node_id: Callable[[], str] = None) -> Settings:
    """
    Build :class:`Settings` from command-line values (``None`` when not given) and the environment.

    :raises SettingsError: naming the first missing or invalid option.
    """
    for variable, replacement in RETIRED.items():
        if environ.get(variable, "") != "":
            raise SettingsError("%s is no longer read: %s" % (variable, replacement))
    values: Dict[str, object] = {}
    sources: Dict[str, str] = {}
    for option in OPTIONS:
        raw = given.get(option.name)
        source = "--" + option.name
        if raw is None:
            for variable in option.env:
                if environ.get(variable, "") != "":
                    raw = environ[variable]
                    source = "%s (%s)" % (source, variable)
                    break
        if raw is None:
            raw = option.default
        if raw is None:
            values[_attribute(option)] = None
            continue
        sources[option.name] = source
        try:
            values[_attribute(option)] = option.parse(raw)
        except ValueError as error:
            shown = "<redacted>" if option.secret else repr(raw)
            raise SettingsError("%s: invalid value %s: %s" % (source, shown, error))

    if values["tenant"] is None:
        raise SettingsError("--tenant (TENANT) is required: name the tenant this node serves")
    for secret, secret_file in _SECRET_FILES:
        path = values[_attribute_of(secret_file)]
        if path is None:
            continue
        if values[_attribute_of(secret)] is not None:
            # Neither silently wins: an operator who set both meant one of them, and a stale one would split
            # the cluster or lock the admin out.
            raise SettingsError("%s and %s are both set: set only one" % (sources[secret], sources[secret_file]))
        try:
            values[_attribute_of(secret)] = _secret(_read_secret_file(path, sources[secret_file]))
        except ValueError as error:
            if isinstance(error, SettingsError):
                raise
            raise SettingsError("%s: the secret in %r is invalid: %s" % (sources[secret_file], path, error))
    port = values["port"]
    if values["advertise_port"] is None:
        match = re.match(r"^(?:tcp:)?(?:port=)?(\d+)", str(port))
        if match is None or int(match.group(1)) == 0:
            raise SettingsError("--advertise-port (ADVERTISE_PORT) is required when --port is %r" % (port,))
        values["advertise_port"] = int(match.group(1))
    if values["node_id"] is None:
        values["node_id"] = (new_node_id or _new_node_id)()
    if values["discovery_group"] is None:
        values["discovery_group"] = discovery_group_for(values["tenant"])
    if values["discovery_interface"] is None:
        values["discovery_interface"] = values["advertise_address"]
    if values["peer_timeout"] is None:
        values["peer_timeout"] = 3 * values["heartbeat_interval"]
    if values["peer_timeout"] < 2 * values["heartbeat_interval"]:
        # Heartbeats are datagrams: with less than two intervals, one lost on the way made a peer dead, then
        # joined again, each time moving its data and unsettling the ring.
        raise SettingsError("--peer-timeout (PEER_TIMEOUT): invalid value %r: must be at least twice the "
                            "heartbeat interval %r, or one lost heartbeat makes a peer dead"
                            % (values["peer_timeout"], values["heartbeat_interval"]))
    if values["tombstone_grace"] <= values["anti_entropy_interval"]:
        # A replica that missed a delete (or a fallback holding it as a hint) is repaired by a pass of a node that
        # still holds the tombstone: with a shorter grace, the deleted value comes back from it.
        raise SettingsError("--tombstone-grace (TOMBSTONE_GRACE): invalid value %r: must be longer than the "
                            "anti-entropy interval %r, or a replica that missed a delete brings the value back"
                            % (values["tombstone_grace"], values["anti_entropy_interval"]))
    if values["write_quorum"] is not None and values["write_quorum"] > values["replicas"]:
        raise SettingsError("--write-quorum (WRITE_QUORUM): invalid value %r: must not exceed "
                            "--replicas %r" % (values["write_quorum"], values["replicas"]))
    if (values["write_quorum"] is not None and values["write_quorum"] > 1 and not values["cluster_secret"]
            and not values["insecure_cluster"]):
        raise SettingsError("--write-quorum (WRITE_QUORUM): invalid value %r: a node without CLUSTER_SECRET (or "
                            "--insecure-cluster) serves alone and stores one copy, so every write would answer 503"
                            % (values["write_quorum"],))
    bulk_body = 8 * values["max_value_size"]
    if values["max_body_buffer"] is None:
        values["max_body_buffer"] = default_body_buffer(bulk_body)
    elif values["max_body_buffer"] < bulk_body:
        raise SettingsError("--max-body-buffer (MAX_BODY_BUFFER): invalid value %r: must hold one /bulk body, "
                            "8 x MAX_VALUE_SIZE = %d bytes" % (values["max_body_buffer"], bulk_body))
    if values["discovery_mode"] == "dns" and not values["discovery_dns"]:
        raise SettingsError("--discovery-dns (DISCOVERY_DNS) is required when --discovery-mode is 'dns'")
    if (values["discovery_dns"] and values["discovery_mode"] in ("dns", "both")
            and (values["cluster_secret"] or values["insecure_cluster"])
            and values["advertise_address"].startswith("127.")):
        # Its peers, found by name on other hosts, would take it in at 127.0.0.1 and send its share of the copies
        # to themselves: writes acknowledged with one real copy, lost with that node.
        raise SettingsError("--advertise-address (ADVERTISE_ADDRESS, or POD_IP) is %s, a loopback address, while "
                            "DISCOVERY_DNS names peers on other hosts: set it to this node's own address"
                            % (values["advertise_address"],))
    return Settings(**values)


def _new_node_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40].strip("-.") or "node"
    return "%s-%s" % (host, secrets.token_hex(3))
