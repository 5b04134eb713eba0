"""relayctl's command line: ``-c FILE`` and ``--json`` before or after any verb."""

from __future__ import annotations

import pytest

from relay.cli import parse_args

# Each verb with the arguments it needs.
VERBS = [
    ["stats"], ["queue"], ["show", "ABC"], ["grep", "a@b.example"], ["report"], ["flush"],
    ["requeue", "--all"], ["delete", "ABC"], ["suspend", "a.example"], ["resume", "a.example"],
    ["trace", "list"], ["config"], ["hash-password"],
    ["dkim", "keygen", "--domain", "a.example", "--selector", "s"], ["spool", "check"],
    ["shaping"], ["shaping", "cancel", "1"],
]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
@pytest.mark.parametrize("where", ["before", "after"])
def test_config_and_json_on_either_side_of_the_verb(verb, where):
    options = ["-c", "other.toml", "--json"]
    argv = options + verb if where == "before" else verb + options
    args = parse_args(argv)
    assert (args.config, args.json) == ("other.toml", True)


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
def test_defaults_without_the_options(verb):
    args = parse_args(verb)
    assert (args.config, args.json) == ("conf/relay.toml", False)


def test_the_last_config_given_wins():
    assert parse_args(["-c", "a.toml", "queue", "-c", "b.toml"]).config == "b.toml"
