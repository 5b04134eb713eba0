"""relay._fast.datalines against relay._ref.datalines (the specification).

The ``impl`` cases run on both implementations; the differential test
compares them on random blocks built from the bytes that matter (CR, LF,
NUL, dots) and lines around the length limit.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st



TWIN = "datalines"  # the impl and both fixtures (conftest.py)


CASES = [
    # (lines, max_line, result)
    (b"", 998, b""),
    (b"a\r\nb\r\n", 998, b"a\r\nb\r\n"),
    (b".a\r\n..b\r\n.\r\n", 998, b"a\r\n.b\r\n\r\n"),  # one dot per line goes (RFC 5321 4.5.2)
    (b"\r\n.x\r\n", 998, b"\r\nx\r\n"),
    (b"a\rb\r\n", 998, None),  # bare CR
    (b"a\nb\r\n", 998, None),  # bare LF
    (b"a\r\n\n", 998, None),
    (b"a\r", 998, None),  # CR at the very end
    (b"a\0b\r\n", 998, None),  # NUL
    (b"x" * 998 + b"\r\n", 998, b"x" * 998 + b"\r\n"),
    (b"x" * 999 + b"\r\n", 998, None),  # RFC 5321 4.5.3.1.6
    (b"ok\r\n" + b"x" * 11 + b"\r\n", 10, None),
    (b".abc", 998, b"abc"),  # a last piece with no CRLF is a line too
    (b"abcd", 3, None),
]


@pytest.mark.parametrize("lines,max_line,result", CASES)
def test_cases(impl, lines, max_line, result):
    assert impl.unstuff_clean(lines, max_line) == result


def test_a_clean_block_without_dots_is_not_copied(impl):
    lines = b"line one\r\nline two\r\n" * 50
    assert impl.unstuff_clean(lines, 998) is lines


def test_bad_arguments(impl):
    with pytest.raises(TypeError):
        impl.unstuff_clean(bytearray(b"a\r\n"), 998)
    with pytest.raises(ValueError):
        impl.unstuff_clean(b"a\r\n", -1)


PIECES = st.sampled_from([b"\r\n", b"\r", b"\n", b"\0", b".", b"..", b"a", b"xyz", b"x" * 9, b"\xff"])
BLOCKS = st.lists(PIECES, max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(lines=BLOCKS, max_line=st.integers(min_value=0, max_value=12))
def test_fast_equals_ref(both, lines, max_line):
    ref, fast = both
    assert fast.unstuff_clean(lines, max_line) == ref.unstuff_clean(lines, max_line)
