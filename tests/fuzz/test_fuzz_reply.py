"""Fuzz: the SMTP reply parser of delivery (deliver.smtp_proto.ReplyParser)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import targets

_code = st.sampled_from([b"250", b"220", b"421", b"550", b"354", b"000", b"99", b"2500", b"abc", b""])
_sep = st.sampled_from([b" ", b"-", b"", b"x", b"\t"])
_text = st.one_of(
    st.sampled_from([
        b"OK", b"2.0.0 OK", b"5.1.1 no such user", b"4.7.0 later", b"5.1.1", b"2.0.0",
        b"5.\xd9\xa3.1 arabic digit", b"2.\xef\xbc\x90.0 fullwidth", b"9.9.9 x", b"\xff\xfe",
        b"x" * 4090, b"y" * 5000,
    ]),
    st.binary(max_size=30),
)
_end = st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b"\r", b""])
_line = st.builds(lambda c, s, t, e: c + s + t + e, _code, _sep, _text, _end)
streams = st.one_of(st.lists(_line, max_size=12).map(b"".join), st.binary(max_size=300))


@targets.fuzz_settings(300)
@given(data=streams, cuts=st.lists(st.integers(0, 6000), max_size=8))
def test_reply_stream_properties(data, cuts):
    targets.check_reply_stream(data, cuts)


_enhanced = st.one_of(
    st.none(),
    st.builds(
        lambda c, s, d: f"{c}.{s}.{d}",
        st.sampled_from("245"), st.integers(0, 999), st.integers(0, 999),
    ),
)
# Reply text that cannot itself be read as an enhanced code (no leading digit).
_words = st.text(st.sampled_from(list("abcXYZ .:;-!<>@é")), max_size=30)


@targets.fuzz_settings(300)
@given(
    code=st.integers(100, 999),
    lines=st.lists(st.tuples(_enhanced, _words), min_size=1, max_size=6),
)
def test_well_formed_replies_parse_to_their_parts(code, lines):
    targets.check_reply_lines(code, lines)


@targets.fuzz_settings(150)
@given(data=st.binary(max_size=300))
def test_reply_raw_bytes(data):
    targets.run_reply(data)
