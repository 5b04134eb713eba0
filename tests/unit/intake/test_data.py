"""relay.intake.data.DataReader: the DATA transfer, fed as RelaySMTP feeds it.

``StreamModel`` (in support) reproduces ``asyncio.StreamReader.readuntil(b"\\r\\n")`` with
aiosmtpd's limit of 1001 bytes (a line whose separator is not found within
the limit raises LimitOverrunError, and the handler reads ``exc.consumed``
bytes and gives them to ``feed_overrun``).  Input arrives in chunks, so every
case runs whole, one byte at a time, and with trailing data (h11 ``tr``).
A test checks the model against the real StreamReader.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake import replies
from relay.intake.data import MAX_TEXT_LINE, DataReader
from support import LIMIT, pieces, transfer

CHUNKINGS = [None, 1, 7]  # whole, byte at a time, odd splits
TRAILER = b"QUIT\r\n"
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


# -- the model itself --------------------------------------------------------


async def _real_pieces(data: bytes, chunk: int) -> list[tuple[str, bytes]]:
    reader = asyncio.StreamReader(limit=LIMIT)

    async def feed() -> None:
        for i in range(0, len(data), chunk):
            reader.feed_data(data[i : i + chunk])
            for _ in range(4):
                await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    out = []
    while True:
        try:
            out.append(("line", await reader.readuntil(b"\r\n")))
        except asyncio.LimitOverrunError as exc:
            out.append(("overrun", await reader.read(exc.consumed)))
        except asyncio.IncompleteReadError:
            break
    await feeder
    return out


@pytest.mark.parametrize("chunk", [1, 5, 600, 4000])
def test_model_matches_asyncio_stream_reader(chunk):
    data = (
        b"a\r\n"
        + b"x" * 999 + b"\r\n"
        + b"y" * 1001 + b"\r\n"
        + b"z" * 1002 + b"\r\n"
        + b"w" * 2500 + b"\r\r\n"
        + b"\n.\n\r.\r\r\n"
        + b".\r\n"
    )
    model = pieces(data, chunk)
    assert model == asyncio.run(_real_pieces(data, chunk))
    assert b"".join(p for _, p in model) == data
    assert any(kind == "overrun" for kind, _ in model)


def test_model_never_splits_a_crlf_across_an_overrun():
    data = b"x" * 1500 + b"\r\n.\r\n"
    for chunk in (None, 1, 2, 3, 1000, 1001, 1002):
        for kind, piece in pieces(data, chunk):
            if kind == "overrun":
                assert not piece.endswith(b"\r")


# -- normal messages ------------------------------------------------------------

MESSAGE = (
    b"From: a@example.com\r\n"
    b"To: b@example.net\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"line one\r\n"
    b"..leading dot\r\n"
    b"...two dots\r\n"
    b"..\r\n"
    b". \r\n"
    b"end\r\n"
    b".\r\n"
)
EXPECTED = (
    b"From: a@example.com\r\n"
    b"To: b@example.net\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"line one\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b" \r\n"
    b"end\r\n"
)


@pytest.mark.parametrize("chunk", CHUNKINGS)
@pytest.mark.parametrize("normalize", [False, True])
def test_normal_message_is_dot_unstuffed(chunk, normalize):
    out = transfer(MESSAGE + TRAILER, chunk=chunk, normalize=normalize)
    assert out.ended
    assert out.verdict is None
    assert out.body == EXPECTED
    assert out.unread == TRAILER


def test_empty_message():
    out = transfer(b".\r\n")
    assert out.ended and out.verdict is None and out.body == b""


def test_finish_hands_the_body_over_once():
    reader = DataReader(max_size=1000, normalize=False, max_received=50)
    assert reader.feed_line(b"a\r\n") is False
    assert reader.feed_line(b".\r\n") is True
    assert reader.finish() == (None, b"a\r\n")
    assert reader.finish() == (None, b"")


@pytest.mark.parametrize(
    "line", [b". \r\n", b"..\r\n", b".x\r\n", b" .\r\n", b"\x2e\x2e\r\n", b".\r\r\n"]
)
def test_only_a_lone_dot_line_ends_data(line):
    reader = DataReader(max_size=1000, normalize=True, max_received=50)
    assert reader.feed_line(line) is False


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_end_of_data_is_seen_at_the_first_crlf_dot_crlf(chunk):
    out = transfer(b"a\r\n.\r\nb\r\n.\r\n", chunk=chunk)
    assert out.ended and out.body == b"a\r\n"
    assert out.unread == b"b\r\n.\r\n"


def test_no_end_of_data_without_the_terminator():
    out = transfer(b"a\r\nb\r\n.")
    assert not out.ended


# -- SMTP smuggling -----------------------------------------------------------

SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nsmuggled\r\n"
FAKE_ENDS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\0.\r\n",
    b"\r\n.\0\r\n",
]


def smuggling_stream(fake_end: bytes) -> bytes:
    return b"Subject: hi\r\n\r\nhello" + fake_end + SMUGGLED + b"\r\n.\r\n" + TRAILER


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=repr)
def test_smuggling_rejected(fake_end, chunk):
    out = transfer(smuggling_stream(fake_end), chunk=chunk, normalize=False)
    expected = replies.S550_NUL if b"\0" in fake_end else replies.S550_BARE_LINE_ENDING
    assert out.verdict == expected
    assert out.verdict.startswith("550 5.6.0 " if b"\0" in fake_end else "550 5.5.2 ")
    assert out.body == b""
    # The end was reported once, at the real terminator: only the trailer is left.
    assert out.ended and out.unread == TRAILER


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("fake_end", [f for f in FAKE_ENDS if b"\0" not in f], ids=repr)
def test_smuggling_normalized(fake_end, chunk):
    out = transfer(smuggling_stream(fake_end), chunk=chunk, normalize=True)
    assert out.verdict is None
    assert out.ended and out.unread == TRAILER
    assert out.body.endswith(b"\r\n")
    assert BARE.search(out.body) is None, out.body
    assert out.body.count(b"\r") == out.body.count(b"\n") == out.body.count(b"\r\n")
    # The would-be commands are message data, not a second transaction.
    assert SMUGGLED in out.body
    assert out.body.startswith(b"Subject: hi\r\n\r\nhello")


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("fake_end", [f for f in FAKE_ENDS if b"\0" in f], ids=repr)
def test_nul_is_refused_even_when_normalizing(fake_end, chunk):
    out = transfer(smuggling_stream(fake_end), chunk=chunk, normalize=True)
    assert out.verdict == replies.S550_NUL
    assert out.ended and out.unread == TRAILER


@pytest.mark.parametrize(
    "line, normalized",
    [
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\n", b"a\r\n\r\n"),
        (b"\n\r\n", b"\r\n\r\n"),
        (b"a\n\rb\r\n", b"a\r\n\r\nb\r\n"),
    ],
)
def test_bare_line_endings_normalized_or_refused(line, normalized):
    for normalize in (False, True):
        reader = DataReader(max_size=1000, normalize=normalize, max_received=50)
        reader.feed_line(b"\r\n")  # leave the header section
        assert reader.feed_line(line) is False
        assert reader.feed_line(b".\r\n") is True
        verdict, body = reader.finish()
        if normalize:
            assert (verdict, body) == (None, b"\r\n" + normalized)
        else:
            assert (verdict, body) == (replies.S550_BARE_LINE_ENDING, b"")


# -- size limit and bounded memory ---------------------------------------------


def test_size_limit_boundary():
    body = b"x" * 98 + b"\r\n"  # 100 octets per line
    assert transfer(body * 10 + b".\r\n", max_size=1000).verdict is None
    out = transfer(body * 10 + b"y\r\n.\r\n", max_size=1000)
    assert out.verdict == replies.S552_TOO_BIG
    assert out.verdict.startswith("552 5.3.4 ")
    assert out.body == b""


def test_size_counts_the_unstuffed_message():
    # 10 lines of "." + 98 octets: 1010 octets on the wire, 1000 unstuffed.
    out = transfer((b"." + b"x" * 98 + b"\r\n") * 10 + b".\r\n", max_size=1000)
    assert out.verdict is None
    assert len(out.body) == 1000


def test_memory_stays_bounded_after_the_size_verdict():
    reader = DataReader(max_size=4096, normalize=False, max_received=50)
    line = b"x" * MAX_TEXT_LINE + b"\r\n"
    for _ in range(5):
        reader.feed_line(line)
    assert reader.verdict == replies.S552_TOO_BIG
    assert len(reader._body) == 0
    fed = 0
    while fed < 10 * 1024 * 1024:  # 10 MB more
        assert reader.feed_line(line) is False
        fed += len(line)
        assert len(reader._body) == 0
    reader.feed_overrun(b"z" * 100_000)
    assert reader.feed_line(b"zz\r\n") is False  # the tail of the over-long line
    assert len(reader._body) == 0
    assert reader.feed_line(b".\r\n") is True
    assert reader.finish() == (replies.S552_TOO_BIG, b"")


def test_memory_stays_bounded_through_the_stream():
    # Over-long lines and normal lines after the verdict, through the reader model.
    data = (b"x" * 2000 + b"\r\n") * 2000 + (b"y" * 500 + b"\r\n") * 2000 + b".\r\n" + TRAILER
    out = transfer(data, max_size=1_000_000)
    assert out.verdict in (replies.S500_LINE_TOO_LONG,)
    assert len(out.reader._body) == 0
    assert out.ended and out.unread == TRAILER


# -- line length -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 333])
def test_line_of_998_octets_accepted(chunk):
    line = b"a" * 998 + b"\r\n"
    out = transfer(b"\r\n" + line + b".\r\n", chunk=chunk)
    assert out.verdict is None and out.body == b"\r\n" + line


@pytest.mark.parametrize("chunk", [None, 333])
@pytest.mark.parametrize("length", [999, 1000, 1001, 1002, 1003, 5000])
def test_longer_lines_refused(length, chunk):
    out = transfer(b"a" * length + b"\r\n.\r\n" + TRAILER, chunk=chunk)
    assert out.verdict == replies.S500_LINE_TOO_LONG
    assert out.verdict.startswith("500 5.5.2 ")
    assert out.ended and out.unread == TRAILER


def test_stuffed_dot_does_not_count_toward_the_line_limit():
    line = b"." + b"a" * 998 + b"\r\n"  # 1001 octets on the wire, 998 of text
    out = transfer(b"\r\n" + line + b".\r\n")
    assert out.verdict is None
    assert out.body == b"\r\n" + b"a" * 998 + b"\r\n"


def test_over_long_lines_arrive_through_feed_overrun():
    kinds = [kind for kind, _ in pieces(b"a" * 1500 + b"\r\n.\r\n")]
    assert kinds == ["overrun", "line", "line"]


def test_the_tail_of_an_over_long_line_is_never_the_end():
    reader = DataReader(max_size=100_000, normalize=False, max_received=50)
    reader.feed_overrun(b"x" * 1500)
    assert reader.feed_line(b".\r\n") is False  # "xxx...x." + CRLF: not an end
    assert reader.verdict == replies.S500_LINE_TOO_LONG
    assert reader.feed_line(b".\r\n") is True


def test_overrun_leaving_a_lone_dot_before_crlf_is_not_the_end():
    # The dot is left in the buffer when the overrun is cut: the next "line"
    # the reader returns is ".\r\n", but it is the tail of the long line.
    data = b"x" * 1100 + b".\r\nreal\r\n.\r\n" + TRAILER
    for chunk in (1101, 1, None):
        out = transfer(data, chunk=chunk)
        assert out.verdict == replies.S500_LINE_TOO_LONG
        assert out.ended and out.unread == TRAILER


def test_several_overruns_for_one_line():
    reader = DataReader(max_size=100_000, normalize=False, max_received=50)
    for _ in range(5):
        reader.feed_overrun(b"x" * 1000)
    assert reader.feed_line(b"\r\n") is False
    assert reader.feed_line(b".\r\n") is True
    assert reader.finish()[0] == replies.S500_LINE_TOO_LONG


# -- Received: loop detection ------------------------------------------------------


def received(n: int) -> bytes:
    return b"".join(b"Received: from h%d by relay; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i for i in range(n))


@pytest.mark.parametrize("normalize", [False, True])
def test_fifty_received_headers_accepted(normalize):
    out = transfer(received(50) + b"Subject: x\r\n\r\nbody\r\n.\r\n", normalize=normalize)
    assert out.verdict is None
    assert out.body.count(b"Received:") == 50


@pytest.mark.parametrize("normalize", [False, True])
def test_fifty_one_received_headers_is_a_loop(normalize):
    out = transfer(received(51) + b"Subject: x\r\n\r\nbody\r\n.\r\n" + TRAILER, normalize=normalize)
    assert out.verdict == replies.S554_LOOP
    assert out.verdict.startswith("554 5.4.6 ")
    assert out.ended and out.unread == TRAILER


def test_received_header_name_is_case_insensitive():
    out = transfer(b"RECEIVED: a\r\nreceived: b\r\n\r\n.\r\n", max_received=1)
    assert out.verdict == replies.S554_LOOP


def test_other_headers_ending_in_received_are_not_counted():
    out = transfer(b"X-Received: a\r\nX-Received: b\r\n\r\n.\r\n", max_received=1)
    assert out.verdict is None


def test_received_lines_in_the_body_are_not_counted():
    out = transfer(received(50) + b"\r\n" + received(200) + b".\r\n")
    assert out.verdict is None
    assert out.body.count(b"Received:") == 250


def test_received_headers_separated_by_bare_lf_are_counted_when_normalizing():
    headers = b"Received: from a\n" * 7 + b"Received: from b\r\n"  # 8 headers, one CRLF line
    out = transfer(headers + b"\r\nbody\r\n.\r\n", normalize=True, max_received=5)
    assert out.verdict == replies.S554_LOOP


# -- verdict order ---------------------------------------------------------------


def test_the_first_problem_is_the_verdict():
    reader = DataReader(max_size=3000, normalize=False, max_received=50)
    reader.feed_line(b"a\0b\r\n")
    reader.feed_line(b"a\rb\r\n")
    reader.feed_line(b"x" * 1200 + b"\r\n")
    reader.feed_line(b"y" * 5000 + b"\r\n")
    assert reader.feed_line(b".\r\n") is True
    assert reader.finish() == (replies.S550_NUL, b"")


def test_nul_wins_over_bare_line_ending_in_the_same_line():
    reader = DataReader(max_size=3000, normalize=False, max_received=50)
    reader.feed_line(b"a\rb\0\r\n")
    assert reader.verdict == replies.S550_NUL


# -- properties ------------------------------------------------------------------

_text_line = st.binary(max_size=120).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)


def _stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(_text_line, max_size=30), chunk=st.integers(1, 200))
def test_any_clean_message_roundtrips_under_any_chunking(lines, chunk):
    lines = [b"X: 1", b""] + lines  # headers first, so no body line is taken as a header
    wire = _stuff(lines) + b".\r\n" + TRAILER
    expected = b"".join(line + b"\r\n" for line in lines)
    for normalize in (False, True):
        out = transfer(wire, chunk=chunk, normalize=normalize)
        assert out.verdict is None
        assert out.body == expected
        assert out.unread == TRAILER


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\0", b"x" * 600]), max_size=40),
    chunk=st.integers(1, 64),
    normalize=st.booleans(),
)
def test_chunking_never_changes_the_outcome(data, chunk, normalize):
    wire = b"".join(data) + b"\r\n.\r\n" + TRAILER
    whole = transfer(wire, normalize=normalize)
    split = transfer(wire, chunk=chunk, normalize=normalize)
    assert (whole.verdict, whole.body, whole.ended, whole.unread) == (
        split.verdict, split.body, split.ended, split.unread,
    )
    assert whole.ended  # the real terminator is always found
    if whole.verdict is None:
        assert BARE.search(whole.body) is None
        assert b"\0" not in whole.body


# -- the fast path: feed_block --------------------------------------------------

_line_piece = st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\0", b"Received: x",
                               b"x" * 500, b"y" * 998, b"z" * 999, b"w" * 1001])


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.lists(_line_piece, max_size=4).map(b"".join), max_size=12),
    blank_at=st.integers(0, 12), normalize=st.booleans(),
    max_size=st.sampled_from([600, 3000, 10**6]), cuts=st.lists(st.integers(0, 6000), max_size=4),
)
def test_blocks_give_what_reading_line_by_line_gives(lines, blank_at, normalize, max_size, cuts):
    lines = [b".." if line == b"." else line for line in lines]  # the end comes last only
    lines.insert(min(blank_at, len(lines)), b"")  # the end of the headers, somewhere
    wire = b"".join(line + b"\r\n" for line in lines) + b".\r\n" + TRAILER
    # Byte by byte nothing is ever buffered behind a line: no block at all.
    by_line = transfer(wire, chunk=1, normalize=normalize, max_size=max_size, max_received=2)
    whole = transfer(wire, normalize=normalize, max_size=max_size, max_received=2)
    split = transfer(wire, cuts=cuts, normalize=normalize, max_size=max_size, max_received=2)
    for out in (whole, split):
        assert (out.verdict, out.body, out.ended, out.unread) == (
            by_line.verdict, by_line.body, by_line.ended, by_line.unread)


def test_a_block_with_a_line_over_the_readers_limit_is_refused_as_an_overrun():
    reader = DataReader(max_size=10**6, normalize=False, max_received=5, reader_limit=1001)
    assert reader.feed_block(b"X: 1\r\n\r\nok\r\n" + b"\0" * 1002 + b"\r\n.\r\n")
    assert reader.finish() == (replies.S500_LINE_TOO_LONG, b"")  # not the NUL inside it
