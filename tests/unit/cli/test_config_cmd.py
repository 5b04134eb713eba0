"""relayctl config: every table, as TOML that loads back to equal settings."""

from __future__ import annotations

import dataclasses
import json
import tomllib

import pytest

from relay import config
from relay.cli import main

FULL = """
[relay]
hostname = "relay.example.com"
workers = 4
spool_dir = "spool"
source_ips = ["192.0.2.10", "2001:db8::10"]
shutdown_timeout = "1m"
spread_domains = ["Gmail.com", "bücher.example"]

[[listen]]
address = "127.0.0.1:2525"
[[listen]]
address = "[::1]:2526"

[tls]
cert_file = "tls/c.pem"
key_file = "/etc/relay/k.pem"

[intake]
mynetworks = ["10.0.0.0/8", "192.0.2.1"]
min_free_space = "1G"
idle_timeout = "90s"
[[intake.users]]
name = "app"
password_hash = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="

[dns]
nameservers = ["127.0.0.1:5353", "[::1]:53"]

[deliver]
retry_schedule = ["30s", 90, "1.5s", "250ms"]
max_lifetime = "2d"
tls = "verify"
ca_file = "ca.pem"
exclude_domains = ["nope.example"]

[routes]
"Example.TEST" = "127.0.0.1:2600"
"v6.example" = "[::1]:2601"

[tls_policy]
"bank.example" = "verify"

[stats]
metrics_address = "127.0.0.1:9425"

[[dkim]]
domain = "example.com"
selector = "s1"
key_file = "k1.pem"
algorithm = "ed25519-sha256"
headers = ["From", "To"]
[[dkim]]
domain = "example.org"
selector = "s2"
key_file = "k2.pem"
default = true
"""


def relayctl(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.fixture
def conf(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(FULL)
    return path


def pasted_back(conf, text: str) -> config.Settings:
    """The printed TOML as a config file of its own, next to the original."""
    again = conf.parent / "pasted.toml"
    again.write_text(text)
    return dataclasses.replace(config.load(str(again)), source=str(conf))


@pytest.mark.parametrize("mode", [[], ["--changed"]])
def test_printed_config_loads_back_to_equal_settings(capsys, conf, mode):
    text = relayctl(capsys, "config", "-c", str(conf), *mode)
    assert pasted_back(conf, text) == config.load(str(conf))
    for table in ("[relay]", "listen", "[tls]", "[intake]", "users", "[dns]", "[deliver]",
                  "[routes]", "[tls_policy]", "[stats]", "dkim"):
        assert table in text, table


def test_values_are_in_their_file_form(capsys, conf):
    doc = tomllib.loads(relayctl(capsys, "config", "-c", str(conf)))
    assert doc["relay"]["shutdown_timeout"] == "1m"
    assert doc["listen"] == [{"address": "127.0.0.1:2525", "class": ""},
                             {"address": "[::1]:2526", "class": ""}]
    assert doc["intake"]["min_free_space"] == "1G"
    assert doc["intake"]["idle_timeout"] == "90s"
    assert doc["intake"]["mynetworks"] == ["10.0.0.0/8", "192.0.2.1/32"]
    assert doc["dns"]["nameservers"] == ["127.0.0.1:5353", "[::1]:53"]
    assert doc["deliver"]["retry_schedule"] == ["30s", "90s", "1500ms", "250ms"]
    assert doc["deliver"]["max_lifetime"] == "2d"
    assert doc["routes"] == {"example.test": "127.0.0.1:2600", "v6.example": "[::1]:2601"}
    assert doc["tls_policy"] == {"bank.example": "verify"}
    # Paths as the relay uses them: taken from the config file's directory.
    assert doc["relay"]["spool_dir"] == str(conf.parent / "spool")
    assert doc["tls"] == {"cert_file": str(conf.parent / "tls" / "c.pem"),
                          "key_file": "/etc/relay/k.pem"}
    assert [d["key_file"] for d in doc["dkim"]] == [str(conf.parent / "k1.pem"),
                                                     str(conf.parent / "k2.pem")]


def test_changed_shows_only_what_differs(capsys, conf, tmp_path):
    small = tmp_path / "small.toml"
    small.write_text('[deliver]\nmax_lifetime = "3d"\n[routes]\n"a.example" = "127.0.0.1:26"\n')
    doc = tomllib.loads(relayctl(capsys, "config", "-c", str(small), "--changed"))
    assert doc == {"deliver": {"max_lifetime": "3d"}, "routes": {"a.example": "127.0.0.1:26"}}
    as_json = json.loads(relayctl(capsys, "config", "-c", str(small), "--changed", "--json"))
    assert as_json == doc


def test_defaults_load_back_and_show_the_optional_tables(capsys):
    text = relayctl(capsys, "config", "--defaults")
    assert config.from_dict(tomllib.loads(text)) == config.defaults()
    assert 'max_lifetime = "5d"' in text and 'min_free_space = "100M"' in text
    assert 'spawn_after = "250ms"' in text
    for template in ("# [tls]", "# [[intake.users]]", "# [[dkim]]"):
        assert template in text
    # A template uncommented, with its placeholders filled in, is a valid entry.
    dkim = text[text.index("# [[dkim]]"):]
    entry = "\n".join(line[2:].split("  #")[0] for line in dkim.splitlines()[1:])
    entry = entry.replace('"..."', '"x"')
    parsed = config.from_dict({"dkim": [tomllib.loads(entry)]})
    assert parsed.dkim[0].algorithm == "rsa-sha256"


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.1, 0.25, 1.5, 30.0, 90.0, 3600.0, 86400 * 5,
                                     1e-7, 123.456])
def test_durations_write_back_exactly(seconds):
    assert config.parse_duration(config.format_duration(seconds)) == seconds


@pytest.mark.parametrize("size", [0, 1, 1000, 1024, 512 * 1024, 25 * 1024**2, 3 * 1024**3, 1025])
def test_sizes_write_back_exactly(size):
    assert config.parse_size(config.format_size(size)) == size
