"""
Tests for :mod:`kvresponder.settings`.
"""

import ipaddress
import zlib

import pytest
from hypothesis import given, strategies as st

from kvresponder.settings import OPTIONS, SettingsError, discovery_group_for, load_settings, parse_size

SECRET = "s3cret-s3cret-s3cret"


def load(given=None, environ=None, **kwargs):
    options = {"tenant": "t1"}
    options.update(given or {})
    return load_settings(options, environ or {}, new_node_id=lambda: "node-1", **kwargs)


def error_of(given=None, environ=None) -> str:
    with pytest.raises(SettingsError) as raised:
        load(given, environ)
    return str(raised.value)


def test_if_only_the_tenant_is_given_then_every_setting_takes_its_documented_default():
    """
    If only the tenant is given, then every setting takes its documented default.
    """
    assert load().redacted() == {
        "tenant": "t1",
        "port": "3000",
        "listen_address": None,
        "advertise_address": "127.0.0.1",
        "advertise_port": 3000,
        "node_id": "node-1",
        "discovery_mode": "both",
        "discovery_port": 9999,
        "discovery_group": "239.255.30.167",
        "discovery_interface": "127.0.0.1",
        "discovery_dns": None,
        "discovery_ttl": 1,
        "heartbeat_interval": 5.0,
        "peer_timeout": 15.0,
        "replicas": 2,
        "write_quorum": None,
        "vnodes": 128,
        "max_memory": 256 * 1024 * 1024,
        "max_value_size": 1024 * 1024,
        "max_key_length": 250,
        "max_header_bytes": 16 * 1024,
        "tombstone_grace": 600.0,
        "drain_timeout": 20.0,
        "anti_entropy_interval": 30.0,
        "peer_request_timeout": 2.0,
        "request_timeout": 30.0,
        "max_connections": 1024,
        "log_level": "info",
        "log_file": None,
        "log_buffer": 16 * 1024 * 1024,
        "otlp_endpoint": None,
        "cluster_secret": None,
        "admin_token": None,
        "cluster_secret_file": None,
        "admin_token_file": None,
        "insecure_admin": False,
        "replication_stream": True,
        "max_clock_offset": 0.5,
        "insecure_cluster": False,
        "max_body_buffer": 64 * 1024 * 1024,
        "serve_after_leaving": 2.0,
    }


def test_every_option_has_a_setting_and_a_unique_flag_and_environment_variable():
    """
    If the option table is read, then each option maps to one field of ``Settings``, and no flag or
    environment variable is used twice.
    """
    names = [option.name for option in OPTIONS]
    variables = [variable for option in OPTIONS for variable in option.env]
    assert len(set(names)) == len(names)
    assert len(set(variables)) == len(variables)
    assert set(load().redacted()) == {name.replace("-", "_") for name in names}


