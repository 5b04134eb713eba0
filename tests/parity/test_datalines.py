"""relay._fast.datalines against relay._ref.datalines (the specification).

The ``impl`` cases run on both implementations; the differential tests
compare them on random blocks built from the bytes that matter (CR, LF,
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


WHOLE_LINES = [
    # (buffer, bytes of whole lines, the end of data included)
    (b"", 0),
    (b"partial", 0),
    (b".\r\nMAIL FROM:<a@b>\r\n", 3),  # the end of data right away
    (b"a\r\nb\r\n.\r\nQUIT\r\n", 9),
    (b"a\r\nb\r\npartial", 6),
    (b"a\r\n.x\r\n..\r\n", 11),  # stuffed dots are not the end
    (b"a\r\n.\r", 3),  # the end of data not whole yet
    (b"\r\n", 2),
    (b"\n.\r\n", 4),  # a bare LF before the dot: no end of data, one whole line
    (b"a\r\n" + b"x" * 2000 + b"\r\n", 2005),
]


@pytest.mark.parametrize("buffer,size", WHOLE_LINES)
def test_whole_lines(impl, buffer, size):
    assert impl.whole_lines(buffer) == size
    assert impl.whole_lines(bytearray(buffer)) == size  # what StreamReader buffers


DOT_STUFFED = [
    (b"", b"\r\n.\r\n"),  # an empty message is one empty line
    (b"a\r\n", b"a\r\n.\r\n"),
    (b".a\r\n.\r\nb\r\n", b"..a\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
    (b"no end", b"no end\r\n.\r\n"),
    (b"a\n.b\r\n", b"a\n.b\r\n.\r\n"),  # only a dot after CRLF starts a line
]


@pytest.mark.parametrize("body,sent", DOT_STUFFED)
def test_dot_stuffed(impl, body, sent):
    assert impl.dot_stuffed(body) == sent


def test_bad_arguments_of_whole_lines_and_dot_stuffed(impl):
    with pytest.raises(TypeError):
        impl.whole_lines(None)
    with pytest.raises(TypeError):
        impl.dot_stuffed(bytearray(b"a\r\n"))


@settings(max_examples=400, deadline=None)
@given(data=BLOCKS)
def test_fast_whole_lines_and_dot_stuffed_equal_ref(both, data):
    ref, fast = both
    assert fast.whole_lines(data) == ref.whole_lines(data)
    assert fast.whole_lines(bytearray(data)) == ref.whole_lines(data)
    assert fast.dot_stuffed(data) == ref.dot_stuffed(data)
