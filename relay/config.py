"""Settings: every configuration key, declared once with its type and default.

Input: a TOML file (conf/relay.toml).  Output: a frozen ``Settings`` tree.
An unknown key or a bad value raises ``ConfigError`` naming the key, e.g.
``[intake] max_recipients: expected an integer >= 1, got 'many'``.

Each key is a ``Key`` in the table of its section (Postfix mail_params.h:
one place declares every parameter).  ``reload=False`` marks the keys a
SIGHUP cannot change in a running relay: they need a restart.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import keyword
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from relay.errors import ConfigError

# -- value parsers ---------------------------------------------------------
# Each takes the raw TOML value and returns the typed value or raises
# ValueError with a message that completes "expected ...".


def _int(minimum: int = 0, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"an integer >= {minimum}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f" and <= {maximum}" if maximum is not None else ""
            raise ValueError(f"an integer >= {minimum}{bound}")
        return value

    return parse


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(repr(c) for c in choices))
        return value

    return parse


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``30``, ``"30s"``, ``"5m"``, ``"1h"``, ``"5d"`` or ``"250ms"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError('a duration such as "30s", "5m", "1h" or "5d"')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _share(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise ValueError("a number from 0 to 1")


def _durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('a non-empty list of durations such as ["1m", "5m"]')
    return tuple(parse_duration(item) for item in value)


# At most 20 digits: int() refuses a string of thousands of digits with its
# own message, which must not reach the operator as ours.
_SIZE = re.compile(r"^\s*(\d{1,20})\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: Any) -> int:
    """Bytes from ``26214400``, ``"25M"``, ``"25MiB"`` or ``"512k"`` (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError('a size in bytes such as 26214400 or "25M"')
    unit = (match.group(2) or "")[:1].lower()
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_hostport(value: Any) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` or ``"[::1]:2525"`` -> (host, port)."""
    if not isinstance(value, str):
        raise ValueError('"host:port"')
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        sep, port = rest[:1], rest[1:]
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:
            sep = ""
    # isdigit() alone takes "²", which int() refuses.
    if (
        sep != ":" or not host or not (port.isascii() and port.isdigit()) or len(port) > 5
        or not 0 < int(port) < 65536
    ):
        raise ValueError('"host:port" with a port from 1 to 65535 (IPv6 as "[::1]:25")')
    return host, int(port)


def _hostports(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise ValueError('a list of "host:port"')
    return tuple(parse_hostport(item) for item in value)


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('a list of networks such as ["127.0.0.0/8"]')
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in value)
    except (TypeError, ValueError):
        raise ValueError('a list of networks such as ["127.0.0.0/8"]') from None


def _ips(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('a list of IP addresses such as ["192.0.2.10"]')
    try:
        return tuple(str(ipaddress.ip_address(item)) for item in value)
    except (TypeError, ValueError):
        raise ValueError('a list of IP addresses such as ["192.0.2.10"]') from None


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a file or directory path")
    return value


def _optional_path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError('a file path, or "" for none')
    return value


_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _routing_domains(value: Any) -> frozenset[str]:
    """Domains as shard routing hashes them (intake.policy.routing_domain:
    lower-cased A-labels)."""
    import idna

    domains = set()
    for domain in _strs(value):
        name = domain.lower()
        try:
            name = name if name.isascii() else idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            name = ""
        if not _DOMAIN.fullmatch(name):
            raise ValueError(f"a list of domains ({domain!r} is not one)")
        domains.add(name)
    return frozenset(domains)


# Keys parsed by these hold paths: a relative one is taken from the
# directory of the config file (as nginx and Postfix do), not from
# wherever the relay or relayctl happens to be started.
PATH_PARSERS = (_path, _optional_path)


# -- the table of keys -----------------------------------------------------


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    doc: str
    reload: bool = True  # False: a running relay keeps the old value until restart


def _keys(*keys: Key) -> dict[str, Key]:
    return {key.name: key for key in keys}


RELAY_KEYS = _keys(
    Key("hostname", _str, "", "EHLO name and Received: by-name; empty = this host's FQDN"),
    Key("workers", _int(0, 256), 0, "worker processes; 0 = one per core", reload=False),
    Key("spool_dir", _path, "var/spool", "where each worker keeps its spool", reload=False),
    Key("run_dir", _path, "var/run", "sockets between workers and for relayctl", reload=False),
    Key("source_ips", _ips, (), "outbound bind addresses; empty = kernel's choice", reload=False),
    Key("log_level", _choice("debug", "info", "warning", "error"), "info", "log verbosity"),
    Key("shutdown_timeout", parse_duration, 30.0, "SIGTERM: how long sessions in flight may finish"),
    Key("listen_backlog", _int(1, 65535), 4096,
        "pending connections per listen socket (the kernel caps it at net.core.somaxconn)",
        reload=False),
    Key("spread_domains", _routing_domains, frozenset(),
        "recipient domains whose mail every worker stores and delivers (by address),"
        " their limits split between workers; any other domain has one owner worker"
        " (the same list on every host of a cluster)",
        reload=False),
)

# A message's class at its way in (relay/intake/lane.py); "" = not said here.
_lane = _choice("", "transactional", "bulk")

LISTEN_KEYS = _keys(
    Key("address", parse_hostport, None, '"host:port" to accept SMTP on', reload=False),
    Key("class", _lane, "", 'class of mail taken here, "transactional" or "bulk",'
        " unless its X-Relay-Class says otherwise; \"\" = decided by the user or campaign",
        reload=False),
)

TLS_KEYS = _keys(
    Key("cert_file", _path, None, "PEM certificate chain for inbound STARTTLS"),
    Key("key_file", _path, None, "PEM private key for inbound STARTTLS"),
)

USER_KEYS = _keys(
    Key("name", _str, None, "AUTH user name"),
    Key("password_hash", _str, None, "hash from `relayctl hash-password`"),
    Key("class", _lane, "", 'class of this user\'s mail unless its header or listener says;'
        ' "" = decided by the campaign'),
)

INTAKE_KEYS = _keys(
    Key(
        "mynetworks",
        _networks,
        _networks(["127.0.0.0/8", "::1/128"]),
        "clients that may relay without AUTH",
    ),
    Key("max_message_size", _int(1024), 26214400, "largest message accepted, in bytes"),
    Key("max_recipients", _int(1), 1000, "recipients per transaction; more get 452 4.5.3"),
    Key(
        "bare_line_endings",
        _choice("reject", "normalize"),
        "reject",
        "bare CR or LF in DATA: reject with 550 5.5.2, or rewrite as CRLF",
    ),
    Key("idle_timeout", parse_duration, 300.0, "close a session silent this long"),
    Key("min_data_rate", _int(0), 1024, "bytes/s a client must keep up in DATA; 0 = no floor"),
    Key("data_rate_grace", parse_duration, 30.0, "DATA time before min_data_rate applies"),
    Key("max_connections_per_ip", _int(1), 100, "concurrent sessions per client IP, per worker"),
    Key("max_auth_failures", _int(1), 5, "failed AUTH per client IP before it is locked out"),
    Key("auth_lockout", parse_duration, 600.0, "how long a locked-out IP stays locked out"),
    Key("max_received_headers", _int(1), 50, "more Received: headers than this is a loop (554 5.4.6)"),
    Key("min_free_space", parse_size, 100 * 1024**2, "free spool disk below this: 452 4.3.1 at MAIL"),
    Key("max_data_memory", parse_size, 256 * 1024**2,
        "message bytes held in DATA across a worker's sessions; past it DATA gets 451 4.3.1"),
)

HTTP_KEYS = _keys(
    Key("address", parse_hostport, None,
        '"host:port" for the HTTP inject API; no [http] table = no HTTP', reload=False),
    Key("cert_file", _str, "", "PEM certificate chain: serve HTTPS; empty = plain HTTP"),
    Key("key_file", _str, "", "PEM private key for cert_file"),
    Key("max_body_size", parse_size, 64 * 1024**2,
        "largest request body, in bytes; larger gets 413 (JSON and base64 cost ~1.4 x the message)"),
)

TOKEN_SCOPES = ("inject", "admin", "read")


def _scopes(value: Any) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, str) and v in TOKEN_SCOPES for v in value)):
        raise ValueError("a non-empty list of " + ", ".join(repr(s) for s in TOKEN_SCOPES))
    return tuple(value)


def _token_hash(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"sha256\$[0-9a-f]{64}", value):
        raise ValueError("a hash from `relayctl token create` (sha256$ and 64 hex digits)")
    return value


TOKEN_KEYS = _keys(
    Key("name", _str, None, "who the token is for (logged)"),
    Key("token_hash", _token_hash, None, "hash from `relayctl token create`"),
    Key("scopes", _scopes, None, "what the token may do: inject, admin, read"),
)

DNS_KEYS = _keys(
    Key("nameservers", _hostports, (), '["127.0.0.1:5353"]; empty = system resolver'),
)

DELIVER_KEYS = _keys(
    Key("mx_port", _int(1, 65535), 25, "TCP port of MX hosts (test farms change it)"),
    Key(
        "retry_schedule",
        _durations,
        _durations(["1m", "5m", "10m", "20m", "30m", "40m", "50m", "1h", "6h"]),
        "delays between attempts; the last repeats",
    ),
    Key("max_lifetime", parse_duration, 5 * 86400.0, "give up and bounce after this long"),
    Key(
        "tls",
        _choice("none", "opportunistic", "required", "verify"),
        "opportunistic",
        "outbound STARTTLS policy ([tls_policy] overrides it per domain)",
    ),
    Key("ca_file", _optional_path, "", "CA bundle for tls = verify; empty = the system's"),
    Key("max_connections_per_destination", _int(1), 20, "open connections per destination, per worker"),
    Key("max_messages_per_connection", _int(1), 100, "transactions before a connection is closed"),
    Key("spawn_after", parse_duration, 0.25,
        "a job waiting this long behind busy connections opens another one"),
    Key("connection_idle_timeout", parse_duration, 10.0, "close a pooled connection idle this long"),
    Key("connect_timeout", parse_duration, 30.0, "TCP connect to an MX host"),
    Key("command_timeout", parse_duration, 300.0, "each reply (RFC 5321 4.5.3.2: 5 minutes)"),
    Key("data_timeout", parse_duration, 600.0, "the reply after the final dot (10 minutes)"),
    Key("exclude_domains", lambda v: tuple(d.lower() for d in _strs(v)), (),
        "recipient domains never sent to: dropped with an event"),
    Key("event_log_dir", _path, "var/log", "where each worker appends its delivery-N.jsonl"),
    Key("event_retention", parse_duration, 7 * 86400.0, "delivery events kept in the spool"),
    Key("keep_bounced", parse_duration, 3 * 86400.0, "bounced mail kept for `relayctl requeue`"),
    Key("max_loaded", _int(1), 20000, "recipients held in memory for delivery, per worker"),
    Key("bulk_loaded_share", _share, 0.8,
        "share of max_loaded bulk mail may take; the rest is kept for transactional mail"),
    Key("max_sessions", _int(1), 1000, "outbound sessions open at once, per worker, whatever the sites allow"),
    Key("max_bytes_in_flight", parse_size, 256 * 1024**2,
        "message bytes of outbound transactions in flight, per worker (one always goes)"),
    Key("quarantine_after", _int(1), 3,
        "deliveries of a message that crashed the worker before it is quarantined"),
)

STATS_KEYS = _keys(
    Key("metrics_address", _str, "", '"127.0.0.1:9425" to serve /metrics; empty = off', reload=False),
)

CLUSTER_KEYS = _keys(
    Key("hosts", _int(1, 64), 1, "relay hosts sharing the slots (1 = no cluster)", reload=False),
    Key("index", _int(0, 63), 0, "this host, 0-based: it owns the slots s with s % hosts == index",
        reload=False),
    Key("amqp_url", _str, "", "broker of the shard queues relay.shard.<index> (amqp:// or amqps://)",
        reload=False),
    Key("queue_prefix", _str, "relay.shard", "shard queues are <queue_prefix>.<index>", reload=False),
    Key("queue_type", _choice("classic", "quorum"), "quorum", "x-queue-type of the shard queues",
        reload=False),
    Key("prefetch", _int(1, 65535), 64, "unacked shard messages this host takes at once",
        reload=False),
)

UNLIMITED = ""  # a rate key's default: no limit

_RATE = re.compile(r"^\s*([0-9][0-9_,]*)\s*/\s*(s|sec|second|m|min|minute|h|hr|hour|d|day)\s*$")
_RATE_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
                 "h": 3600, "hr": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_rate(value: Any) -> tuple[int, float] | None:
    """``(count, period seconds)`` from ``"20/s"``, ``"100/min"``, ``"1,000/h"``;
    ``""`` means unlimited (None)."""
    if value == "":
        return None
    match = _RATE.match(value) if isinstance(value, str) else None
    count = int(match.group(1).replace(",", "").replace("_", "")) if match else 0
    if not match or count < 1:
        raise ValueError('a rate such as "20/s", "100/min" or "1000/h", or "" for no limit')
    return count, float(_RATE_PERIODS[match.group(2)])


def _trigger(value: Any) -> tuple[int, float] | None:
    if value == "immediate":
        return None
    count, _, window = value.partition("/") if isinstance(value, str) else ("", "", "")
    try:
        if not count.strip().isdigit() or int(count) < 1:
            raise ValueError
        return int(count), parse_duration(window)
    except ValueError:
        raise ValueError('"immediate" or "N/window" such as "3/10m"') from None


def _regex(value: Any) -> re.Pattern:
    if not isinstance(value, str) or not value:
        raise ValueError("a regular expression")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"a valid regular expression ({exc})") from None


# Per site (the MX set of a domain); see relay/deliver/shaping.py.
SHAPING_KEYS = _keys(
    Key("connection_limit", _int(1), 20, "concurrent connections to the site, whole relay"),
    Key("max_message_rate", parse_rate, UNLIMITED, '"N/s", "N/min", "N/h"; "" = unlimited'),
    Key("max_connection_rate", parse_rate, UNLIMITED, 'new connections per period; "" = unlimited'),
    Key("max_deliveries_per_connection", _int(1), 100, "transactions before a connection is closed"),
    Key("consecutive_connection_failures", _int(1), 10,
        "failed connections in a row that suspend the site (for 1 min, doubling up to 1 h)"),
    Key("transactional_share", _share, 0.2,
        "share of the site's connections kept for transactional mail (at least one when above 0);"
        " bulk uses them while no transactional mail waits or is in flight"),
    Key("chunking", _bool, False,
        "send with BDAT (RFC 3030), envelope and body in one write, where the site offers"
        " CHUNKING and PIPELINING (opt in: the body goes before the envelope's replies)"),
)

RULE_KEYS = _keys(
    Key("regex", _regex, None, "matched against the reply line (code, enhanced code, text)"),
    Key("action", _choice("throttle", "suspend", "bounce"), None, "what the rule does to the site"),
    Key("duration", parse_duration, None, "how long the effect lasts"),
    Key("trigger", _trigger, "immediate", '"immediate" or "N/window": fire after N matches'),
)

DKIM_KEYS = _keys(
    Key("domain", _str, None, "d= of the signature"),
    Key("selector", _str, None, "s= of the signature"),
    Key("key_file", _path, None, "PEM private key"),
    Key("algorithm", _choice("rsa-sha256", "ed25519-sha256"), "rsa-sha256", "signing algorithm"),
    Key(
        "canonicalization",
        _choice("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"),
        "relaxed/relaxed",
        "c= header/body canonicalization",
    ),
    Key("headers", lambda v: _strs(v), (), "header fields to sign; empty = the default list"),
    Key("default", _bool, False, "sign with this identity when no domain matches"),
)


AMQP_CONSUMER_KEYS = _keys(
    Key("queue", _str, None, "queue to consume (PostmanQ's queue name)"),
    Key("url", _str, "amqp://guest:guest@127.0.0.1:5672/", "broker: amqp:// or amqps:// URL"),
    Key("exchange", _str, "", "exchange bound to the queue; empty = the queue's name"),
    Key("exchange_type", _choice("fanout", "direct", "topic"), "fanout",
        "type of the exchanges declared (PostmanQ: fanout)"),
    Key("routing_key", _str, "", "binding key of the queue"),
    Key("prefetch", _int(1, 65535), 64, "unacked messages per worker (basic.qos)"),
    Key("declare", _bool, True,
        "declare the PostmanQ topology (queue, failure.* and not.send); false = use what exists"),
    Key("queue_type", _choice("classic", "quorum"), "classic", "x-queue-type of declared queues"),
    Key("format", _choice("postmanq", "relay"), "postmanq",
        "postmanq: {envelope, recipient, body}; relay: {sender, recipients, body|body_base64}"),
    Key("class", _lane, "", 'class of this consumer\'s mail unless the message says;'
        ' "" = decided by the campaign'),
)

AMQP_EVENTS_KEYS = _keys(
    Key("url", _str, "", "broker for the events feed (amqp:// or amqps://); empty = no events feed"),
    Key("exchange", _str, "relay.events",
        "topic exchange (declared durable) for one record per event, routing key <outcome>.<class>"),
)

WEBHOOK_KEYS = _keys(
    Key("url", _str, None, "http:// or https:// endpoint that gets a JSON array of records per POST"),
    Key("events", lambda v: _strs(v), (),
        "record types to send (Delivery, Bounce, TransientFailure, Expiration, AdminBounce);"
        " empty = all"),
    Key("batch_size", _int(1, 10000), 100, "records per POST at most"),
    Key("batch_wait", parse_duration, 1.0, "how long a partial batch may wait for more records"),
    Key("secret", _str, "", "HMAC-SHA256 key: X-Relay-Signature: sha256=<hex of the body>;"
        " empty = unsigned"),
    Key("timeout", parse_duration, 10.0, "each POST; a timeout is retried"),
)
WEBHOOK_TYPES = ("Delivery", "Bounce", "TransientFailure", "Expiration", "AdminBounce")


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of strings")
    return tuple(value)


# -- the settings tree -----------------------------------------------------


def _field(name: str) -> str:
    """The attribute of a key: ``class`` is a Python keyword, so ``class_``."""
    return name + "_" if keyword.iskeyword(name) else name


def _section_class(name: str, keys: dict[str, Key], *extra) -> type:
    """A frozen dataclass with one field per declared key (declared once, above)."""
    fields = [
        (_field(name), Any) if key.default is None
        else (_field(name), Any, dataclasses.field(default=key.default))
        for name, key in keys.items()
    ]
    return dataclasses.make_dataclass(name, fields + list(extra), frozen=True)


RelaySettings = _section_class("RelaySettings", RELAY_KEYS)
Listen = _section_class("Listen", LISTEN_KEYS)
TlsSettings = _section_class("TlsSettings", TLS_KEYS)
User = _section_class("User", USER_KEYS)
IntakeSettings = _section_class(
    "IntakeSettings", INTAKE_KEYS, ("users", tuple, dataclasses.field(default=()))
)
HttpSettings = _section_class(
    "HttpSettings", HTTP_KEYS, ("tokens", tuple, dataclasses.field(default=()))
)
Token = _section_class("Token", TOKEN_KEYS)
DnsSettings = _section_class("DnsSettings", DNS_KEYS)
DeliverSettings = _section_class("DeliverSettings", DELIVER_KEYS)
StatsSettings = _section_class("StatsSettings", STATS_KEYS)
ClusterSettings = _section_class("ClusterSettings", CLUSTER_KEYS)


DkimIdentity = _section_class("DkimIdentity", DKIM_KEYS)
AmqpConsumer = _section_class("AmqpConsumer", AMQP_CONSUMER_KEYS)
AmqpEvents = _section_class("AmqpEvents", AMQP_EVENTS_KEYS)
Webhook = _section_class("Webhook", WEBHOOK_KEYS)


@dataclass(frozen=True)
class AmqpSettings:
    consumers: tuple = ()  # of AmqpConsumer ([[amqp.consumer]])
    events: Any = field(default_factory=AmqpEvents)  # [amqp.events]


@dataclass(frozen=True)
class ShapingRule:
    regex: Any  # re.Pattern
    action: str  # throttle | suspend | bounce
    duration: float
    trigger: tuple[int, float] | None  # None = immediate
    overrides: dict  # shaping keys a throttle sets


@dataclass(frozen=True)
class ShapingSettings:
    """``[shaping]``: ``default`` (every key), ``domains`` and ``mx_suffixes``
    (only the keys their tables set), ``rules``."""

    default: dict = field(default_factory=lambda: _shaping_default({}))
    domains: dict = field(default_factory=dict)  # domain -> {key: value}
    mx_suffixes: tuple = ()  # ((".google.com", {key: value}), ...)
    rules: tuple = ()  # of ShapingRule


def _unlimited(values: dict) -> dict:
    return {k: (None if v == UNLIMITED else v) for k, v in values.items()}


def _shaping_default(raw: Any) -> dict:
    return _unlimited(_section("[shaping.default]", raw, SHAPING_KEYS, None))


def _shaping_overrides(label: str, raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a table")
    values = {}
    for name, value in raw.items():
        key = SHAPING_KEYS.get(name)
        if key is None:
            raise ConfigError(f"{label} {name}: unknown key")
        try:
            values[name] = key.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{label} {name}: expected {exc}, got {value!r}") from None
    return values


def _shaping(raw: Any, deliver_raw: dict) -> ShapingSettings:
    if not isinstance(raw, dict):
        raise ConfigError("[shaping]: expected a table")
    default_raw = dict(raw.get("default", {})) if isinstance(raw.get("default", {}), dict) else None
    if default_raw is None:
        raise ConfigError("[shaping.default]: expected a table")
    # The [deliver] keys they replace still work, as defaults of [shaping.default].
    for old, new in DEPRECATED_DELIVER_KEYS.items():
        if old in deliver_raw and new not in default_raw:
            default_raw[new] = deliver_raw[old]
    default = _shaping_default(default_raw)
    domains, suffixes = {}, []
    for name, table in raw.items():
        if name in ("default", "rules"):
            continue
        if name.startswith("mx:"):
            suffix = name[3:].lower()
            if not suffix.strip("."):
                raise ConfigError(f'[shaping."{name}"]: expected an MX host suffix such as "mx:.google.com"')
            suffixes.append((suffix, _shaping_overrides(f'[shaping."{name}"]', table)))
        else:
            domains[name.lower()] = _shaping_overrides(f'[shaping."{name}"]', table)
    rules = []
    for item in _array("[[shaping.rules]]", raw.get("rules", [])):
        if not isinstance(item, dict):
            raise ConfigError("[[shaping.rules]]: expected a table")
        own = {k: v for k, v in item.items() if k in RULE_KEYS}
        rest = {k: v for k, v in item.items() if k not in RULE_KEYS}
        values = _section("[[shaping.rules]]", own, RULE_KEYS, None)
        overrides = _shaping_overrides("[[shaping.rules]]", rest)
        if values["action"] == "throttle" and not overrides:
            raise ConfigError("[[shaping.rules]]: a throttle rule needs at least one shaping key"
                              " (connection_limit, max_message_rate, ...)")
        trigger = None if values["trigger"] == "immediate" else values["trigger"]
        rules.append(ShapingRule(values["regex"], values["action"], values["duration"],
                                 trigger, overrides))
    return ShapingSettings(default, domains, tuple(suffixes), tuple(rules))


@dataclass(frozen=True)
class Settings:
    relay: Any  # RelaySettings
    listen: tuple  # of Listen
    tls: Any  # TlsSettings or None
    intake: Any  # IntakeSettings
    dns: Any  # DnsSettings
    deliver: Any  # DeliverSettings
    stats: Any  # StatsSettings
    cluster: Any = field(default_factory=ClusterSettings)  # [cluster]
    routes: dict = field(default_factory=dict)  # domain -> (host, port)
    tls_policy: dict = field(default_factory=dict)  # domain -> none|opportunistic|required|verify
    dkim: tuple = ()  # of DkimIdentity
    shaping: ShapingSettings = field(default_factory=ShapingSettings)
    http: Any = None  # HttpSettings, or None: no HTTP server
    amqp: AmqpSettings = field(default_factory=AmqpSettings)
    webhooks: tuple = ()  # of Webhook ([[webhook]])
    source: str = ""  # the file these came from, for messages

    @property
    def worker_count(self) -> int:
        return self.relay.workers or (os.cpu_count() or 1)

    @property
    def hostname(self) -> str:
        return self.relay.hostname or socket.getfqdn()


# -- loading ---------------------------------------------------------------


def _section(label: str, raw: Any, keys: dict[str, Key], base_dir: str | None,
             required=()) -> dict[str, Any]:
    """Parse one table against its key declarations; relative paths are
    joined to ``base_dir`` (when given)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected a table")
    for name in raw:
        if name not in keys:
            raise ConfigError(f"{label} {name}: unknown key")
    values = {}
    for name, key in keys.items():
        if name in raw:
            try:
                values[_field(name)] = key.parse(raw[name])
            except ValueError as exc:
                raise ConfigError(f"{label} {name}: expected {exc}, got {raw[name]!r}") from None
        elif key.default is None or name in required:
            raise ConfigError(f"{label} {name}: required key is missing")
        else:
            values[_field(name)] = key.default
        if base_dir and key.parse in PATH_PARSERS and values[_field(name)]:
            values[_field(name)] = os.path.normpath(os.path.join(base_dir, values[_field(name)]))
    return values


def _array(label: str, raw: Any) -> list:
    if not isinstance(raw, list):
        raise ConfigError(f"{label}: expected an array of tables ([[{label.strip('[]')}]])")
    return raw


TOP_LEVEL = (
    "relay", "listen", "tls", "intake", "dns", "deliver", "routes", "tls_policy", "stats", "dkim",
    "shaping",
    "http",
    "amqp", "webhook", "cluster",
)
# Old [deliver] keys that are now defaults of [shaping.default].
DEPRECATED_DELIVER_KEYS = {
    "max_connections_per_destination": "connection_limit",
    "max_messages_per_connection": "max_deliveries_per_connection",
}
TLS_MODES = ("none", "opportunistic", "required", "verify")


def from_dict(raw: dict, source: str = "", base_dir: str | None = None) -> Settings:
    """Validate a parsed TOML document and build the settings tree; relative
    paths are taken from ``base_dir`` (None: left as they are)."""
    for name in raw:
        if name not in TOP_LEVEL:
            raise ConfigError(f"[{name}]: unknown table")
    relay = RelaySettings(**_section("[relay]", raw.get("relay", {}), RELAY_KEYS, base_dir))
    listen = tuple(
        Listen(**_section("[[listen]]", item, LISTEN_KEYS, base_dir))
        for item in _array("[[listen]]", raw.get("listen", [{"address": "127.0.0.1:2525"}]))
    )
    if not listen:
        raise ConfigError("[[listen]]: at least one listen address is required")
    tls = None
    if "tls" in raw:
        tls = TlsSettings(**_section("[tls]", raw["tls"], TLS_KEYS, base_dir))
    intake_raw = raw.get("intake", {})
    if not isinstance(intake_raw, dict):
        raise ConfigError("[intake]: expected a table")
    intake_raw = dict(intake_raw)
    users_raw = intake_raw.pop("users", [])
    intake = IntakeSettings(
        **_section("[intake]", intake_raw, INTAKE_KEYS, base_dir),
        users=tuple(
            User(**_section("[[intake.users]]", item, USER_KEYS, base_dir))
            for item in _array("[[intake.users]]", users_raw)
        ),
    )
    for user in intake.users:
        if not user.password_hash.startswith("scrypt$"):
            raise ConfigError(
                f"[[intake.users]] password_hash: expected a hash from `relayctl hash-password`"
                f" for user {user.name!r}"
            )
    dns = DnsSettings(**_section("[dns]", raw.get("dns", {}), DNS_KEYS, base_dir))
    deliver = DeliverSettings(**_section("[deliver]", raw.get("deliver", {}), DELIVER_KEYS, base_dir))
    stats = StatsSettings(**_section("[stats]", raw.get("stats", {}), STATS_KEYS, base_dir))
    if stats.metrics_address:
        try:
            parse_hostport(stats.metrics_address)
        except ValueError as exc:
            raise ConfigError(f"[stats] metrics_address: expected {exc}") from None
    routes_raw = raw.get("routes", {})
    if not isinstance(routes_raw, dict):
        raise ConfigError("[routes]: expected a table")
    routes = {}
    for domain, target in routes_raw.items():
        try:
            routes[domain.lower()] = parse_hostport(target)
        except ValueError as exc:
            raise ConfigError(f"[routes] {domain}: expected {exc}, got {target!r}") from None
    tls_policy_raw = raw.get("tls_policy", {})
    if not isinstance(tls_policy_raw, dict):
        raise ConfigError("[tls_policy]: expected a table")
    tls_policy = {}
    for domain, mode in tls_policy_raw.items():
        if mode not in TLS_MODES:
            raise ConfigError(
                f"[tls_policy] {domain}: expected one of {', '.join(TLS_MODES)}, got {mode!r}"
            )
        tls_policy[domain.lower()] = mode
    dkim = tuple(
        DkimIdentity(**_section("[[dkim]]", item, DKIM_KEYS, base_dir))
        for item in _array("[[dkim]]", raw.get("dkim", []))
    )
    deliver_raw = raw.get("deliver", {})
    shaping = _shaping(raw.get("shaping", {}), deliver_raw if isinstance(deliver_raw, dict) else {})
    http = None
    if "http" in raw:
        http_raw = raw["http"]
        if not isinstance(http_raw, dict):
            raise ConfigError("[http]: expected a table")
        http_raw = dict(http_raw)
        tokens_raw = http_raw.pop("tokens", [])
        http = HttpSettings(
            **_section("[http]", http_raw, HTTP_KEYS, base_dir),
            tokens=tuple(
                Token(**_section("[[http.tokens]]", item, TOKEN_KEYS, base_dir))
                for item in _array("[[http.tokens]]", tokens_raw)
            ),
        )
        if bool(http.cert_file) != bool(http.key_file):
            raise ConfigError("[http] cert_file, key_file: give both for HTTPS, or neither")
        names = [token.name for token in http.tokens]
        if len(set(names)) != len(names):
            raise ConfigError("[[http.tokens]] name: every token needs a name of its own")
    amqp = _amqp(raw.get("amqp", {}))
    cluster = ClusterSettings(**_section("[cluster]", raw.get("cluster", {}), CLUSTER_KEYS, None))
    if cluster.index >= cluster.hosts:
        raise ConfigError(f"[cluster] index: expected 0 to {cluster.hosts - 1} (hosts = {cluster.hosts}),"
                          f" got {cluster.index}")
    if cluster.hosts > 1 and not cluster.amqp_url.startswith(("amqp://", "amqps://")):
        raise ConfigError("[cluster] amqp_url: a cluster (hosts > 1) needs an amqp:// or amqps:// URL,"
                          f" got {cluster.amqp_url!r}")
    webhooks = tuple(
        Webhook(**_section("[[webhook]]", item, WEBHOOK_KEYS, base_dir))
        for item in _array("[[webhook]]", raw.get("webhook", []))
    )
    for hook in webhooks:
        if not hook.url.startswith(("http://", "https://")):
            raise ConfigError(f"[[webhook]] url: expected an http:// or https:// URL, got {hook.url!r}")
        for kind in hook.events:
            if kind not in WEBHOOK_TYPES:
                raise ConfigError(f"[[webhook]] events: expected types among "
                                  f"{', '.join(WEBHOOK_TYPES)}, got {kind!r}")
    if len({hook.url for hook in webhooks}) != len(webhooks):
        raise ConfigError("[[webhook]] url: the same url twice")
    return Settings(
        cluster=cluster,
        amqp=amqp,
        webhooks=webhooks,
        relay=relay,
        listen=listen,
        tls=tls,
        intake=intake,
        dns=dns,
        deliver=deliver,
        stats=stats,
        routes=routes,
        tls_policy=tls_policy,
        dkim=dkim,
        shaping=shaping,
        http=http,
        source=source,
    )


def _amqp(raw: Any) -> AmqpSettings:
    if not isinstance(raw, dict):
        raise ConfigError("[amqp]: expected a table")
    for name in raw:
        if name not in ("consumer", "events"):
            raise ConfigError(f"[amqp] {name}: unknown key")
    consumers = tuple(
        AmqpConsumer(**_section("[[amqp.consumer]]", item, AMQP_CONSUMER_KEYS, None))
        for item in _array("[[amqp.consumer]]", raw.get("consumer", []))
    )
    seen = set()
    for consumer in consumers:
        if not consumer.queue:
            raise ConfigError("[[amqp.consumer]] queue: expected a queue name, got ''")
        if not consumer.url.startswith(("amqp://", "amqps://")):
            raise ConfigError(
                f"[[amqp.consumer]] url: expected an amqp:// or amqps:// URL, got {consumer.url!r}")
        if (consumer.url, consumer.queue) in seen:
            raise ConfigError(f"[[amqp.consumer]] queue: {consumer.queue!r} is consumed twice")
        seen.add((consumer.url, consumer.queue))
    events = AmqpEvents(**_section("[amqp.events]", raw.get("events", {}), AMQP_EVENTS_KEYS, None))
    if events.url and not events.url.startswith(("amqp://", "amqps://")):
        raise ConfigError(f"[amqp.events] url: expected an amqp:// or amqps:// URL, got {events.url!r}")
    if not events.exchange:
        raise ConfigError("[amqp.events] exchange: expected an exchange name, got ''")
    return AmqpSettings(consumers=consumers, events=events)


def load(path: str) -> Settings:
    """Read and validate a TOML configuration file."""
    try:
        with open(path, "rb") as file:
            raw = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(raw, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def defaults() -> Settings:
    return from_dict({})


SECTIONS = {
    "relay": RELAY_KEYS,
    "intake": INTAKE_KEYS,
    "dns": DNS_KEYS,
    "deliver": DELIVER_KEYS,
    "stats": STATS_KEYS,
    "cluster": CLUSTER_KEYS,
}


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The changed keys that a reload cannot apply (they need a restart)."""
    changed = []
    for section, keys in SECTIONS.items():
        for name, key in keys.items():
            if not key.reload and getattr(getattr(old, section), name) != getattr(
                getattr(new, section), name
            ):
                changed.append(f"[{section}] {name}")
    if old.listen != new.listen:
        changed.append("[[listen]] address")
    if http_address(old) != http_address(new):
        changed.append("[http] address")
    return changed


def http_address(settings: Settings) -> tuple[str, int] | None:
    return settings.http.address if settings.http is not None else None


def pin_restart_keys(new: Settings, running: Settings) -> Settings:
    """``new`` with every restart-only key set back to its running value: what
    a reload applies, and what a worker forked after the reload must get so
    that it never disagrees with the workers already running."""
    sections = {}
    for section, keys in SECTIONS.items():
        pinned = {name: getattr(getattr(running, section), name)
                  for name, key in keys.items() if not key.reload}
        sections[section] = dataclasses.replace(getattr(new, section), **pinned)
    # The HTTP socket is opened at start: a reload keeps its address (and
    # whether there is one); tokens, TLS files and the body limit reload.
    http = new.http
    if http_address(new) != http_address(running):
        http = (None if running.http is None else running.http if new.http is None
                else dataclasses.replace(new.http, address=running.http.address))
    return dataclasses.replace(new, listen=running.listen, http=http, **sections)


# -- back to the file's form ------------------------------------------------
# The inverse of the parsers: each value as it would be written in the file
# (durations "5m", sizes "25M", addresses "host:port"), so that what
# `relayctl config` prints can be pasted back and loads to equal settings.


def format_duration(seconds: float) -> str | float:
    for unit in ("d", "h", "m", "s"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    millis = round(seconds * 1000)
    if seconds and parse_duration(f"{millis}ms") == seconds:
        return f"{millis}ms"
    return seconds  # no unit writes it exactly: plain seconds do


def format_size(size: int) -> str | int:
    for unit in ("g", "m", "k"):
        if size >= _SIZE_UNITS[unit] and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit.upper() if unit != 'k' else unit}"
    return size


def format_hostport(hostport: tuple[str, int]) -> str:
    host, port = hostport
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_rate(rate: tuple[int, float] | None) -> str:
    if rate is None:
        return UNLIMITED
    count, period = rate
    unit = {1.0: "s", 60.0: "min", 3600.0: "h", 86400.0: "d"}[period]
    return f"{count}/{unit}"


def _format_trigger(trigger) -> str:
    if trigger is None or trigger == "immediate":
        return "immediate"
    count, window = trigger
    return f"{count}/{format_duration(window)}"


_FORMATS: dict[Callable, Callable[[Any], Any]] = {
    parse_rate: format_rate,
    _trigger: _format_trigger,
    _regex: lambda pattern: pattern.pattern,
    parse_duration: format_duration,
    _durations: lambda value: [format_duration(v) for v in value],
    parse_size: format_size,
    parse_hostport: format_hostport,
    _hostports: lambda value: [format_hostport(v) for v in value],
    _networks: lambda value: [str(v) for v in value],
    _routing_domains: sorted,
}


def file_value(key: Key, value: Any) -> Any:
    """A parsed value as it is written in the file."""
    value = _FORMATS[key.parse](value) if key.parse in _FORMATS else value
    return list(value) if isinstance(value, tuple) else value


def _table(record: Any, keys: dict[str, Key]) -> dict[str, Any]:
    return {name: file_value(key, getattr(record, _field(name))) for name, key in keys.items()}


def to_document(settings: Settings) -> dict[str, Any]:
    """Every setting as a TOML document (a dict for a TOML writer), tables
    in the order of TOP_LEVEL; an absent ``[tls]`` and empty arrays of
    tables are left out (TOML has no null)."""
    doc: dict[str, Any] = {"relay": _table(settings.relay, RELAY_KEYS),
                           "listen": [_table(item, LISTEN_KEYS) for item in settings.listen]}
    if settings.tls is not None:
        doc["tls"] = _table(settings.tls, TLS_KEYS)
    doc["intake"] = _table(settings.intake, INTAKE_KEYS)
    if settings.intake.users:
        doc["intake"]["users"] = [_table(user, USER_KEYS) for user in settings.intake.users]
    doc["dns"] = _table(settings.dns, DNS_KEYS)
    doc["deliver"] = _table(settings.deliver, DELIVER_KEYS)
    doc["routes"] = {domain: format_hostport(hop) for domain, hop in settings.routes.items()}
    doc["tls_policy"] = dict(settings.tls_policy)
    doc["stats"] = _table(settings.stats, STATS_KEYS)
    doc["cluster"] = _table(settings.cluster, CLUSTER_KEYS)
    if settings.dkim:
        doc["dkim"] = [_table(identity, DKIM_KEYS) for identity in settings.dkim]
    shaping = settings.shaping

    def overrides(values: dict) -> dict:
        return {name: file_value(SHAPING_KEYS[name], value) for name, value in values.items()}

    doc["shaping"] = {"default": overrides(shaping.default)}
    for domain, values in shaping.domains.items():
        doc["shaping"][domain] = overrides(values)
    for suffix, values in shaping.mx_suffixes:
        doc["shaping"][f"mx:{suffix}"] = overrides(values)
    if shaping.rules:
        doc["shaping"]["rules"] = [
            {"regex": rule.regex.pattern, "action": rule.action,
             "duration": format_duration(rule.duration), "trigger": _format_trigger(rule.trigger),
             **overrides(rule.overrides)}
            for rule in shaping.rules]
    return doc


def changed_document(settings: Settings, base: Settings) -> dict[str, Any]:
    """What of ``settings`` differs from ``base`` (postconf -n): single keys
    of the plain tables; ``[[listen]]``, ``[tls]``, ``[routes]``,
    ``[tls_policy]`` and arrays of tables whole, as their entries need
    every required key."""
    mine, theirs = to_document(settings), to_document(base)
    changed: dict[str, Any] = {}
    for name, value in mine.items():
        other = theirs.get(name)
        if value == other:
            continue
        if name in SECTIONS:
            changed[name] = {k: v for k, v in value.items() if v != other.get(k)}
        else:
            changed[name] = value
    return changed


# Tables that are absent or empty by default, with the keys an entry takes
# (`relayctl config --defaults` shows them as commented templates).
OPTIONAL_TABLES = (
    ("[tls]", TLS_KEYS, "absent: inbound STARTTLS is not offered"),
    ("[[intake.users]]", USER_KEYS, "none: AUTH is not offered"),
    ("[[dkim]]", DKIM_KEYS, "none: mail is not signed"),
)
