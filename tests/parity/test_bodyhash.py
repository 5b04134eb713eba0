"""relay._fast.bodyhash against relay._ref.bodyhash (the specification), and both against the RFC.

Every case runs on both implementations (the ``impl`` fixture); the
differential tests feed the same body to both three ways -- whole, one byte
at a time, in random chunks -- and compare the digest and ``length`` after
every chunk, so the held-back state (trailing CRLFs, a CR at a chunk's end, a
WSP run) must match too, not only the final hash.
"""

from __future__ import annotations

import hashlib
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import implementation

CANONS = ("simple", "relaxed")


TWIN = "bodyhash"  # the impl and both fixtures (conftest.py)


def run(module, canon, chunks, limit=None):
    """Feed chunks; return the lengths after each one, the digest and the final length."""
    hasher = module.BodyHasher("sha256", canon, limit)
    lengths = []
    for chunk in chunks:
        hasher.update(chunk)
        lengths.append(hasher.length)
    digest = hasher.digest()
    return lengths, digest, hasher.length


def split(body: bytes, cuts) -> list[bytes]:
    cuts = sorted(set(c for c in cuts if 0 <= c <= len(body)))
    bounds = [0] + cuts + [len(body)]
    return [body[a:b] for a, b in zip(bounds, bounds[1:])]


# -- the RFC's rules, on both implementations --------------------------------

