"""relayctl token create: the token is printed once, and the entry it
prints is a valid [[http.tokens]] table that accepts that token."""

from __future__ import annotations

import json
import tomllib

from relay import config
from relay.cli import main
from relay.intake.http.tokens import Tokens


def test_create_prints_a_pasteable_entry_that_accepts_the_token(capsys):
    assert main(["token", "create", "--name", "billing app", "--scopes", "inject,read"]) == 0
    out = capsys.readouterr().out
    token = out.split("keep it secret): ", 1)[1].split()[0]
    assert out.count(token) == 1
    entry = out[out.index("[[http.tokens]]"):]
    settings = config.from_dict({"http": {"address": "127.0.0.1:8025",
                                          **tomllib.loads(entry.replace("[[http.tokens]]",
                                                                        "[[tokens]]"))}})
    [parsed] = settings.http.tokens
    assert parsed.name == "billing app" and parsed.scopes == ("inject", "read")
    grant = Tokens(settings.http.tokens).check(f"Bearer {token}")
    assert grant is not None and grant.scopes == {"inject", "read"}


def test_json_and_two_tokens_differ(capsys):
    assert main(["token", "create", "--name", "a", "--scopes", "admin", "--json"]) == 0
    assert main(["token", "create", "--name", "a", "--scopes", "admin", "--json"]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert set(first) == {"name", "scopes", "token", "token_hash"}
    assert first["token"] != second["token"] and first["token_hash"] != second["token_hash"]


def test_unknown_scope_is_refused(capsys):
    assert main(["token", "create", "--name", "a", "--scopes", "inject,root"]) == 1
    assert "--scopes" in capsys.readouterr().err
