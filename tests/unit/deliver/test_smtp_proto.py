"""The sans-IO SMTP client core: replies parsed whole, byte by byte and
with trailing data (h11's three ways); commands and dot-stuffing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.deliver import smtp_proto
from relay.errors import RemoteProtocolError
from relay.model import Reply

STREAM = (
    b"220 mx.example ESMTP ready\r\n"
    b"250-mx.example greets you\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n"
    b"550 5.1.1 <nobody@example> no such user\r\n"
    b"451-4.3.0 first line\r\n451 4.3.0 second line\r\n"
    b"250 ok\n"  # a bare LF ending is tolerated from servers
)
EXPECTED = [
    Reply(220, None, "mx.example ESMTP ready", "mx"),
    Reply(250, None, "mx.example greets you\nPIPELINING\nSIZE 1000\nSTARTTLS", "mx"),
    Reply(550, "5.1.1", "<nobody@example> no such user", "mx"),
    Reply(451, "4.3.0", "first line\nsecond line", "mx"),
    Reply(250, None, "ok", "mx"),
]


def drain(parser):
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(reply)
    return replies


@pytest.mark.parametrize("chunking", ["whole", "bytewise", "trailing"])
def test_replies_parse_however_the_bytes_arrive(chunking):
    parser = smtp_proto.ReplyParser("mx")
    data = STREAM + (b"354 go ahe" if chunking == "trailing" else b"")
    if chunking == "bytewise":
        for i in range(len(data)):
            parser.receive_data(data[i:i + 1])
    else:
        parser.receive_data(data)
    assert drain(parser) == EXPECTED
    if chunking == "trailing":
        parser.receive_data(b"ad\r\n")
        assert drain(parser) == [Reply(354, None, "go ahead", "mx")]


# Lines a server repeats, alone or as the last line of a longer reply.
REPEATED = [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 go ahead\r\n",
            b"250-first\r\n250 2.1.0 Ok\r\n", b"550 5.1.1 <a@b> no such user\r\n",
            b"250 ok\n", b"250 ok\r\n", b"421 4.3.2 closing\r\n"]


@given(st.lists(st.sampled_from(REPEATED), max_size=40))
def test_a_parser_that_remembers_replies_gives_what_a_fresh_one_gives(replies):
    remembering = smtp_proto.ReplyParser("mx")
    for wire in replies:
        remembering.receive_data(wire)
    fresh = []
    for wire in replies:
        parser = smtp_proto.ReplyParser("mx")
        parser.receive_data(wire)
        fresh += drain(parser)
    assert drain(remembering) == fresh


def test_a_remembered_line_is_the_same_reply_and_the_memory_is_bounded():
    parser = smtp_proto.ReplyParser("mx")
    parser.receive_data(b"250 2.1.0 Ok\r\n250 2.1.0 Ok\r\n")
    first, second = drain(parser)
    assert first is second and first == Reply(250, "2.1.0", "Ok", "mx")
    for n in range(3 * smtp_proto.SEEN_MAX):
        parser.receive_data(b"250 2.0.0 queued as %d\r\n" % n)
    assert [r.text for r in drain(parser)] == [f"queued as {n}" for n in range(3 * smtp_proto.SEEN_MAX)]
    assert len(parser._seen) == smtp_proto.SEEN_MAX


def test_enhanced_code_of_another_class_is_not_taken():
    parser = smtp_proto.ReplyParser()
    parser.receive_data(b"550 4.1.1 confused\r\n")
    assert drain(parser) == [Reply(550, None, "4.1.1 confused", None)]


@pytest.mark.parametrize("bad", [b"hello\r\n", b"25 short\r\n", b"2500 x\r\n", b"x" * 5000])
def test_malformed_replies_are_remote_errors(bad):
    with pytest.raises(RemoteProtocolError):
        smtp_proto.ReplyParser().receive_data(bad)


def test_ehlo_extensions():
    reply = EXPECTED[1]
    assert smtp_proto.ehlo_extensions(reply) == {"PIPELINING": "", "SIZE": "1000", "STARTTLS": ""}


def test_pipelined_transaction_is_one_write():
    data = smtp_proto.transaction("a@s.example", ["b@r.example", "c@r.example"], size=42,
                                  smtputf8=False, body8bit=True)
    assert data == (
        b"MAIL FROM:<a@s.example> SIZE=42 BODY=8BITMIME\r\n"
        b"RCPT TO:<b@r.example>\r\nRCPT TO:<c@r.example>\r\nDATA\r\n"
    )
    assert smtp_proto.mail_from("", size=None, smtputf8=True, body8bit=False) == (
        b"MAIL FROM:<> SMTPUTF8\r\n"
    )


@pytest.mark.parametrize(
    "body, sent",
    [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b".start\r\n", b"..start\r\n.\r\n"),
        (b"x\r\n.\r\n", b"x\r\n..\r\n.\r\n"),  # a lone dot line is data, not the end
        (b"no final newline", b"no final newline\r\n.\r\n"),
        (b"", b"\r\n.\r\n"),
    ],
)
def test_dot_stuffing(body, sent):
    assert smtp_proto.dot_stuffed(body) == sent


@pytest.mark.parametrize(
    "error", [EOFError("connection closed by server"), ConnectionResetError(104, "reset"), OSError()]
)
def test_lost_connections_become_delivery_errors(error):
    from relay.deliver.session import map_exceptions
    from relay.errors import DeliveryError
    from relay.model import Stage

    with pytest.raises(DeliveryError) as caught:
        with map_exceptions(Stage.DOT, "mx.example"):
            raise error
    assert caught.value.reply.code == 0 and caught.value.stage is Stage.DOT
    assert caught.value.reply.text.startswith("connection lost")


# -- found by tests/fuzz -------------------------------------------------------


@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_an_over_long_line_is_refused_however_it_arrives(chunking):
    # It used to pass when it came in one read together with its LF.
    data = b"250 " + b"y" * smtp_proto.MAX_REPLY_LINE + b"\r\n"
    parser = smtp_proto.ReplyParser()
    with pytest.raises(RemoteProtocolError):
        for piece in [data] if chunking == "whole" else [data[i:i + 1] for i in range(len(data))]:
            parser.receive_data(piece)


def test_the_longest_line_is_accepted_however_it_arrives():
    data = b"250 " + b"y" * (smtp_proto.MAX_REPLY_LINE - 5) + b"\r\n"
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        parser = smtp_proto.ReplyParser()
        for piece in pieces:
            parser.receive_data(piece)
        assert drain(parser)[0].code == 250


def test_enhanced_code_digits_are_ascii():
    parser = smtp_proto.ReplyParser()
    parser.receive_data("550 5.\u0663.1 arabic-indic three\r\n".encode())
    assert drain(parser) == [Reply(550, None, "5.\u0663.1 arabic-indic three", None)]


def test_each_line_loses_its_own_enhanced_code():
    # The last line's code length used to cut every line: "2.0.0 a" lost its "a".
    parser = smtp_proto.ReplyParser()
    parser.receive_data(b"250-2.0.0 a\r\n250 2.1.10 b\r\n")
    assert drain(parser) == [Reply(250, "2.1.10", "a\nb", None)]


def test_the_class_of_a_code_with_a_leading_zero_is_zero():
    # "055" used to be taken as class 5 (str(55)[0]), so "5.1.1" was its code.
    parser = smtp_proto.ReplyParser()
    parser.receive_data(b"055 5.1.1 odd\r\n")
    assert drain(parser) == [Reply(55, None, "5.1.1 odd", None)]
