"""SmtpSession's BDAT (RFC 3030) against the fake MX on a real loopback
socket: the whole transaction in one write where CHUNKING and PIPELINING
are offered, DATA otherwise, and every refusal read where it belongs."""

from __future__ import annotations

import asyncio

import pytest

from relay.deliver import smtp_proto
from relay.deliver.session import Hop, SmtpSession, Timeouts
from relay.errors import DeliveryError
from relay.model import Stage
from relay.testing.fakenet import Behaviour, Rule, SinkFarm

IP = "127.0.0.71"
# Lines that DATA would dot-stuff, a bare 8-bit byte, and no CRLF at the
# very end of a line that begins with a dot: BDAT sends all of it as it is.
BODY = b"Subject: chunks\r\n\r\n.leading dot\r\n..two\r\n\xc3\xa9\r\n.\r\nlast line\r\n"


def _run(coro):
    with asyncio.Runner() as runner:
        return runner.run(asyncio.wait_for(coro, 20.0))


async def _deliver(behaviour: Behaviour, transactions, *, chunking: bool = True):
    """Open one session to a sink with ``behaviour`` and run each
    ``(recipients, body)`` in turn; the results and what the sink kept."""
    async with SinkFarm() as farm:
        sink = farm.add_sink(IP, behaviour)
        session = SmtpSession(Hop("mx.chunks.example", IP, sink.port), helo_name="relay.test",
                              source_ip=None, timeouts=Timeouts(connect=5.0, command=5.0, data=5.0),
                              chunking=chunking)
        await session.open("none", None)
        results = []
        for recipients, body in transactions:
            results.append(await session.send("app@sender.example", recipients, body, False))
            results[-1].usable_after = session.usable
        await session.quit()
        return results, list(farm.received)


def test_bdat_carries_the_body_as_it_is_in_one_round_trip():
    results, received = _run(_deliver(Behaviour(chunking=True),
                                      [(["a@chunks.example", "b@chunks.example"], BODY),
                                       (["c@chunks.example"], BODY * 3)]))
    first, second = results
    assert first.chunked and first.data is None
    assert [r.code for r in first.rcpt] == [250, 250] and first.dot.code == 250
    assert second.chunked and second.dot.code == 250 and second.usable_after
    assert [m.data for m in received] == [BODY, BODY * 3]  # not dot-stuffed, nothing added
    assert [m.rcpt_tos for m in received] == [("a@chunks.example", "b@chunks.example"),
                                              ("c@chunks.example",)]


@pytest.mark.parametrize("behaviour, chunking", [
    (Behaviour(chunking=False), True),  # not offered
    (Behaviour(chunking=True), False),  # offered, turned off ([deliver] chunking = false)
    (Behaviour(chunking=True, pipelining=False), True),  # BDAT only with PIPELINING
])
def test_data_where_bdat_is_not_both_offered_and_wanted(behaviour, chunking):
    [result], [received] = _run(_deliver(behaviour, [(["a@chunks.example"], BODY)],
                                         chunking=chunking))
    assert not result.chunked and result.data.code == 354 and result.dot.code == 250
    assert received.data == BODY


def test_refused_recipients_leave_the_connection_usable():
    behaviour = Behaviour(chunking=True, rules=[Rule(r"^no", "550 5.1.1 No such user")])
    results, received = _run(_deliver(behaviour, [
        (["no1@chunks.example", "no2@chunks.example"], BODY),  # every RCPT refused
        (["no3@chunks.example", "yes@chunks.example"], BODY),
        (["yes2@chunks.example"], BODY),
    ]))
    none_taken, one_taken, after = results
    assert [r.code for r in none_taken.rcpt] == [550, 550]
    assert none_taken.dot.code == 554 and none_taken.usable_after  # RSET after the refused BDAT
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
            farm.add_sink(IP, behaviour)
            session = SmtpSession(Hop("mx.chunks.example", IP, farm.sinks[IP].port),
                                  helo_name="relay.test", source_ip=None,
                                  timeouts=Timeouts(connect=5.0, command=5.0, data=5.0))
            await session.open("none", None)
            refused_sender = await session.send("blocked@sender.example", ["a@chunks.example"],
                                                BODY, False)
            refused_message = await session.send("app@sender.example", ["spam@chunks.example"],
                                                 BODY, False)
            fine = await session.send("app@sender.example", ["a@chunks.example"], BODY, False)
            await session.quit()
            return refused_sender, refused_message, fine, len(farm.received)

    refused_sender, refused_message, fine, kept = _run(run())
    assert refused_sender.mail.code == 550 and refused_sender.dot.code == 503
    assert refused_message.rcpt[0].code == 250 and refused_message.dot.code == 554
    assert refused_message.dot.text == "Looks like spam"
    assert fine.dot.code == 250 and kept == 1


def test_a_message_over_the_size_limit_gets_552():
    # SIZE is advertised and sent with MAIL, so the sink refuses at MAIL;
    # without SIZE in MAIL (a server that does not check it) BDAT's own
    # limit is the one that answers.
    behaviour = Behaviour(chunking=True, max_size=100)
    [result], received = _run(_deliver(behaviour, [(["a@chunks.example"], BODY * 10)]))
    assert result.mail.code == 552 and result.dot.code == 503 and received == []


def test_the_sinks_bdat_size_limit_without_size_in_mail():
    async def run():
        async with SinkFarm() as farm:
            sink = farm.add_sink(IP, Behaviour(chunking=True, max_size=100))
            reader, writer = await asyncio.open_connection(IP, sink.port)
            await reader.readline()
            writer.write(b"EHLO relay.test\r\n")
            while (await reader.readline())[3:4] == b"-":
                pass
            body = b"x" * 60 + b"\r\n"
            writer.write(smtp_proto.chunked_transaction("a@s.example", ["b@chunks.example"], len(body),
                                                        size=None, smtputf8=False, body8bit=False)
                         .replace(b" LAST", b"") + body + b"BDAT %d LAST\r\n" % len(body) + body)
            replies = [await reader.readline() for _ in range(4)]
            writer.write(b"QUIT\r\n")
            await reader.readline()
            writer.close()
            return replies, list(farm.received)

    replies, received = _run(run())
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"552"]
    assert received == []


def test_a_connection_cut_mid_chunk_is_a_delivery_error():
    with pytest.raises(DeliveryError) as caught:
        _run(_deliver(Behaviour(chunking=True, drop_in_data=10), [(["a@chunks.example"], BODY)]))
    # The whole transaction went in one write: nothing was answered yet.
    assert caught.value.stage is Stage.MAIL and caught.value.reply.code == 0
