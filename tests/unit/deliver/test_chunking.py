"""SmtpSession's BDAT (RFC 3030) against the fake MX on a real loopback
socket: the envelope and body in one write where CHUNKING and PIPELINING
are offered, DATA otherwise, and every refusal read where it belongs."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.deliver import session as session_module
from relay.deliver.session import Hop, SmtpSession, Timeouts
from relay.errors import DeliveryError
from relay.model import Stage
from relay.testing.fakenet import TLS_ON, Behaviour, Rule, SinkFarm

IP = "127.0.0.71"
MX = "mx.chunks.example"
# A line DATA would dot-stuff, one it would stuff twice, and a lone dot
# in the middle, which would end a DATA message: BDAT sends them as they are.
BODY = b"Subject: chunks\r\n\r\n.leading dot\r\n..two\r\n\xc3\xa9\r\n.\r\nlast line\r\n"
TIMEOUTS = Timeouts(connect=5.0, command=5.0, data=5.0)


def _run(coro):
    with asyncio.Runner() as runner:
        return runner.run(asyncio.wait_for(coro, 30.0))


async def _deliver(behaviour: Behaviour, transactions, *, chunking: bool = True,
                   tls: bool = False, timeouts: Timeouts = TIMEOUTS):
    """Open one session to a sink with ``behaviour`` and run each
    ``(recipients, body)`` in turn; the results (each with the session's
    usable and messages_sent after it) and what the sink kept."""
    async with SinkFarm() as farm:
        sink = farm.add_sink(IP, behaviour, hostnames=[MX])
        session = SmtpSession(Hop(MX, IP, sink.port), helo_name="relay.test", source_ip=None,
                              timeouts=timeouts, chunking=chunking)
        await session.open("verify" if tls else "none", farm.client_context() if tls else None)
        results = []
        for recipients, body in transactions:
            result = await session.send("app@sender.example", recipients, body, False)
            result.after = (session.usable, session.messages_sent)
            results.append(result)
        await session.quit()
        return results, list(farm.received)


def test_bdat_carries_the_body_as_it_is_and_the_connection_goes_on():
    results, received = _run(_deliver(Behaviour(chunking=True),
                                      [(["a@chunks.example", "b@chunks.example"], BODY),
                                       (["c@chunks.example"], BODY * 3)]))
    first, second = results
    assert first.chunked and first.data is None
    assert [r.code for r in first.rcpt] == [250, 250] and first.dot.code == 250
    assert second.chunked and second.dot.code == 250 and second.after == (True, 2)
    assert [m.data for m in received] == [BODY, BODY * 3]  # not dot-stuffed, nothing added
    assert all(m.chunked for m in received)
    assert [m.rcpt_tos for m in received] == [("a@chunks.example", "b@chunks.example"),
                                              ("c@chunks.example",)]


def test_bdat_under_starttls():
    [result], [received] = _run(_deliver(Behaviour(chunking=True, tls=TLS_ON),
                                         [(["a@chunks.example"], BODY)], tls=True))
    assert result.chunked and result.dot.code == 250
    assert received.tls and received.chunked and received.data == BODY


@pytest.mark.parametrize("behaviour, chunking", [
    (Behaviour(chunking=False), True),  # not offered
    (Behaviour(chunking=True), False),  # offered, not wanted (the site's chunking = false)
    (Behaviour(chunking=True, pipelining=False), True),  # BDAT only with PIPELINING
], ids=["not-offered", "turned-off", "no-pipelining"])
def test_data_where_bdat_is_not_both_offered_and_wanted(behaviour, chunking):
    [result], [received] = _run(_deliver(behaviour, [(["a@chunks.example"], BODY)],
                                         chunking=chunking))
    assert not result.chunked and result.data.code == 354 and result.dot.code == 250
    assert received.data == BODY and not received.chunked


def test_a_body_over_the_one_write_limit_goes_by_data(monkeypatch):
    monkeypatch.setattr(session_module, "CHUNKED_MAX_BODY", len(BODY) - 1)
    [result], [received] = _run(_deliver(Behaviour(chunking=True), [(["a@chunks.example"], BODY)]))
    assert not result.chunked and result.dot.code == 250 and not received.chunked


def test_a_body_over_the_servers_size_goes_by_data_and_is_never_sent():
    # DATA waits for MAIL's 552 (SIZE=... in MAIL), so the body stays here.
    [result], received = _run(_deliver(Behaviour(chunking=True, max_size=100),
                                       [(["a@chunks.example"], BODY * 10)]))
    assert not result.chunked
    assert result.mail.code == 552 and result.data.code == 503 and result.dot is None
    assert received == []


def test_refused_recipients_leave_the_connection_usable():
    behaviour = Behaviour(chunking=True, rules=[Rule(r"^no", "550 5.1.1 No such user")])
    results, received = _run(_deliver(behaviour, [
        (["no1@chunks.example", "no2@chunks.example"], BODY),  # every RCPT refused
        (["no3@chunks.example", "yes@chunks.example"], BODY),
        (["yes2@chunks.example"], BODY),
    ]))
    none_taken, one_taken, after = results
    assert [r.code for r in none_taken.rcpt] == [550, 550]
    assert none_taken.dot.code == 554 and none_taken.after == (True, 1)  # RSET after the BDAT
    assert [r.code for r in one_taken.rcpt] == [550, 250] and one_taken.dot.code == 250
    assert after.dot.code == 250
    assert [m.rcpt_tos for m in received] == [("yes@chunks.example",), ("yes2@chunks.example",)]


def test_a_refused_sender_and_a_refused_message():
    behaviour = Behaviour(chunking=True, rules=[
        Rule(r"^blocked", "550 5.7.1 Sender blocked", at="MAIL"),
        Rule(r"^spam", "554 5.7.1 Looks like spam", at="DATA"),
    ])

    async def run():
        async with SinkFarm() as farm:
            sink = farm.add_sink(IP, behaviour)
            session = SmtpSession(Hop(MX, IP, sink.port), helo_name="relay.test",
                                  source_ip=None, timeouts=TIMEOUTS, chunking=True)
            await session.open("none", None)
            refused_sender = await session.send("blocked@sender.example", ["a@chunks.example"],
                                                BODY, False)
            refused_message = await session.send("app@sender.example", ["spam@chunks.example"],
                                                 BODY, False)
            counted = session.messages_sent
            fine = await session.send("app@sender.example", ["a@chunks.example"], BODY, False)
            await session.quit()
            return refused_sender, refused_message, counted, fine, len(farm.received)

    refused_sender, refused_message, counted, fine, kept = _run(run())
    assert refused_sender.mail.code == 550 and refused_sender.dot.code == 503
    assert refused_message.rcpt[0].code == 250 and refused_message.dot.code == 554
    assert refused_message.dot.text == "Looks like spam"
    assert counted == 2  # a refused message is a transaction, as a refused dot is
    assert fine.dot.code == 250 and kept == 1


def test_a_421_at_mail_under_a_big_body_is_the_verdict_not_the_reset(monkeypatch):
    """The sink answers the second MAIL with 421 and closes while the body
    is still coming: the 421 (a connection that took its share) is read
    from what arrived before the reset."""
    monkeypatch.setattr(session_module, "CHUNKED_MAX_BODY", 64 * 1024 * 1024)
    big = (b"x" * 998 + b"\r\n") * 16_000  # 16 MB: more than the socket buffers hold
    with pytest.raises(DeliveryError) as caught:
        _run(_deliver(Behaviour(chunking=True, max_messages=1, max_size=None),
                      [(["a@chunks.example"], BODY), (["b@chunks.example"], big)]))
    assert caught.value.stage is Stage.MAIL and caught.value.reply.code == 421


def test_a_connection_cut_mid_chunk_is_a_delivery_error():
    with pytest.raises(DeliveryError) as caught:
        _run(_deliver(Behaviour(chunking=True, drop_in_data=10), [(["a@chunks.example"], BODY)]))
    # The whole transaction went in one write: nothing was answered yet.
    assert caught.value.stage is Stage.MAIL and caught.value.reply.code == 0


async def _holding_server(hold: float):
    """A server offering CHUNKING that answers a transaction only after
    ``hold`` seconds of end-of-message work, all its replies at once (RFC
    2920 lets a server hold replies while input is waiting)."""

    async def serve(reader, writer):
        writer.write(b"220 slow.example ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-slow.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
        await reader.readline()  # MAIL
        await reader.readline()  # RCPT
        size = int((await reader.readline()).split()[1])
        await reader.readexactly(size)
        await asyncio.sleep(hold)
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 queued\r\n")
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _open_chunking(port: int, *, command: float, data: float) -> SmtpSession:
    session = SmtpSession(Hop("slow.example", "127.0.0.1", port), helo_name="relay.test",
                          source_ip=None, chunking=True,
                          timeouts=Timeouts(connect=5.0, command=command, data=data))
    await session.open("none", None)
    return session


def test_the_envelopes_replies_may_take_as_long_as_the_end_of_data():
    async def run():
        server, port = await _holding_server(hold=0.8)
        async with server:
            session = await _open_chunking(port, command=0.3, data=5.0)
            result = await session.send("a@sender.example", ["b@slow.example"], BODY, False)
            session.close()
            return result

    result = _run(run())
    assert result.chunked and result.mail.code == 250 and result.dot.code == 250


def test_a_timeout_after_the_body_went_counts_as_one_after_the_dot():
    """The server may have the message: not a failure "at MAIL" that a
    retry on a fresh connection could repeat without a second thought."""
    async def run():
        server, port = await _holding_server(hold=5.0)
        async with server:
            session = await _open_chunking(port, command=0.1, data=0.4)
            started = time.monotonic()
            with pytest.raises(DeliveryError) as caught:
                await session.send("a@sender.example", ["b@slow.example"], BODY, False)
            session.close()
            return caught.value, time.monotonic() - started

    error, waited = _run(run())
    assert error.stage is Stage.DOT and error.reply.text == "timeout at mail"
    assert 0.35 <= waited < 3.0  # the data timeout, not the command timeout