EXPECTED = [
    # (body, simple canonical form, relaxed canonical form)
    (b"", b"\r\n", b""),  # 3.4.3 / 3.4.4: empty body
    (b"\r\n", b"\r\n", b""),
    (b"\r\n\r\n\r\n", b"\r\n", b""),
    (b"abc", b"abc\r\n", b"abc\r\n"),  # no final CRLF: one is added
    (b"abc\r\n\r\n\r\n", b"abc\r\n", b"abc\r\n"),  # trailing empty lines ignored
    (b" C \r\nD \t E\r\n\r\n\r\n", b" C \r\nD \t E\r\n", b" C\r\nD E\r\n"),  # 3.4.5
    (b"a\r\n  \r\n\t\r\n", b"a\r\n  \r\n\t\r\n", b"a\r\n"),  # WSP-only lines are empty (erratum 1384)
    (b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n"),  # inner empty lines kept
    (b"  lead\r\n", b"  lead\r\n", b" lead\r\n"),  # a leading run becomes one SP
    (b"x  ", b"x  \r\n", b"x\r\n"),  # unterminated last line: WSP removed, CRLF added
    (b"   ", b"   \r\n", b""),
    (b"a\rb\nc\r\n", b"a\rb\nc\r\n", b"a\rb\nc\r\n"),  # bare CR / LF are plain bytes
    (b"a \r", b"a \r\r\n", b"a \r\r\n"),
    (b"\xc3\xa9t\xc3\xa9 \xff\r\n", b"\xc3\xa9t\xc3\xa9 \xff\r\n", b"\xc3\xa9t\xc3\xa9 \xff\r\n"),
]


@pytest.mark.parametrize("body,simple,relaxed", EXPECTED)
def test_rfc_rules(impl, body, simple, relaxed):
    for canon, canonical in (("simple", simple), ("relaxed", relaxed)):
        for chunks in ([body], [body[i : i + 1] for i in range(len(body))]):
            _, digest, length = run(impl, canon, chunks)
            assert digest == hashlib.sha256(canonical).digest(), (canon, chunks)
            assert length == len(canonical)


def oracle(canon: str, body: bytes) -> bytes:
    """The canonical body by whole-body regexes: a third statement of the rules."""
    if canon == "relaxed":
        body = re.sub(rb"[ \t]+\r\n", b"\r\n", body)  # WSP at the end of lines
        body = re.sub(rb"[ \t]+", b" ", body)  # runs of WSP
        body = re.sub(rb"[ \t]+\Z", b"", body)  # ... and at the end of an unterminated line
        body = re.sub(rb"(\r\n)+\Z", b"", body)  # trailing empty lines
        return body + b"\r\n" if body else b""
    return re.sub(rb"(\r\n)*\Z", b"", body) + b"\r\n"


@pytest.mark.parametrize("body,simple,relaxed", EXPECTED)
def test_oracle_agrees_with_the_table(body, simple, relaxed):
    assert (oracle("simple", body), oracle("relaxed", body)) == (simple, relaxed)


@pytest.mark.parametrize("canon", CANONS)
def test_limit_cuts_the_canonical_body(impl, canon):
    body = b"Hello  world\r\n\r\nmore \r\n\r\n"
    canonical = oracle(canon, body)
    for limit in (0, 1, 5, len(canonical) - 1, len(canonical), len(canonical) + 10):
        _, digest, length = run(impl, canon, [body], limit)
        assert digest == hashlib.sha256(canonical[:limit]).digest()
        assert length == min(limit, len(canonical))


def test_arguments_are_checked(impl):
    with pytest.raises(ValueError):
        impl.BodyHasher("md5", "simple", None)
    with pytest.raises(ValueError):
        impl.BodyHasher("sha256", "loose", None)
    with pytest.raises(ValueError):
        impl.BodyHasher("sha256", "simple", -1)
    with pytest.raises(TypeError):
        impl.BodyHasher("sha256", "simple", None).update("text, not bytes")


def test_digest_is_final_and_repeatable(impl):
    hasher = impl.BodyHasher("sha256", "relaxed", None)
    hasher.update(b"abc\r\n")
    assert hasher.digest() == hasher.digest()
    with pytest.raises(ValueError):
        hasher.update(b"more")


def test_sha1_is_available_for_verifiers(impl):
    hasher = impl.BodyHasher("sha1", "simple", None)
    hasher.update(b"abc")
    assert hasher.digest() == hashlib.sha1(b"abc\r\n").digest()


def test_accepts_any_contiguous_buffer(impl):
    body = b"one  two\r\n\r\n"
    expected = run(impl, "relaxed", [body])[1]
    for chunk in (bytearray(body), memoryview(body), memoryview(b"xx" + body)[2:]):
        assert run(impl, "relaxed", [chunk])[1] == expected


# -- differential: _fast == _ref ---------------------------------------------

_WORDS = st.binary(min_size=1, max_size=20).map(lambda b: b.translate(None, b" \t\r\n") or b"w")
_TOKENS = st.one_of(
    _WORDS,
    st.sampled_from(
        [b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r\n\r\n", b"\r", b"\n", b"\r\r\n", b" \r\n"]
    ),
    st.sampled_from([b"\xc3\xa9", b"\xe2\x82\xac", b"\xff\xfe", b"\x80"]),  # UTF-8 and 8-bit
    st.integers(1, 300).map(lambda n: b"\r\n" * n),  # long runs of empty lines
    st.integers(1, 40).map(lambda n: b" " * n),
)
BODIES = st.one_of(
    st.lists(_TOKENS, max_size=60).map(b"".join),
    st.binary(max_size=300),
)
LIMITS = st.one_of(st.none(), st.integers(0, 400))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(body=BODIES, canon=st.sampled_from(CANONS))
def test_ref_matches_the_oracle(body, canon):
    ref = implementation("_ref", TWIN)
    assert run(ref, canon, [body])[1] == hashlib.sha256(oracle(canon, body)).digest()


@SETTINGS
@given(body=BODIES, canon=st.sampled_from(CANONS), limit=LIMITS)
def test_whole_and_byte_by_byte(both, body, canon, limit):
    ref, fast = both
    for chunks in ([body], [body[i : i + 1] for i in range(len(body))]):
        assert run(fast, canon, chunks, limit) == run(ref, canon, chunks, limit)


@SETTINGS
@given(data=st.data(), body=BODIES, canon=st.sampled_from(CANONS), limit=LIMITS)
def test_random_chunks(both, data, body, canon, limit):
    ref, fast = both
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    chunks = split(body, cuts)
    # Empty chunks too: they must not disturb a held-back CR.
    chunks = chunks + [b""] + chunks[-1:] if data.draw(st.booleans()) else chunks
    result = run(fast, canon, chunks, limit)
    assert result == run(ref, canon, chunks, limit)
    # The split must not matter: the digest equals that of the whole input.
    assert result[1:] == run(ref, canon, [b"".join(chunks)], limit)[1:]


@pytest.mark.parametrize("canon", CANONS)
def test_large_bodies_cross_the_buffer(both, canon):
    """Bodies larger than _fast's 64 KiB buffer, in odd chunk sizes, and a
    100 000-line run of empty lines (held back, then released at once)."""
    ref, fast = both
    rng = random.Random(6376)
    tokens = [b"lorem", b"ipsum", b" ", b"  ", b"\t", b"\r\n", b"\r\n\r\n", b"x" * 50, b"\r", b"\n"]
    body = b"".join(rng.choice(tokens) for _ in range(60_000))
    for size in (len(body), 65_536, 8191, 1000):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert run(fast, canon, chunks) == run(ref, canon, chunks)
    empty_lines = b"first\r\n" + b"\r\n" * 100_000 + b"last \r\n" + b"\r\n" * 50_000
    assert run(fast, canon, [empty_lines]) == run(ref, canon, [empty_lines])
    assert run(fast, canon, [empty_lines], limit=150_001) == run(ref, canon, [empty_lines], limit=150_001)