def _table_variables(path: str, heading: str) -> set:
    """
    The upper-case environment variables named in the first column of the table under ``heading``.
    """
    import os
    import re
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)) as page:
        text = page.read()
    section = text[text.index(heading):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    found = set()
    for line in section.splitlines():
        if line.startswith("|"):
            cells = line.split("|")
            found.update(re.findall(r"\b[A-Z][A-Z0-9_]+\b", cells[1] + (cells[2] if path == "README.md" else "")))
    return found


@pytest.mark.parametrize("path, heading", [("docs/CONTRACT.md", "## Environment"), ("README.md", "## Configuration")])
def test_the_pages_tables_of_settings_name_every_environment_variable_and_no_other(path, heading):
    """
    The settings tables an operator reads (CONTRACT.md's, README.md's) name every variable the node reads, and
    none it does not.
    """
    variables = {variable for option in OPTIONS for variable in option.env}
    named = _table_variables(path, heading)
    assert named - {"POD_IP"} == variables - {"POD_IP"}, (sorted(variables - named), sorted(named - variables))


def test_generated_node_id_is_used_only_when_none_is_given():
    """
    If no node id is given, then the generator's is used; a given one wins.
    """
    assert load().node_id == "node-1"
    assert load(environ={"NODE_ID": "pod-7"}).node_id == "pod-7"
    generated = load_settings({"tenant": "t1"}, {}).node_id
    assert 1 <= len(generated) <= 63


def test_environment_is_used_when_the_flag_is_not_given():
    """
    If a setting is only in the environment, then its parsed value is used.
    """
    settings = load_settings({}, {"TENANT": "envtenant", "PORT": "8080", "MAX_MEMORY": "1Gi",
                                  "HEARTBEAT_INTERVAL": "2", "REPLICATION_FACTOR": "3",
                                  "LOG_LEVEL": "DEBUG", "INSECURE_ADMIN": "yes"})
    assert (settings.tenant, settings.port, settings.advertise_port) == ("envtenant", "8080", 8080)
    assert (settings.max_memory, settings.heartbeat_interval, settings.peer_timeout) == (1 << 30, 2.0, 6.0)
    assert (settings.replicas, settings.log_level, settings.insecure_admin) == (3, "debug", True)


def test_command_line_wins_over_the_environment():
    """
    If a setting is given both as a flag and in the environment, then the flag's value is used.
    """
    settings = load_settings({"tenant": "flag", "port": "4000", "replicas": "4"},
                             {"TENANT": "env", "PORT": "5000", "REPLICATION_FACTOR": "1"})
    assert (settings.tenant, settings.port, settings.replicas) == ("flag", "4000", 4)


def test_empty_environment_variable_counts_as_unset():
    """
    If an environment variable is set to the empty string (a chart's empty value), then the default is used.
    """
    assert load(environ={"PORT": "", "LOG_LEVEL": ""}).redacted() == load().redacted()


@pytest.mark.parametrize("environ, expected", [
    ({}, "127.0.0.1"),
    ({"POD_IP": "10.1.2.3"}, "10.1.2.3"),
    ({"POD_IP": "10.1.2.3", "ADVERTISE_ADDRESS": "10.9.9.9"}, "10.9.9.9"),
    ({"POD_IP": "10.1.2.3", "ADVERTISE_ADDRESS": ""}, "10.1.2.3"),
])
def test_advertise_address_falls_back_to_pod_ip_then_loopback(environ, expected):
    """
    If ADVERTISE_ADDRESS is unset, then POD_IP is used, and without either 127.0.0.1; the discovery
    interface follows the advertise address.
    """
    settings = load(environ=environ)
    assert settings.advertise_address == expected
    assert settings.discovery_interface == expected


def test_explicit_discovery_interface_wins_over_the_advertise_address():
    """
    If DISCOVERY_INTERFACE is set, then multicast uses it rather than the advertise address.
    """
    settings = load(environ={"POD_IP": "10.1.2.3", "DISCOVERY_INTERFACE": "192.168.0.5"})
    assert (settings.advertise_address, settings.discovery_interface) == ("10.1.2.3", "192.168.0.5")


@pytest.mark.parametrize("text, expected", [
    ("1048576", 1048576),
    ("256Mi", 256 * 1024 ** 2),
    ("1Gi", 1024 ** 3),
    ("512Ki", 512 * 1024),
    ("2M", 2000000),
    ("300k", 300000),
    (" 64 Mi ", 64 * 1024 ** 2),
])
def test_sizes_are_parsed_with_binary_and_decimal_suffixes(text, expected):
    """
    If a size is written as a plain byte count or with a ``Ki``/``Mi``/``Gi`` (or ``k``/``M``/``G``)
    suffix, then it parses to that many bytes.
    """
    assert parse_size(text) == expected
    assert load(environ={"MAX_MEMORY": text}).max_memory == expected


@pytest.mark.parametrize("text", ["", "Mi", "1.5Gi", "-1", "1Ti", "1gi", "1 GiB", "256MB", "0x100", "1e6", "one"])
def test_bad_sizes_are_rejected(text):
    """
    If MAX_MEMORY is not a whole number with an optional known suffix, then loading fails naming the
    option and the value.
    """
    if text == "":
        message = error_of(given={"max-memory": text})
        assert message.startswith("--max-memory: invalid value ''")
    else:
        message = error_of(environ={"MAX_MEMORY": text})
        assert message.startswith("--max-memory (MAX_MEMORY): invalid value %r" % (text,))


def test_size_below_the_minimum_is_rejected():
    """
    If MAX_MEMORY is below 64 KiB, then loading fails and says the minimum.
    """
    assert "at least 65536 bytes" in error_of(environ={"MAX_MEMORY": "1Ki"})
    assert load(environ={"MAX_MEMORY": "64Ki"}).max_memory == 65536


def test_header_bytes_above_256_kib_are_rejected():
    """
    If MAX_HEADER_BYTES is over 256 KiB, then loading fails and says the maximum: one line is buffered and scanned
    again at each read, up to that size.
    """
    assert "at most 262144 bytes" in error_of(environ={"MAX_HEADER_BYTES": "257Ki"})
    assert load(environ={"MAX_HEADER_BYTES": "256Ki"}).max_header_bytes == 262144


@pytest.mark.parametrize("tenant", ["a", "t1", "my-tenant", "0abc9", "a" * 40])
def test_valid_tenants_are_accepted(tenant):
    """
    If the tenant is a DNS label of at most 40 characters, then it is accepted as is.
    """
    assert load(given={"tenant": tenant}).tenant == tenant


@pytest.mark.parametrize("tenant", ["", "a" * 41, "T1", "-a", "a-", "a_b", "a.b", "a b", "é", "t1\n"])
def test_invalid_tenants_are_rejected(tenant):
    """
    If the tenant is not a lowercase DNS label or is longer than 40 characters, then loading fails naming
    ``--tenant`` and the value.
    """
    message = error_of(given={"tenant": tenant})
    assert message.startswith("--tenant: invalid value %r: must be a DNS label" % (tenant,))


def test_missing_tenant_is_reported():
    """
    If no tenant is given anywhere, then loading fails naming ``--tenant`` and TENANT.
    """
    with pytest.raises(SettingsError) as raised:
        load_settings({}, {})
    assert str(raised.value).startswith("--tenant (TENANT) is required")


BAD_VALUES = [
    ("port", "PORT", "http"),
    ("port", "PORT", "70000"),
    ("advertise-address", "ADVERTISE_ADDRESS", "10.0.0.300"),
    ("advertise-address", "ADVERTISE_ADDRESS", "10.0.0.1\nINJECTED=1"),
    ("advertise-port", "ADVERTISE_PORT", "0"),
    ("node-id", "NODE_ID", "-pod"),
    ("node-id", "NODE_ID", "pod-1\n"),
    ("discovery-mode", "DISCOVERY_MODE", "gossip"),
    ("discovery-port", "DISCOVERY_PORT", "99999"),
    ("discovery-group", "DISCOVERY_GROUP", "10.0.0.1"),
    ("discovery-interface", "DISCOVERY_INTERFACE", "eth0"),
    ("discovery-ttl", "DISCOVERY_TTL", "0"),
    ("heartbeat-interval", "HEARTBEAT_INTERVAL", "0"),
    ("heartbeat-interval", "HEARTBEAT_INTERVAL", "nan"),
    ("peer-timeout", "PEER_TIMEOUT", "-1"),
    ("replicas", "REPLICATION_FACTOR", "0"),
    ("replicas", "REPLICATION_FACTOR", "two"),
    ("write-quorum", "WRITE_QUORUM", "17"),
    ("vnodes", "VNODES", "5000"),
    ("max-value-size", "MAX_VALUE_SIZE", "1Qi"),
    ("tombstone-grace", "TOMBSTONE_GRACE", "inf"),
    ("drain-timeout", "DRAIN_TIMEOUT", "soon"),
    ("serve-after-leaving", "SERVE_AFTER_LEAVING", "-1"),
    ("max-clock-offset", "MAX_CLOCK_OFFSET", "20.5"),
    ("otlp-endpoint", "JAEGER_ENDPOINT", "localhost:4318"),
    ("serve-after-leaving", "SERVE_AFTER_LEAVING", "nan"),
    ("max-connections", "MAX_CONNECTIONS", "0"),
    ("log-level", "LOG_LEVEL", "verbose"),
    ("log-level", "LOG_LEVEL", "warnings"),
    ("listen-address", "LISTEN_ADDRESS", "localhost"),
    ("insecure-admin", "INSECURE_ADMIN", "maybe"),
    ("insecure-cluster", "INSECURE_CLUSTER", "perhaps"),
]


@pytest.mark.parametrize("flag, variable, value", BAD_VALUES)
def test_bad_value_error_is_one_line_naming_the_option_and_the_value(flag, variable, value):
    """
    If any option has a bad value, from the command line or from the environment, then the error is one
    line that names the flag (and the variable it came from) and shows the value.
    """
    from_flag = error_of(given={flag: value})
    from_env = error_of(environ={variable: value})
    for message, source in ((from_flag, "--%s:" % flag), (from_env, "--%s (%s):" % (flag, variable))):
        assert "\n" not in message
        assert message.startswith(source + " invalid value %r" % (value,))


@pytest.mark.parametrize("flag, variable", [("cluster-secret", "CLUSTER_SECRET"), ("admin-token", "ADMIN_TOKEN")])
def test_bad_secret_is_not_shown_in_the_error(flag, variable):
    """
    If a secret is too short, then the error names the option but not the secret.
    """
    message = error_of(environ={variable: "short-secret"})
    assert message.startswith("--%s (%s): invalid value <redacted>" % (flag, variable))
    assert "short-secret" not in message
    # ... and says what a valid one is, and how to make one.
    assert "at least 16 characters" in message and "secrets.token_urlsafe" in message


@pytest.mark.parametrize("environ, clustering", [
    ({}, "disabled"),
    ({"INSECURE_CLUSTER": "true"}, "insecure"),
    ({"INSECURE_CLUSTER": "false"}, "disabled"),
    ({"CLUSTER_SECRET": "x" * 16}, "authenticated"),
    ({"CLUSTER_SECRET": "x" * 16, "INSECURE_CLUSTER": "true"}, "authenticated"),
    ({"CLUSTER_SECRET": "", "INSECURE_CLUSTER": "1"}, "insecure"),
])
def test_a_node_clusters_only_with_a_secret_or_when_told_to_be_insecure(environ, clustering):
    """
    If CLUSTER_SECRET is unset, then the node serves alone unless INSECURE_CLUSTER (--insecure-cluster) is set;
    with a secret, it clusters with the peers that hold it, and --insecure-cluster changes nothing.
    """
    assert load(environ=environ).clustering == clustering


def test_secrets_are_redacted():
    """
    If secrets are set, then ``redacted()`` and the repr only say so, and never show them.
    """
    settings = load(environ={"CLUSTER_SECRET": SECRET, "ADMIN_TOKEN": SECRET[::-1]})
    assert (settings.cluster_secret, settings.admin_token) == (SECRET, SECRET[::-1])
    shown = settings.redacted()
    assert (shown["cluster_secret"], shown["admin_token"]) == ("<set>", "<set>")
    for text in (repr(shown), repr(settings)):
        assert SECRET not in text and SECRET[::-1] not in text


def test_credentials_in_the_trace_endpoint_are_redacted_where_the_configuration_is_shown():
    """
    If JAEGER_ENDPOINT carries a user name and password (the OTLP exporter sends them as Basic credentials), then
    ``redacted()`` (``/diag``, which needs no token, and the ``service:started`` line) and the repr show the
    endpoint without them; the node still uses them. An endpoint without credentials is shown as it is.
    """
    settings = load(environ={"JAEGER_ENDPOINT": "https://tracer:s3cr3t-token@otel.example:4318/base"})
    assert settings.otlp_endpoint == "https://tracer:s3cr3t-token@otel.example:4318/base"
    assert settings.redacted()["otlp_endpoint"] == "https://<redacted>@otel.example:4318/base"
    for text in (repr(settings.redacted()), repr(settings)):
        assert "s3cr3t-token" not in text and "tracer" not in text
    plain = load(environ={"JAEGER_ENDPOINT": "http://otel.example:4318"})
    assert plain.redacted()["otlp_endpoint"] == "http://otel.example:4318"


def test_discovery_group_follows_the_contract_formula():
    """
    If the group is derived for tenant ``t1``, then it is 239.255.x.y with x = 1 + (adler32 >> 16) % 254 and
    y = 1 + (adler32 & 0xffff) % 254, as the chart computes it.
    """
    assert zlib.adler32(b"t1") == 18546854
    assert discovery_group_for("t1") == "239.255.%d.%d" % (1 + (18546854 >> 16) % 254,
                                                           1 + (18546854 & 0xFFFF) % 254)
    assert discovery_group_for("t1") == "239.255.30.167"


@given(st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?\Z"))
def test_discovery_group_is_always_in_the_admin_scoped_range(tenant):
    """
    If the group is derived for any tenant, then it lies in 239.255.0.0/16 with neither last octet 0 nor
    255, and loading the tenant's settings yields it.
    """
    group = discovery_group_for(tenant)
    address = ipaddress.IPv4Address(group)
    assert address in ipaddress.IPv4Network("239.255.0.0/16")
    assert all(1 <= int(octet) <= 254 for octet in group.split(".")[2:])
    assert load(given={"tenant": tenant}).discovery_group == group


def test_explicit_discovery_group_wins():
    """
    If DISCOVERY_GROUP is set to a multicast address, then it replaces the derived group.
    """
    assert load(environ={"DISCOVERY_GROUP": "239.1.2.3"}).discovery_group == "239.1.2.3"


def test_peer_timeout_defaults_to_three_heartbeats():
    """
    If PEER_TIMEOUT is unset, then it is three heartbeat intervals; if set, it is used.
    """
    assert load(environ={"HEARTBEAT_INTERVAL": "0.5"}).peer_timeout == 1.5
    assert load(environ={"HEARTBEAT_INTERVAL": "2", "PEER_TIMEOUT": "9"}).peer_timeout == 9.0


def test_a_peer_timeout_shorter_than_two_heartbeats_is_rejected():
    """
    If the peer timeout is shorter than two heartbeat intervals (one heartbeat lost on the way would make a peer
    dead, then joined again), then loading fails naming both; two intervals load.
    """
    for peer_timeout in ("5", "9.99"):
        message = error_of(environ={"HEARTBEAT_INTERVAL": "5", "PEER_TIMEOUT": peer_timeout})
        assert message.startswith("--peer-timeout (PEER_TIMEOUT): invalid value %r" % (float(peer_timeout),))
        assert "twice the heartbeat interval 5.0" in message
    assert load(environ={"HEARTBEAT_INTERVAL": "5", "PEER_TIMEOUT": "10"}).peer_timeout == 10.0


def test_a_tombstone_grace_not_longer_than_the_anti_entropy_interval_is_rejected():
    """
    If TOMBSTONE_GRACE is not longer than ANTI_ENTROPY_INTERVAL (a tombstone could be collected before any pass
    repairs a replica that missed its delete), then loading fails naming both; a longer grace is taken.
    """
    message = error_of(environ={"TOMBSTONE_GRACE": "30", "ANTI_ENTROPY_INTERVAL": "30"})
    assert message.startswith("--tombstone-grace (TOMBSTONE_GRACE): invalid value 30.0")
    assert "anti-entropy interval 30.0" in message
    assert error_of(environ={"ANTI_ENTROPY_INTERVAL": "900"}).startswith("--tombstone-grace")
    assert load(environ={"TOMBSTONE_GRACE": "31", "ANTI_ENTROPY_INTERVAL": "30"}).tombstone_grace == 31.0


def test_write_quorum_above_the_replication_factor_is_rejected():
    """
    If the write quorum exceeds the replication factor, then loading fails; equal is accepted.
    """
    message = error_of(environ={"REPLICATION_FACTOR": "2", "WRITE_QUORUM": "3", "CLUSTER_SECRET": SECRET})
    assert message.startswith("--write-quorum (WRITE_QUORUM): invalid value 3")
    assert "\n" not in message
    assert load(environ={"REPLICATION_FACTOR": "3", "WRITE_QUORUM": "3", "CLUSTER_SECRET": SECRET}).write_quorum == 3


def test_a_write_quorum_above_one_is_refused_on_a_node_that_serves_alone():
    """
    If WRITE_QUORUM is above 1 on a node without CLUSTER_SECRET and without --insecure-cluster (it serves alone,
    one copy), then loading fails, saying why (every write would answer 503); a quorum of 1 is accepted, and
    with either setting the quorum of 2 is.
    """
    message = error_of(environ={"WRITE_QUORUM": "2"})
    assert message.startswith("--write-quorum (WRITE_QUORUM): invalid value 2: a node without CLUSTER_SECRET")
    assert "every write would answer 503" in message
    assert load(environ={"WRITE_QUORUM": "1"}).write_quorum == 1
    assert load(environ={"WRITE_QUORUM": "2", "CLUSTER_SECRET": SECRET}).write_quorum == 2
    assert load(environ={"WRITE_QUORUM": "2", "INSECURE_CLUSTER": "true"}).write_quorum == 2


def test_the_body_buffer_holds_two_bulk_bodies_by_default_and_must_hold_one():
    """
    If MAX_BODY_BUFFER is unset, then it is the larger of 64 MiB and two /bulk bodies (8 × MAX_VALUE_SIZE each);
    set below one /bulk body (which could then never be read), loading fails naming both.
    """
    assert load(environ={"MAX_VALUE_SIZE": "8Mi"}).max_body_buffer == 128 * 1024 * 1024
    assert load(environ={"MAX_BODY_BUFFER": "8Mi"}).max_body_buffer == 8 * 1024 * 1024
    message = error_of(environ={"MAX_BODY_BUFFER": "7Mi"})
    assert message.startswith("--max-body-buffer (MAX_BODY_BUFFER): invalid value 7340032")
    assert "MAX_VALUE_SIZE" in message


def test_dns_discovery_without_a_name_is_rejected():
    """
    If the discovery mode is ``dns`` but DISCOVERY_DNS is unset, then loading fails naming DISCOVERY_DNS.
    """
    message = error_of(environ={"DISCOVERY_MODE": "dns"})
    assert message.startswith("--discovery-dns (DISCOVERY_DNS) is required")


@pytest.mark.parametrize("mode, name, multicast, dns", [
    ("both", None, True, False),
    ("both", "kv-headless", True, True),
    ("multicast", "kv-headless", True, False),
    ("dns", "kv-headless", False, True),
])
def test_discovery_mode_switches_multicast_and_dns_seeds(mode, name, multicast, dns):
    """
    If a discovery mode is chosen, then multicast is on for ``multicast``/``both`` and DNS seeds only for
    ``dns``/``both`` with a name.
    """
    environ = {"DISCOVERY_MODE": mode}
    if name:
        environ["DISCOVERY_DNS"] = name
    settings = load(environ=environ)
    assert (settings.multicast_enabled, settings.dns_enabled) == (multicast, dns)


@pytest.mark.parametrize("environ, expected", [
    ({}, "tcp:3000:interface=127.0.0.1"),
    ({"ADVERTISE_ADDRESS": "127.0.0.2"}, "tcp:3000:interface=127.0.0.1"),
    ({"POD_IP": "10.0.0.7"}, "tcp:3000:interface=0.0.0.0"),
    ({"POD_IP": "10.0.0.7", "PORT": "8080"}, "tcp:8080:interface=0.0.0.0"),
    ({"POD_IP": "10.0.0.7", "PORT": "tcp:8080:interface=10.0.0.7"}, "tcp:8080:interface=10.0.0.7"),
    # The image sets LISTEN_ADDRESS=0.0.0.0: `docker run -p 3000:3000 -e TENANT=demo` has no POD_IP.
    ({"LISTEN_ADDRESS": "0.0.0.0"}, "tcp:3000:interface=0.0.0.0"),
    ({"LISTEN_ADDRESS": "0.0.0.0", "POD_IP": "10.0.0.7"}, "tcp:3000:interface=0.0.0.0"),
    ({"LISTEN_ADDRESS": "127.0.0.1", "POD_IP": "10.0.0.7"}, "tcp:3000:interface=127.0.0.1"),
    ({"LISTEN_ADDRESS": "0.0.0.0", "PORT": "tcp:8080:interface=10.0.0.7"}, "tcp:8080:interface=10.0.0.7"),
])
def test_listen_endpoint_is_loopback_only_for_a_loopback_node(environ, expected):
    """
    If the port is a bare number, then the node listens on LISTEN_ADDRESS when it is set, else on loopback
    when it advertises loopback and on every interface otherwise; an endpoint string is used as given.
    """
    assert load(environ=environ).listen_endpoint == expected


def test_advertise_port_comes_from_a_tcp_endpoint_string():
    """
    If the port is a TCP endpoint string, then the advertised port is its port number.
    """
    assert load(environ={"PORT": "tcp:port=8081:interface=0.0.0.0"}).advertise_port == 8081
    assert load(environ={"PORT": "tcp:8082"}).advertise_port == 8082


def test_endpoint_without_a_port_number_needs_an_advertise_port():
    """
    If the port is an endpoint string without a TCP port (a UNIX socket), then ADVERTISE_PORT is required.
    """
    message = error_of(environ={"PORT": "unix:/tmp/kv.sock"})
    assert message.startswith("--advertise-port (ADVERTISE_PORT) is required when --port is 'unix:/tmp/kv.sock'")
    assert load(environ={"PORT": "unix:/tmp/kv.sock", "ADVERTISE_PORT": "3000"}).advertise_port == 3000


def test_a_retired_key_limit_variable_is_refused_naming_its_replacement():
    """
    If MAX_KEY_BYTES (a byte limit, replaced by the character limit MAX_KEY_LENGTH) is set, then loading
    fails naming both, instead of running with a limit the operator did not ask for.
    """
    message = error_of(environ={"MAX_KEY_BYTES": "1024"})
    assert "MAX_KEY_BYTES" in message and "MAX_KEY_LENGTH" in message
    assert load(environ={"MAX_KEY_LENGTH": "100"}).max_key_length == 100


def test_a_listen_address_changes_where_the_node_listens_but_not_what_it_advertises():
    """
    If LISTEN_ADDRESS opens the listener to every interface (a container run by hand), then peers are still
    told the advertise address, which POD_IP sets in Kubernetes.
    """
    alone = load(environ={"LISTEN_ADDRESS": "0.0.0.0"})
    assert (alone.advertise_address, alone.discovery_interface) == ("127.0.0.1", "127.0.0.1")
    pod = load(environ={"LISTEN_ADDRESS": "0.0.0.0", "POD_IP": "10.0.0.7"})
    assert (pod.advertise_address, pod.discovery_interface) == ("10.0.0.7", "10.0.0.7")


@pytest.mark.parametrize("given, expected", [
    ("warn", "warning"), ("WARN", "warning"), ("Warning", "warning"), ("DEBUG", "debug"), (" Info ", "info"),
    ("error", "error"),
])
def test_log_levels_are_taken_in_any_case_and_warn_is_warning(given, expected):
    """
    If LOG_LEVEL or --log-level names a level in any letter case, or ``warn`` (the seed's name), then the
    node runs at that level under its canonical name.
    """
    assert load(environ={"LOG_LEVEL": given}).log_level == expected
    assert load(given={"log-level": given}).log_level == expected


SECRET_FILES = [("cluster-secret", "CLUSTER_SECRET", "cluster_secret"),
                ("admin-token", "ADMIN_TOKEN", "admin_token")]


@pytest.mark.parametrize("flag, variable, attribute", SECRET_FILES)
@pytest.mark.parametrize("content", [SECRET, SECRET + "\n", SECRET + "\r\n"])
def test_a_secret_is_read_from_its_file_without_the_trailing_newline(tmp_path, flag, variable, attribute,
                                                                     content):
    """
    If CLUSTER_SECRET_FILE or ADMIN_TOKEN_FILE names a file (a mounted Secret), then the secret is its text
    without the line's end, and only the path is shown.
    """
    path = tmp_path / "secret"
    path.write_bytes(content.encode())
    for settings in (load(environ={variable + "_FILE": str(path)}), load(given={flag + "-file": str(path)})):
        assert getattr(settings, attribute) == SECRET
        shown = settings.redacted()
        assert shown[attribute] == "<set>" and shown[attribute + "_file"] == str(path)
        assert SECRET not in repr(shown) and SECRET not in repr(settings)


@pytest.mark.parametrize("flag, variable, attribute", SECRET_FILES)
def test_an_unreadable_secret_file_is_one_line_naming_the_option_and_the_path(tmp_path, flag, variable,
                                                                              attribute):
    """
    If the secret's file is missing, unreadable or not text, then loading fails with one line naming the
    option and the path.
    """
    missing = str(tmp_path / "missing")
    message = error_of(environ={variable + "_FILE": missing})
    assert message.startswith("--%s-file (%s_FILE): cannot read %r: " % (flag, variable, missing))
    assert "No such file" in message and "\n" not in message
    message = error_of(environ={variable + "_FILE": str(tmp_path)})
    assert message.startswith("--%s-file (%s_FILE): cannot read %r: " % (flag, variable, str(tmp_path)))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff" * 20)
    assert error_of(given={flag + "-file": str(binary)}) == "--%s-file: %r is not UTF-8 text" % (flag, str(binary))


@pytest.mark.parametrize("flag, variable, attribute", SECRET_FILES)
def test_a_short_secret_in_a_file_is_refused_without_being_shown(tmp_path, flag, variable, attribute):
    """
    If the file holds a secret under 16 characters (an empty file, say), then loading fails naming the option
    and the path, not the secret.
    """
    path = tmp_path / "short"
    path.write_text("short-secret\n")
    message = error_of(environ={variable + "_FILE": str(path)})
    assert message.startswith("--%s-file (%s_FILE): the secret in %r is invalid: must be at least 16"
                              % (flag, variable, str(path)))
    assert "short-secret" not in message


@pytest.mark.parametrize("flag, variable, attribute", SECRET_FILES)
def test_a_secret_and_its_file_together_are_refused(tmp_path, flag, variable, attribute):
    """
    If a secret is given both as a value and as a file, then loading fails naming both, rather than one of
    them silently winning.
    """
    path = tmp_path / "secret"
    path.write_text(SECRET)
    message = error_of(given={flag: SECRET}, environ={variable + "_FILE": str(path)})
    assert message == "--%s and --%s-file (%s_FILE) are both set: set only one" % (flag, flag, variable)
    message = error_of(environ={variable: SECRET, variable + "_FILE": str(path)})
    assert message == "--%s (%s) and --%s-file (%s_FILE) are both set: set only one" % (
        flag, variable, flag, variable)


def test_a_true_or_false_setting_is_a_flag_on_the_command_line_and_every_other_takes_a_value():
    """
    If a setting is true or false, then ``twistd kvresponder`` takes it as a flag with no value, and the
    command line's flag counts as true; every other setting takes a value.
    """
    from kvresponder.tap import Options

    assert {option.name for option in OPTIONS if option.is_flag} == {
        "replication-stream", "insecure-admin", "insecure-cluster"}
    options = Options()
    options.parseOptions(["--tenant", "t1", "--insecure-cluster", "--port", "3001"])
    given = options.given()
    assert (given["insecure-cluster"], given["insecure-admin"]) == ("true", None)
    assert (given["tenant"], given["port"]) == ("t1", "3001")
    for bad in (["--insecure-cluster=yes"], ["--tenant"]):
        with pytest.raises(SystemExit):
            Options().parseOptions(bad)


def test_a_node_may_be_told_to_stop_serving_as_soon_as_its_drain_ends():
    """
    If SERVE_AFTER_LEAVING is 0, then it is taken (a node behind no proxy need not wait), unlike the timeouts,
    which must be positive.
    """
    assert load(environ={"SERVE_AFTER_LEAVING": "0"}).serve_after_leaving == 0.0
    assert load(given={"serve-after-leaving": "7.5"}).serve_after_leaving == 7.5


def test_the_clock_bound_may_be_raised_to_20_s_and_no_further():
    """
    If MAX_CLOCK_OFFSET is 20 s, then it is taken; past that it is refused, with why: two nodes each within the
    bound may be twice it apart, and past 20 s they would refuse each other's heartbeats and signed calls.
    """
    assert load(environ={"MAX_CLOCK_OFFSET": "20"}).max_clock_offset == 20.0
    assert "heartbeats and calls" in error_of(environ={"MAX_CLOCK_OFFSET": "40"})


@pytest.mark.parametrize("environ", [
    {"DISCOVERY_DNS": "kv-headless", "CLUSTER_SECRET": "s" * 20},
    {"DISCOVERY_DNS": "kv-headless", "DISCOVERY_MODE": "dns", "INSECURE_CLUSTER": "true"},
    {"DISCOVERY_DNS": "kv-headless", "CLUSTER_SECRET": "s" * 20, "ADVERTISE_ADDRESS": "127.0.0.2"},
])
def test_a_clustering_node_with_dns_seeds_may_not_advertise_loopback(environ):
    """
    If a node clusters (a secret, or --insecure-cluster) with DNS seeds and advertises a loopback address (the
    default, in a container started without ADVERTISE_ADDRESS), then loading fails naming ADVERTISE_ADDRESS: its
    peers on other hosts took it in at 127.0.0.1 and sent its copies to themselves, each write acknowledged with one
    real copy. Without DNS seeds (the local cluster, multicast on loopback), or alone, loopback stays allowed.
    """
    assert error_of(environ=environ).startswith("--advertise-address (ADVERTISE_ADDRESS, or POD_IP) is 127.0.0.")
    assert load(environ={"CLUSTER_SECRET": "s" * 20}).advertise_address == "127.0.0.1"
    assert load(environ={"DISCOVERY_DNS": "kv-headless"}).advertise_address == "127.0.0.1"
    assert load(environ=dict(environ, ADVERTISE_ADDRESS="10.0.0.7")).advertise_address == "10.0.0.7"
