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


def _durations(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('a non-empty list of durations such as ["1m", "5m"]')
    return tuple(parse_duration(item) for item in value)


_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
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
    if sep != ":" or not host or not port.isdigit() or not 0 < int(port) < 65536:
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
)

LISTEN_KEYS = _keys(
    Key("address", parse_hostport, None, '"host:port" to accept SMTP on', reload=False),
)

TLS_KEYS = _keys(
    Key("cert_file", _path, None, "PEM certificate chain for inbound STARTTLS"),
    Key("key_file", _path, None, "PEM private key for inbound STARTTLS"),
)

USER_KEYS = _keys(
    Key("name", _str, None, "AUTH user name"),
    Key("password_hash", _str, None, "hash from `relayctl hash-password`"),
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
    Key("ca_file", _str, "", "CA bundle for tls = verify; empty = the system's"),
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
)

STATS_KEYS = _keys(
    Key("metrics_address", _str, "", '"127.0.0.1:9425" to serve /metrics; empty = off', reload=False),
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
    Key("class", _str, "", "default lane of this consumer's mail (reserved for lanes)"),
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
DnsSettings = _section_class("DnsSettings", DNS_KEYS)
DeliverSettings = _section_class("DeliverSettings", DELIVER_KEYS)
StatsSettings = _section_class("StatsSettings", STATS_KEYS)


DkimIdentity = _section_class("DkimIdentity", DKIM_KEYS)
AmqpConsumer = _section_class("AmqpConsumer", AMQP_CONSUMER_KEYS)
AmqpEvents = _section_class("AmqpEvents", AMQP_EVENTS_KEYS)
Webhook = _section_class("Webhook", WEBHOOK_KEYS)


@dataclass(frozen=True)
class AmqpSettings:
    consumers: tuple = ()  # of AmqpConsumer ([[amqp.consumer]])
    events: Any = field(default_factory=AmqpEvents)  # [amqp.events]


@dataclass(frozen=True)
class Settings:
    relay: Any  # RelaySettings
    listen: tuple  # of Listen
    tls: Any  # TlsSettings or None
    intake: Any  # IntakeSettings
    dns: Any  # DnsSettings
    deliver: Any  # DeliverSettings
    stats: Any  # StatsSettings
    routes: dict = field(default_factory=dict)  # domain -> (host, port)
    tls_policy: dict = field(default_factory=dict)  # domain -> none|opportunistic|required|verify
    dkim: tuple = ()  # of DkimIdentity
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


def _section(label: str, raw: Any, keys: dict[str, Key], required=()) -> dict[str, Any]:
    """Parse one table against its key declarations."""
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
    return values


def _array(label: str, raw: Any) -> list:
    if not isinstance(raw, list):
        raise ConfigError(f"{label}: expected an array of tables ([[{label.strip('[]')}]])")
    return raw


TOP_LEVEL = (
    "relay", "listen", "tls", "intake", "dns", "deliver", "routes", "tls_policy", "stats", "dkim",
    "amqp", "webhook",
)
TLS_MODES = ("none", "opportunistic", "required", "verify")


def from_dict(raw: dict, source: str = "") -> Settings:
    """Validate a parsed TOML document and build the settings tree."""
    for name in raw:
        if name not in TOP_LEVEL:
            raise ConfigError(f"[{name}]: unknown table")
    relay = RelaySettings(**_section("[relay]", raw.get("relay", {}), RELAY_KEYS))
    listen = tuple(
        Listen(**_section("[[listen]]", item, LISTEN_KEYS))
        for item in _array("[[listen]]", raw.get("listen", [{"address": "127.0.0.1:2525"}]))
    )
    if not listen:
        raise ConfigError("[[listen]]: at least one listen address is required")
    tls = None
    if "tls" in raw:
        tls = TlsSettings(**_section("[tls]", raw["tls"], TLS_KEYS))
    intake_raw = raw.get("intake", {})
    if not isinstance(intake_raw, dict):
        raise ConfigError("[intake]: expected a table")
    intake_raw = dict(intake_raw)
    users_raw = intake_raw.pop("users", [])
    intake = IntakeSettings(
        **_section("[intake]", intake_raw, INTAKE_KEYS),
        users=tuple(
            User(**_section("[[intake.users]]", item, USER_KEYS))
            for item in _array("[[intake.users]]", users_raw)
        ),
    )
    for user in intake.users:
        if not user.password_hash.startswith("scrypt$"):
            raise ConfigError(
                f"[[intake.users]] password_hash: expected a hash from `relayctl hash-password`"
                f" for user {user.name!r}"
            )
    dns = DnsSettings(**_section("[dns]", raw.get("dns", {}), DNS_KEYS))
    deliver = DeliverSettings(**_section("[deliver]", raw.get("deliver", {}), DELIVER_KEYS))
    stats = StatsSettings(**_section("[stats]", raw.get("stats", {}), STATS_KEYS))
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
        DkimIdentity(**_section("[[dkim]]", item, DKIM_KEYS))
        for item in _array("[[dkim]]", raw.get("dkim", []))
    )
    amqp = _amqp(raw.get("amqp", {}))
    webhooks = tuple(
        Webhook(**_section("[[webhook]]", item, WEBHOOK_KEYS))
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
        source=source,
    )


def _amqp(raw: Any) -> AmqpSettings:
    if not isinstance(raw, dict):
        raise ConfigError("[amqp]: expected a table")
    for name in raw:
        if name not in ("consumer", "events"):
            raise ConfigError(f"[amqp] {name}: unknown key")
    consumers = tuple(
        AmqpConsumer(**_section("[[amqp.consumer]]", item, AMQP_CONSUMER_KEYS))
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
    events = AmqpEvents(**_section("[amqp.events]", raw.get("events", {}), AMQP_EVENTS_KEYS))
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
    return from_dict(raw, source=path)


def defaults() -> Settings:
    return from_dict({})


SECTIONS = {
    "relay": RELAY_KEYS,
    "intake": INTAKE_KEYS,
    "dns": DNS_KEYS,
    "deliver": DELIVER_KEYS,
    "stats": STATS_KEYS,
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
    return changed


def pin_restart_keys(new: Settings, running: Settings) -> Settings:
    """``new`` with every restart-only key set back to its running value: what
    a reload applies, and what a worker forked after the reload must get so
    that it never disagrees with the workers already running."""
    sections = {}
    for section, keys in SECTIONS.items():
        pinned = {name: getattr(getattr(running, section), name)
                  for name, key in keys.items() if not key.reload}
        sections[section] = dataclasses.replace(getattr(new, section), **pinned)
    return dataclasses.replace(new, listen=running.listen, **sections)


def flatten(settings: Settings) -> dict[str, Any]:
    """``{"[section] key": value}`` for every scalar key, for `relayctl config`."""
    flat = {}
    for section, keys in SECTIONS.items():
        for name in keys:
            flat[f"[{section}] {name}"] = getattr(getattr(settings, section), name)
    return flat
