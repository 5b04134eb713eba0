"""The fake MX's block DATA reader reads what aiosmtpd's own smtp_DATA reads:
the same content, the same verdict, the same bytes left for the next
command, however the stream is cut."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.testing.sinkdata import NOMINAL, TOO_LONG, TOO_MUCH, DataCollector, read_data

NEXT_COMMAND = b"MAIL FROM:<next@example>\r\n"
VERDICTS = {"500 Line too long (see RFC5321 4.5.3.1.6)": TOO_LONG,
            "552 Error: Too much mail data": TOO_MUCH}


class _Transport:
    def is_closing(self) -> bool:
        return False


class _Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 kept"


async def aiosmtpd_reads(stream: bytes, size_limit: int | None):
    """(verdict, content, what is left) as aiosmtpd 1.4's smtp_DATA reads ``stream``."""
    server = SMTP(_Handler(), data_size_limit=size_limit, loop=asyncio.get_running_loop())
    reader = asyncio.StreamReader(limit=server.line_length_limit)
    reader.feed_data(stream)
    server._reader, server.transport = reader, _Transport()
    server.session = Session(asyncio.get_running_loop())
    server.session.host_name = "client.example"
    server.envelope = Envelope()
    server.envelope.rcpt_tos.append("rcpt@example")
    pushed, kept = [], []

    async def push(status):
        pushed.append(status)
        if status == "250 kept":
            kept.append(envelope.original_content)

    envelope = server.envelope
    server.push = push
    await asyncio.wait_for(server.smtp_DATA(""), 10)
    assert pushed[0].startswith("354")
    verdict = VERDICTS.get(pushed[1], NOMINAL)
    return verdict, kept[0] if verdict == NOMINAL else None, bytes(reader._buffer)


async def block_reads(stream: bytes, size_limit: int | None, cuts: list[int]):
    reader = asyncio.StreamReader(limit=SMTP.line_length_limit)
    collector = DataCollector(size_limit, SMTP.line_length_limit, SMTP.line_length_limit)
    reading = asyncio.ensure_future(read_data(reader, collector, block_size=700))
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        reader.feed_data(stream[start:cut])
        start = max(start, cut)
        await asyncio.sleep(0)
    assert await asyncio.wait_for(reading, 10)
    content = collector.content() if collector.state == NOMINAL else None
    return collector.state, content, bytes(reader._buffer)


_piece = st.one_of(
    st.sampled_from([b"x" * n for n in (0, 1, 997, 998, 999, 1000, 1001, 1002, 1500, 3000)]),
    st.sampled_from([b".", b"..", b". ", b"\n", b"\r", b".\n", b"\xff", b"a\rb\nc"]),
    st.binary(max_size=40),
)
_line = st.builds(lambda parts, end: b"".join(parts) + end, st.lists(_piece, max_size=3),
                  st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]))
_streams = st.lists(_line, max_size=12).map(lambda lines: b"".join(lines) + b"\r\n.\r\n")
_limits = st.sampled_from([None, 0, 5, 100, 1000, 2500, 10_000])


@settings(max_examples=300, deadline=None)
@given(stream=_streams, size_limit=_limits, cuts=st.lists(st.integers(0, 6000), max_size=6))
def test_block_reads_are_aiosmtpd_s_reads(stream, size_limit, cuts):
    stream += NEXT_COMMAND

    async def both():
        return (await aiosmtpd_reads(stream, size_limit),
                await block_reads(stream, size_limit, cuts))

    expected, got = asyncio.run(both())
    assert got == expected


@pytest.mark.parametrize("content", [997, 998, 999, 1000, 1001, 1002])
@pytest.mark.parametrize("size_limit", [None, 1000, 1001, 1002, 1003, 1004, 1005, 2000])
def test_lines_at_the_limits_get_aiosmtpd_s_verdict(content, size_limit):
    """Where a line is counted before it is too long, and where it is too
    long before it counts, tells the two verdicts apart."""
    stream = b"x" * content + b"\r\n.\r\n" + NEXT_COMMAND

    async def both():
        return (await aiosmtpd_reads(stream, size_limit),
                [await block_reads(stream, size_limit, cuts) for cuts in ([], [content // 2], [content + 1])])

    expected, got = asyncio.run(both())
    assert got == [expected] * 3


def test_a_line_too_long_is_cut_to_its_last_byte_and_still_counted():
    collector = DataCollector(None, 1001, 1001)
    for _ in range(100):
        assert collector.feed(b"y" * 10_000) is None
    assert len(collector._partial) == 1  # memory stays bounded
    assert collector.feed(b"\r\n.\r\nQUIT\r\n") == 5
    assert collector.state == TOO_LONG and collector.size == 1_000_002


def test_the_terminator_right_after_354_is_an_empty_message():
    collector = DataCollector(None, 1001, 1001)
    assert collector.feed(b".\r\nQUIT\r\n") == 3
    assert collector.state == NOMINAL and collector.content() == b""
