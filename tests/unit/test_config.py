"""relay.config: every key declared once; bad values name the key."""

from __future__ import annotations

import ipaddress
import math
import dataclasses
import os

import pytest

from relay import config
from relay.config import (
    ConfigError,
    defaults,
    from_dict,
    load,
    parse_duration,
    parse_hostport,
    parse_size,
    restart_needed,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return str(info.value)


# -- defaults ----------------------------------------------------------------------


def test_defaults_load():
    s = defaults()
    assert s.relay.workers == 0
    assert s.relay.spool_dir == "var/spool"
    assert s.relay.source_ips == ()
    assert s.listen[0].address == ("127.0.0.1", 2525)
    assert s.tls is None
    assert s.intake.mynetworks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert s.intake.max_message_size == 26214400
    assert s.intake.max_recipients == 1000
    assert s.intake.bare_line_endings == "reject"
    assert s.intake.max_received_headers == 50
    assert s.intake.users == ()
    assert s.dns.nameservers == ()
    assert s.deliver.mx_port == 25
    assert s.deliver.retry_schedule == (60.0, 300.0, 600.0, 1200.0, 1800.0, 2400.0, 3000.0, 3600.0, 21600.0)
    assert s.deliver.max_lifetime == 5 * 86400.0
    assert s.deliver.tls == "opportunistic"
    assert s.deliver.quarantine_after == 3
    assert s.routes == {} and s.dkim == ()


def test_worker_count_zero_means_one_per_core():
    assert defaults().worker_count == (os.cpu_count() or 1)
    assert from_dict({"relay": {"workers": 3}}).worker_count == 3


def test_every_key_has_a_doc():
    for section, keys in config.SECTIONS.items():
        for name, key in keys.items():
            assert key.doc, f"[{section}] {name} has no doc"


def test_shipped_config_loads():
    s = load(os.path.join(ROOT, "conf", "relay.toml"))
    assert s.relay.hostname == "relay.localhost"
    assert s.listen[0].address == ("127.0.0.1", 2525)
    assert s.intake.bare_line_endings == "reject"
    assert s.source.endswith("relay.toml")


def test_shipped_config_keeps_its_files_under_the_repository_var(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # scripts/run starts from the repository root; any cwd works
    s = load(os.path.join(ROOT, "conf", "relay.toml"))
    var = os.path.join(ROOT, "var")
    assert (s.relay.spool_dir, s.relay.run_dir, s.deliver.event_log_dir) == (
        os.path.join(var, "spool"), os.path.join(var, "run"), os.path.join(var, "log"))


def test_relative_paths_are_taken_from_the_config_files_directory(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "relay.toml").write_text(
        '[relay]\nspool_dir = "spool"\nrun_dir = "../run"\n'
        '[tls]\ncert_file = "tls/c.pem"\nkey_file = "/abs/k.pem"\n'
        '[deliver]\nca_file = "ca.pem"\n'
        '[[dkim]]\ndomain = "a.example"\nselector = "s"\nkey_file = "dkim/a.pem"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load("../etc/relay.toml")
    assert s.relay.spool_dir == str(conf / "spool")
    assert s.relay.run_dir == str(tmp_path / "run")
    assert s.deliver.event_log_dir == str(conf / "var" / "log")  # defaults too
    assert s.tls.cert_file == str(conf / "tls" / "c.pem")
    assert s.tls.key_file == "/abs/k.pem"  # absolute: as written
    assert s.deliver.ca_file == str(conf / "ca.pem")
    assert s.dkim[0].key_file == str(conf / "dkim" / "a.pem")
    # Without a file there is nothing to be relative to.
    assert from_dict({"relay": {"spool_dir": "spool"}}).relay.spool_dir == "spool"
    assert load(str(conf / "relay.toml")) == dataclasses.replace(s, source=str(conf / "relay.toml"))


def test_an_empty_ca_file_stays_the_systems(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("[deliver]\n")
    assert load(str(path)).deliver.ca_file == ""


def test_full_example(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(
        """
[relay]
hostname = "relay.example.com"
workers = 4
source_ips = ["192.0.2.10", "2001:db8::10"]
shutdown_timeout = "1m"

[[listen]]
address = "127.0.0.1:2525"
[[listen]]
address = "[::1]:2526"

[tls]
cert_file = "c.pem"
key_file = "k.pem"

[intake]
mynetworks = ["10.0.0.0/8", "192.0.2.1"]
max_message_size = 1048576
min_free_space = "1G"
bare_line_endings = "normalize"
[[intake.users]]
name = "app"
password_hash = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="

[dns]
nameservers = ["127.0.0.1:5353"]

[deliver]
retry_schedule = ["30s", 90]
tls = "verify"

[routes]
"Example.TEST" = "127.0.0.1:2600"

[[dkim]]
domain = "example.com"
selector = "s1"
key_file = "k1.pem"
algorithm = "ed25519-sha256"
headers = ["From", "To"]
"""
    )
    s = load(str(path))
    assert s.relay.workers == 4 and s.relay.shutdown_timeout == 60.0
    assert s.relay.source_ips == ("192.0.2.10", "2001:db8::10")
    assert [l.address for l in s.listen] == [("127.0.0.1", 2525), ("::1", 2526)]
    assert s.tls.cert_file == str(tmp_path / "c.pem")  # next to the config file
    assert s.intake.mynetworks[1] == ipaddress.ip_network("192.0.2.1/32")
    assert s.intake.min_free_space == 1024**3
    assert s.intake.users[0].name == "app"
    assert s.dns.nameservers == (("127.0.0.1", 5353),)
    assert s.deliver.retry_schedule == (30.0, 90.0)
    assert s.routes == {"example.test": ("127.0.0.1", 2600)}
    assert s.dkim[0].algorithm == "ed25519-sha256" and s.dkim[0].headers == ("From", "To")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "nope.toml"))
    assert "cannot read" in str(info.value)


def test_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[relay\nworkers = ")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert "not valid TOML" in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# -- errors name the key -------------------------------------------------------------


def test_unknown_table():
    assert error({"relayy": {}}) == "[relayy]: unknown table"


@pytest.mark.parametrize(
    "raw, label",
    [
        ({"relay": {"worker": 2}}, "[relay] worker: unknown key"),
        ({"intake": {"max_recipient": 2}}, "[intake] max_recipient: unknown key"),
        ({"deliver": {"port": 2}}, "[deliver] port: unknown key"),
        ({"dns": {"servers": []}}, "[dns] servers: unknown key"),
        ({"listen": [{"address": "a:1", "port": 2}]}, "[[listen]] port: unknown key"),
        ({"tls": {"cert_file": "a", "key_file": "b", "ca": "c"}}, "[tls] ca: unknown key"),
        ({"dkim": [{"domain": "a", "selector": "s", "key_file": "k", "x": 1}]}, "[[dkim]] x: unknown key"),
        ({"intake": {"users": [{"name": "a", "password_hash": "scrypt$x", "role": 1}]}}, "[[intake.users]] role: unknown key"),
    ],
)
def test_unknown_key(raw, label):
    assert error(raw) == label


BAD_VALUES = [
    ("relay", "workers", "two"),
    ("relay", "workers", -1),
    ("relay", "workers", 257),
    ("relay", "workers", True),
    ("relay", "workers", 1.5),
    ("relay", "hostname", 5),
    ("relay", "spool_dir", ""),
    ("relay", "source_ips", ["not-an-ip"]),
    ("relay", "source_ips", "192.0.2.1"),
    ("relay", "source_ips", ["192.0.2.0/24"]),
    ("relay", "log_level", "verbose"),
    ("relay", "shutdown_timeout", "soon"),
    ("intake", "max_recipients", "many"),
    ("intake", "max_recipients", 0),
    ("intake", "max_message_size", 100),
    ("intake", "mynetworks", ["10.0.0.0/33"]),
    ("intake", "mynetworks", ["example.com"]),
    ("intake", "mynetworks", "127.0.0.0/8"),
    ("intake", "bare_line_endings", "allow"),
    ("intake", "idle_timeout", "5 minutes"),
    ("intake", "idle_timeout", -5),
    ("intake", "auth_lockout", "1m30s"),
    ("intake", "min_free_space", "10T"),
    ("intake", "min_free_space", "1.5G"),
    ("intake", "min_free_space", -1),
    ("intake", "min_data_rate", 1.5),
    ("dns", "nameservers", ["127.0.0.1"]),
    ("dns", "nameservers", ["::1:53"]),
    ("dns", "nameservers", "127.0.0.1:53"),
    ("deliver", "mx_port", 0),
    ("deliver", "mx_port", 65536),
    ("deliver", "retry_schedule", []),
    ("deliver", "retry_schedule", ["1m", "soon"]),
    ("deliver", "retry_schedule", "1m"),
    ("deliver", "max_lifetime", "5 days"),
    ("deliver", "tls", "always"),
    ("deliver", "quarantine_after", 0),
]


@pytest.mark.parametrize("section, key, value", BAD_VALUES)
def test_bad_value_names_the_key(section, key, value):
    message = error({section: {key: value}})
    assert message.startswith(f"[{section}] {key}: expected "), message
    assert repr(value) in message


@pytest.mark.parametrize(
    "raw, start",
    [
        ({"listen": [{"address": "127.0.0.1"}]}, "[[listen]] address: expected "),
        ({"listen": [{"address": "127.0.0.1:0"}]}, "[[listen]] address: expected "),
        ({"listen": [{}]}, "[[listen]] address: required key is missing"),
        ({"listen": []}, "[[listen]]: at least one listen address is required"),
        ({"listen": {"address": "127.0.0.1:25"}}, "[[listen]]: expected an array of tables"),
        ({"tls": {"cert_file": "c"}}, "[tls] key_file: required key is missing"),
        ({"tls": 5}, "[tls]: expected a table"),
        ({"relay": "x"}, "[relay]: expected a table"),
        ({"routes": {"example.test": "nowhere"}}, "[routes] example.test: expected "),
        ({"routes": {"example.test": 25}}, "[routes] example.test: expected "),
        ({"routes": []}, "[routes]: expected a table"),
        ({"dkim": [{"domain": "a", "selector": "s"}]}, "[[dkim]] key_file: required key is missing"),
        ({"dkim": [{"domain": "a", "selector": "s", "key_file": "k", "algorithm": "rsa-sha1"}]}, "[[dkim]] algorithm: expected "),
        ({"dkim": [{"domain": "a", "selector": "s", "key_file": "k", "headers": "From"}]}, "[[dkim]] headers: expected "),
        ({"intake": {"users": [{"name": "a"}]}}, "[[intake.users]] password_hash: required key is missing"),
        ({"intake": {"users": [{"name": "a", "password_hash": "hunter2"}]}}, "[[intake.users]] password_hash: expected a hash"),
        ({"intake": {"users": {"name": "a"}}}, "[[intake.users]]: expected an array of tables"),
    ],
)
def test_other_errors_name_the_key(raw, start):
    assert error(raw).startswith(start)


@pytest.mark.parametrize("value", [5, "abc", []])
def test_intake_that_is_not_a_table(value):
    assert error({"intake": value}) == "[intake]: expected a table"


@pytest.mark.parametrize("section, key", [("intake", "mynetworks"), ("relay", "source_ips")])
def test_integer_addresses_are_refused(section, key):
    assert error({section: {key: [5]}}).startswith(f"[{section}] {key}: expected ")


# -- value parsers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        (30, 30.0),
        (0, 0.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("5d", 432000.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        (" 2 m ", 120.0),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize("value", ["", "-1", -1, "1m30s", "30S", "5 minutes", "m", True, None, [], "1e3s", float("nan")])
def test_parse_duration_refuses(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    "value, size",
    [
        (26214400, 26214400),
        (0, 0),
        ("0", 0),
        ("25M", 25 * 1024**2),
        ("25MiB", 25 * 1024**2),
        ("25MB", 25 * 1024**2),
        ("25 M", 25 * 1024**2),
        ("512k", 512 * 1024),
        ("512KiB", 512 * 1024),
        ("1g", 1024**3),
        ("1G", 1024**3),
        ("10b", 10),
        ("10B", 10),
    ],
)
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "1.5M", "-1", -1, "1T", "MiB", "ten", True, 1.0, None, "25 MB extra"])
def test_parse_size_refuses(value):
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:2525", ("::1", 2525)),
        ("[2001:db8::1]:25", ("2001:db8::1", 25)),
        ("mx.example.com:25", ("mx.example.com", 25)),
        ("h:1", ("h", 1)),
        ("h:65535", ("h", 65535)),
    ],
)
def test_parse_hostport(value, parsed):
    assert parse_hostport(value) == parsed


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1", ":25", "h:", "h:0", "h:65536", "h:-1", "h:+25", "h: 25", "::1:25", "[::1]", "[::1]25", "[]:25", "a:b:25", 25, None],
)
def test_parse_hostport_refuses(value):
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_durations_in_settings_are_finite_by_default():
    s = defaults()
    for value in (s.intake.idle_timeout, s.intake.auth_lockout, s.deliver.max_lifetime, *s.deliver.retry_schedule):
        assert math.isfinite(value) and value > 0


# -- reload ------------------------------------------------------------------------------


def test_restart_needed_lists_workers_not_max_recipients():
    old = defaults()
    new = from_dict({"relay": {"workers": 4}, "intake": {"max_recipients": 10}})
    assert restart_needed(old, new) == ["[relay] workers"]


def test_restart_needed_for_listen_and_spool():
    old = defaults()
    new = from_dict({"relay": {"spool_dir": "other"}, "listen": [{"address": "127.0.0.1:2600"}]})
    assert restart_needed(old, new) == ["[relay] spool_dir", "[[listen]] address"]


def test_restart_not_needed_for_reloadable_keys():
    old = defaults()
    new = from_dict(
        {"intake": {"max_recipients": 10, "bare_line_endings": "normalize"}, "deliver": {"tls": "none"}}
    )
    assert restart_needed(old, new) == []
    assert restart_needed(old, defaults()) == []


def test_the_document_names_every_key():
    doc = config.to_document(defaults())
    assert doc["intake"]["max_recipients"] == 1000
    assert doc["relay"]["workers"] == 0
    for section, keys in config.SECTIONS.items():
        assert set(doc[section]) == set(keys), section


# -- per-domain tables -------------------------------------------------------------------


def test_routes_and_tls_policy_domains_are_lower_cased():
    s = from_dict({"routes": {"A.Example": "[::1]:2600"}, "tls_policy": {"B.Example": "required"}})
    assert s.routes == {"a.example": ("::1", 2600)}
    assert s.tls_policy == {"b.example": "required"}


@pytest.mark.parametrize("mode", ["always", "", 1, ["verify"]])
def test_bad_tls_policy_names_the_domain(mode):
    assert error({"tls_policy": {"b.example": mode}}).startswith("[tls_policy] b.example: expected one of ")


def test_tls_policy_must_be_a_table():
    assert error({"tls_policy": ["b.example"]}) == "[tls_policy]: expected a table"


def test_spread_domains_are_routing_domains():
    s = from_dict({"relay": {"spread_domains": ["Gmail.COM", "bücher.example"]}})
    assert s.relay.spread_domains == frozenset({"gmail.com", "xn--bcher-kva.example"})
    assert from_dict({}).relay.spread_domains == frozenset()
    assert error({"relay": {"spread_domains": ["a..b"]}}).startswith("[relay] spread_domains: expected ")


def test_exclude_domains_are_lower_cased():
    s = from_dict({"deliver": {"exclude_domains": ["Spam.Example"]}})
    assert s.deliver.exclude_domains == ("spam.example",)
    assert error({"deliver": {"exclude_domains": "spam.example"}}).startswith("[deliver] exclude_domains: expected ")


def test_amqp_consumers_are_declared_like_other_keys():
    settings = config.from_dict({"amqp": {"consumer": [
        {"queue": "outbox"},
        {"queue": "bulk", "url": "amqps://u:p@broker:5671/v", "exchange": "x",
         "exchange_type": "topic", "routing_key": "k", "prefetch": 10, "declare": False,
         "queue_type": "quorum", "format": "relay", "class": "bulk"},
    ]}})
    first, second = settings.amqp.consumers
    assert (first.url, first.exchange, first.exchange_type, first.prefetch, first.declare,
            first.queue_type, first.format, first.class_) == (
        "amqp://guest:guest@127.0.0.1:5672/", "", "fanout", 64, True, "classic", "postmanq", "")
    assert (second.exchange_type, second.queue_type, second.class_) == ("topic", "quorum", "bulk")
    assert config.defaults().amqp.consumers == ()
    events = config.from_dict({"amqp": {"events": {"url": "amqp://h/"}}}).amqp.events
    assert (events.url, events.exchange) == ("amqp://h/", "relay.events")
    assert config.defaults().amqp.events.url == ""


@pytest.mark.parametrize("raw, message", [
    ({"consumer": [{}]}, "[[amqp.consumer]] queue: required key is missing"),
    ({"consumer": [{"queue": "q", "prefetch": 0}]}, "[[amqp.consumer]] prefetch: expected"),
    ({"consumer": [{"queue": "q", "format": "json"}]}, "[[amqp.consumer]] format: expected"),
    ({"consumer": [{"queue": "q", "url": "http://x"}]}, "[[amqp.consumer]] url: expected"),
    ({"consumer": [{"queue": "q"}, {"queue": "q"}]}, "consumed twice"),
    ({"consumer": [{"queue": "q", "prefetchh": 1}]}, "[[amqp.consumer]] prefetchh: unknown key"),
    ({"event": {}}, "[amqp] event: unknown key"),
    ({"events": {"url": "http://x"}}, "[amqp.events] url: expected"),
    ({"events": {"exchange": ""}}, "[amqp.events] exchange: expected"),
])
def test_bad_amqp_consumers_name_the_key(raw, message):
    with pytest.raises(config.ConfigError) as caught:
        config.from_dict({"amqp": raw})
    assert message in str(caught.value)


def test_webhooks_are_declared_like_other_keys():
    [hook] = config.from_dict({"webhook": [{"url": "https://h/x", "events": ["Bounce"],
                                            "secret": "s", "batch_wait": "250ms"}]}).webhooks
    assert (hook.url, hook.events, hook.batch_size, hook.batch_wait, hook.secret, hook.timeout) == (
        "https://h/x", ("Bounce",), 100, 0.25, "s", 10.0)
    assert config.defaults().webhooks == ()
    for bad, message in [({"events": ["Nope"]}, "[[webhook]] events: expected"),
                         ({"url": "ftp://x"}, "[[webhook]] url: expected"),
                         ({"batch_size": 0}, "[[webhook]] batch_size: expected")]:
        with pytest.raises(config.ConfigError) as caught:
            config.from_dict({"webhook": [{"url": "http://h/", **bad}]})
        assert message in str(caught.value)


# -- found by tests/fuzz -------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        {"listen": [{"address": "127.0.0.1:\u00b2"}]},  # isdigit() but not int()
        {"routes": {"example.com": "mx.example:" + "2" * 5000}},
        {"stats": {"metrics_address": "127.0.0.1:\u00b2\u00b2"}},
        {"intake": {"min_free_space": "9" * 5000}},  # int()'s digit limit
    ],
)
def test_refusals_are_in_our_words_not_int_s(raw):
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw)
    message = str(info.value)
    assert "expected" in message
    assert "invalid literal" not in message and "Exceeds the limit" not in message


def test_lane_keys_take_a_class_or_nothing_and_shares_from_0_to_1():
    settings = from_dict({"listen": [{"address": "127.0.0.1:2525", "class": "bulk"}],
                          "deliver": {"bulk_loaded_share": 0.5},
                          "shaping": {"default": {"transactional_share": 0}}})
    assert settings.listen[0].class_ == "bulk" and settings.deliver.bulk_loaded_share == 0.5
    assert settings.shaping.default["transactional_share"] == 0.0
    assert defaults().shaping.default["transactional_share"] == 0.2
    assert "[[listen]] class: expected one of '', 'transactional', 'bulk'" in error(
        {"listen": [{"address": "127.0.0.1:2525", "class": "urgent"}]})
    assert "transactional_share: expected a number from 0 to 1" in error(
        {"shaping": {"default": {"transactional_share": 1.5}}})
