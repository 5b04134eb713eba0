"""[http] and [[http.tokens]] in relay.config: parsing, errors naming the
key, and what a reload may change."""

from __future__ import annotations

import pytest

from relay import config
from relay.errors import ConfigError

HASH = "sha256$" + "ab" * 32
TOKEN = {"name": "app", "token_hash": HASH, "scopes": ["inject", "admin"]}


def http(**section):
    return config.from_dict({"http": {"address": "127.0.0.1:8025", **section}})


def test_absent_means_no_http():
    assert config.defaults().http is None


def test_defaults_and_tokens():
    settings = http(tokens=[TOKEN], max_body_size="1M")
    assert settings.http.address == ("127.0.0.1", 8025)
    assert settings.http.max_body_size == 1024**2 and settings.http.cert_file == ""
    [token] = settings.http.tokens
    assert (token.name, token.token_hash, token.scopes) == ("app", HASH, ("inject", "admin"))


@pytest.mark.parametrize("section, named", [
    ({"address": "nowhere"}, "[http] address"),
    ({"max_body_size": "lots"}, "[http] max_body_size"),
    ({"cert_file": "a.pem"}, "[http] cert_file, key_file"),
    ({"tokens": [{**TOKEN, "scopes": ["root"]}]}, "[[http.tokens]] scopes"),
    ({"tokens": [{**TOKEN, "scopes": []}]}, "[[http.tokens]] scopes"),
    ({"tokens": [{**TOKEN, "token_hash": "plain-text"}]}, "[[http.tokens]] token_hash"),
    ({"tokens": [{"name": "x", "scopes": ["inject"]}]}, "[[http.tokens]] token_hash"),
    ({"tokens": [TOKEN, TOKEN]}, "[[http.tokens]] name"),
    ({"port": 80}, "[http] port: unknown key"),
])
def test_bad_values_name_the_key(section, named):
    with pytest.raises(ConfigError) as caught:
        http(**section)
    assert str(caught.value).startswith(named)


def test_missing_address_is_named():
    with pytest.raises(ConfigError, match=r"^\[http\] address: required"):
        config.from_dict({"http": {}})


def test_a_reload_keeps_the_address_and_takes_the_tokens():
    running = http()
    new = config.from_dict({"http": {"address": "127.0.0.1:9000", "tokens": [TOKEN]}})
    assert config.restart_needed(running, new) == ["[http] address"]
    pinned = config.pin_restart_keys(new, running)
    assert pinned.http.address == ("127.0.0.1", 8025) and len(pinned.http.tokens) == 1
    assert config.pin_restart_keys(config.defaults(), running).http == running.http
    assert config.pin_restart_keys(new, config.defaults()).http is None
    assert config.restart_needed(running, http(tokens=[TOKEN])) == []
