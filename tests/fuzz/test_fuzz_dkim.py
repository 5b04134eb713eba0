"""Fuzz: DKIM canonicalization and body hash, relay._fast against relay._ref.

The Cython code handles untrusted bytes: every input is run through both,
whole, one byte at a time and in random chunks, and must give the same
bytes, lengths and errors."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import targets

_header_bytes = st.lists(
    st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"\r\n\t", b":", b"A", b"z",
                     b"\x00", b"\x0b", b"\x80", b"\xff", b"  \t "]),
    max_size=30,
).map(b"".join)
header_part = st.one_of(_header_bytes, st.binary(max_size=60))

_body_tokens = st.sampled_from([
    b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"a", b"xyz", b"\x00", b"\xff", b" \t \r\n",
    b"\r\r\n", b"\n\r", b".", b"x" * 300,
])
bodies = st.one_of(st.lists(_body_tokens, max_size=40).map(b"".join), st.binary(max_size=400))


@targets.fuzz_settings(400)
@given(name=header_part, value=header_part)
def test_header_canonicalization_parity(name, value):
    targets.check_canon(name, value)


@targets.fuzz_settings(300)
@given(
    body=bodies,
    canon=st.sampled_from(["simple", "relaxed"]),
    algo=st.sampled_from(["sha256", "sha1"]),
    limit=st.one_of(st.none(), st.integers(0, 500)),
    cuts=st.lists(st.integers(0, 500), max_size=12),
)
def test_body_hash_parity(body, canon, algo, limit, cuts):
    targets.check_body(body, canon, algo, limit, cuts)


@targets.fuzz_settings(200)
@given(
    algo=st.one_of(st.sampled_from(["sha256", "sha1", "md5", "SHA256", ""]), st.text(max_size=5)),
    canon=st.one_of(st.sampled_from(["simple", "relaxed", "Relaxed", "nowsp"]), st.text(max_size=5)),
    limit=st.one_of(st.none(), st.integers(-3, 3), st.integers(-(2**70), 2**70), st.just(2**63)),
    chunk=st.one_of(st.binary(max_size=10), st.text(max_size=3), st.integers(-1, 3), st.none()),
)
def test_bad_arguments_fail_alike(algo, canon, limit, chunk):
    targets.check_body_arguments(algo, canon, limit, chunk)


@targets.fuzz_settings(200)
@given(data=st.binary(max_size=400))
def test_dkim_raw_bytes(data):
    targets.run_dkim(data)
