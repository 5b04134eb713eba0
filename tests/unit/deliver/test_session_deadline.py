"""SmtpSession's read timeouts (session.ReadDeadline) against a real
loopback server that answers the greeting, EHLO and MAIL, then says nothing.

One timer per connection instead of one per read: these check that a read
still times out when it should (also after earlier reads moved the
deadline), that a reply in time is no timeout, and that a cancellation
from outside stays a cancellation.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from relay.deliver.session import Hop, ReadDeadline, SmtpSession, Timeouts
from relay.errors import DeliveryError
from relay.model import Stage


async def _server(answers: list[bytes]):
    """A server that sends its greeting, then one answer per command line
    it reads, then stays silent."""

    async def serve(reader, writer):
        writer.write(b"220 stall.example ESMTP\r\n")
        for answer in answers:
            if not await reader.readline():
                return
            writer.write(answer)
        await reader.read()  # silent until the client goes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}  # the workers run uvloop


@pytest.fixture(params=list(LOOPS))
def loop_factory(request):
    return LOOPS[request.param]


def _run(coro, loop_factory):
    """Run a test's coroutine; a read that never times out fails it in 10 s."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(asyncio.wait_for(coro, 10.0))


async def _open(port: int, command: float) -> SmtpSession:
    session = SmtpSession(Hop("stall.example", "127.0.0.1", port), helo_name="relay.test",
                          source_ip=None, timeouts=Timeouts(connect=5.0, command=command, data=command))
    await session.open("none", None)
    return session


def test_a_silent_server_times_out_after_earlier_reads_moved_the_deadline(loop_factory):
    async def run():
        server, port = await _server([b"250 stall.example\r\n", b"250 2.1.0 ok\r\n"])
        async with server:
            session = await _open(port, command=0.3)
            await asyncio.sleep(0.2)  # the timer set by the first reads would fire during the next
            session._write(b"MAIL FROM:<a@b.example>\r\n")
            assert (await session._read(Stage.MAIL, 0.3)).code == 250
            session._write(b"RCPT TO:<c@d.example>\r\n")
            started = time.monotonic()
            with pytest.raises(DeliveryError) as caught:
                await session._read(Stage.RCPT, 0.3)
            waited = time.monotonic() - started
            session.close()
        return caught.value, waited

    error, waited = _run(run(), loop_factory)
    assert error.stage is Stage.RCPT
    assert (error.reply.code, error.reply.enhanced, error.reply.text) == (0, "4.4.2", "timeout at rcpt")
    assert 0.25 <= waited < 2.0  # its own 0.3 s, not the earlier reads' nor never


def test_a_shorter_deadline_than_the_pending_timer_is_kept(loop_factory):
    async def run():
        server, port = await _server([b"250 stall.example\r\n"])
        async with server:
            session = await _open(port, command=30.0)  # the timer now waits 30 s
            session._write(b"NOOP\r\n")
            started = time.monotonic()
            with pytest.raises(DeliveryError):
                await session._read(Stage.MAIL, 0.2)
            waited = time.monotonic() - started
            session.close()
        return waited

    assert _run(run(), loop_factory) < 2.0


def test_a_cancellation_from_outside_is_not_a_timeout(loop_factory):
    async def run():
        server, port = await _server([b"250 stall.example\r\n"])
        async with server:
            session = await _open(port, command=30.0)
            session._write(b"NOOP\r\n")
            reading = asyncio.ensure_future(session._read(Stage.MAIL, 30.0))
            await asyncio.sleep(0.1)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            session.close()
            return reading.cancelled()

    assert _run(run(), loop_factory) is True


def test_a_timer_due_within_a_millisecond_is_no_trouble_on_uvloop(loop_factory):
    # uvloop hands back a plain Handle (no when()) for a delay under 0.5 ms.
    async def run():
        loop = asyncio.get_running_loop()
        deadline = ReadDeadline()
        deadline.start(loop.time() + 0.0001)
        deadline.stop()
        deadline.start(loop.time() + 5.0)  # compares with the armed time
        deadline.stop()
        await asyncio.sleep(0.01)  # the first timer fires with no read waiting: it lapses
        deadline.start(loop.time() + 0.0001)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.sleep(1.0)  # a read that takes too long
        timed_out = deadline.timed_out()
        deadline.stop()
        deadline.cancel()
        return timed_out

    assert _run(run(), loop_factory) is True
