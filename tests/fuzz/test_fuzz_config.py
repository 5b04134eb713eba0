"""Fuzz: the config loader (config.from_dict) raises ConfigError and nothing else."""

from __future__ import annotations

import datetime
import math

from hypothesis import given
from hypothesis import strategies as st

from relay import config

import targets

_values = st.sampled_from([
    "30s", "5m", "1.5h", "250ms", "5d", " 7 ", "-1s", "1e400", "\u0663s", "\u00b2", "9" * 5000,
    "25M", "512k", "1GiB", "10x", "127.0.0.1:25", "[::1]:25", "::1:25", "host:0", "host:\u00b2",
    "host:99999", "127.0.0.0/8", "::1", "10.0.0.300", "relaxed/relaxed", "rsa-sha256",
    "ed25519-sha256", "reject", "normalize", "opportunistic", "verify", "none", "required",
    "scrypt$16384$8$1$c2FsdA==$aGFzaA==", "debug", "", "\0", "\udcff",
])
scalars = st.one_of(
    _values, st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 70000),
    st.floats(allow_nan=True, allow_infinity=True), st.just(math.inf), st.text(max_size=12),
    st.datetimes(), st.dates(), st.times(), st.just(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _table(keys) -> st.SearchStrategy:
    return st.dictionaries(st.one_of(st.sampled_from(sorted(keys)), st.text(max_size=8)), values, max_size=6)


_intake = st.builds(
    lambda table, users: {**table, **({"users": users} if users is not None else {})},
    _table(config.INTAKE_KEYS),
    st.one_of(st.none(), values, st.lists(st.one_of(_table(config.USER_KEYS), values), max_size=2)),
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "relay": st.one_of(_table(config.RELAY_KEYS), values),
        "listen": st.one_of(st.lists(st.one_of(_table(config.LISTEN_KEYS), values), max_size=3), values),
        "tls": st.one_of(_table(config.TLS_KEYS), values),
        "intake": st.one_of(_intake, values),
        "dns": st.one_of(_table(config.DNS_KEYS), values),
        "deliver": st.one_of(_table(config.DELIVER_KEYS), values),
        "stats": st.one_of(_table(config.STATS_KEYS), values),
        "routes": st.one_of(st.dictionaries(st.text(max_size=10), values, max_size=3), values),
        "tls_policy": st.one_of(st.dictionaries(st.text(max_size=10), values, max_size=3), values),
        "dkim": st.one_of(st.lists(st.one_of(_table(config.DKIM_KEYS), values), max_size=2), values),
        "shaping": st.one_of(
            st.dictionaries(
                st.one_of(st.sampled_from(["default", "example.com", "mx:.example.net"]), st.text(max_size=8)),
                st.one_of(_table(config.SHAPING_KEYS), values), max_size=3,
            ),
            st.builds(lambda rules: {"rules": rules}, st.lists(st.one_of(_table(config.RULE_KEYS), values), max_size=2)),
            values,
        ),
        "http": st.one_of(_table(config.HTTP_KEYS), values),
        "nonsense": values,
    },
)


@targets.fuzz_settings(500)
@given(doc=documents)
def test_from_dict_raises_only_config_error(doc):
    targets.check_config(doc)


@targets.fuzz_settings(200)
@given(data=st.binary(max_size=300))
def test_config_raw_toml(data):
    targets.run_config(data)


# Valid values of the keys `relayctl config` formats (durations, sizes):
# these documents load, so the paste-back round trip is checked on them.
_duration = st.one_of(
    st.integers(0, 10**9), st.floats(0, 1e9, allow_nan=False),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(0, 10**6), st.sampled_from(["", "ms", "s", "m", "h", "d"])),
    st.builds(lambda n: f"{n}s", st.decimals(0, 10**6, places=3).map(str)),
)
_size = st.one_of(
    st.integers(0, 2**62),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(0, 10**6), st.sampled_from(["", "k", "M", "G", "KiB", "b"])),
)
valid_documents = st.fixed_dictionaries({
    "relay": st.fixed_dictionaries({"shutdown_timeout": _duration}),
    "intake": st.fixed_dictionaries({"idle_timeout": _duration, "min_free_space": _size,
                                     "max_message_size": st.integers(1024, 2**40)}),
    "deliver": st.fixed_dictionaries({"retry_schedule": st.lists(_duration, min_size=1, max_size=4),
                                      "max_lifetime": _duration}),
})


@targets.fuzz_settings(300)
@given(doc=valid_documents)
def test_valid_documents_load_and_paste_back(doc):
    config.from_dict(doc)  # these are valid: the round trip below is reached
    targets.check_config(doc)
