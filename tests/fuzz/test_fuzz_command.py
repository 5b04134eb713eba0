"""Fuzz: an SMTP intake session (aiosmtpd's command loop + RelaySMTP + policy)
on an in-memory transport: random command sequences, MAIL/RCPT parameters,
DATA, pipelining.  No sockets, no relay processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import targets

_address = st.one_of(
    st.sampled_from([
        "<a@example.com>", "<>", "<@hop:a@example.com>", "<a%b@example.com>", '<"a@b"@example.com>',
        "<üser@bücher.example>", "<a@[192.0.2.1]>", "<a@-x-.example>", "a@example.com", "<a@b",
        "<a@xn--zz.example>", "<" + "l" * 70 + "@example.com>",
    ]),
    st.text(max_size=20),
)
_param = st.sampled_from([
    "SIZE=100", "SIZE=999999999", "SIZE=", "SIZE=x", "BODY=8BITMIME", "BODY=7BIT", "BODY=BINARYMIME",
    "SMTPUTF8", "SMTPUTF8=1", "RET=FULL", "NOTIFY=NEVER", "X", "=", "a=b=c", "ORCPT=rfc822;a@b",
])
_params = st.lists(_param, max_size=3).map(lambda ps: "".join(" " + p for p in ps))
_body_line = st.one_of(
    st.sampled_from([
        b"Subject: hi", b"", b".", b"..x", b"Received: x", b"X-Relay-Trace: 1", b"a\nb", b"a\rb",
        b"\0", b"x" * 1200, b"\xff",
    ]),
    st.binary(max_size=30).map(lambda b: b.replace(b"\r\n", b"")),
)
_data = st.lists(_body_line, max_size=8).map(lambda lines: b"DATA\r\n" + b"".join(l + b"\r\n" for l in lines) + b".")
_command = st.one_of(
    st.sampled_from([
        b"EHLO client.example", b"HELO client.example", b"EHLO", b"RSET", b"NOOP", b"QUIT", b"HELP",
        b"VRFY a@b", b"EXPN list", b"STARTTLS", b"AUTH PLAIN AGFhAGI=", b"AUTH LOGIN", b"DATA",
        b"DATA x", b"MAIL", b"RCPT", b"", b"\xff\xfe", b"mail from:<a@example.com>", b"X" * 600,
    ]),
    st.builds(lambda a, p: f"MAIL FROM:{a}{p}".encode("utf-8", "surrogateescape"), _address, _params),
    st.builds(lambda a, p: f"RCPT TO:{a}{p}".encode("utf-8", "surrogateescape"), _address, _params),
    _data,
    st.binary(max_size=20),
)
_good = st.sampled_from(["<a@example.com>", "<b@example.net>", "<üser@bücher.example>", "<>"])
_good_params = st.lists(st.sampled_from(["SIZE=100", "BODY=8BITMIME", "SMTPUTF8"]), max_size=2, unique=True).map(
    lambda ps: "".join(" " + p for p in ps)
)
# A whole transaction in order, so that sessions do reach the accept step.
_transaction = st.builds(
    lambda sender, params, rcpts, data: (
        f"MAIL FROM:{sender}{params}\r\n".encode() + b"".join(f"RCPT TO:{r}\r\n".encode() for r in rcpts) + data
    ),
    _good, _good_params, st.lists(st.one_of(_good, _address), min_size=1, max_size=4), _data,
)
_clean_line = st.text(st.sampled_from(list("abc XYZ:.-ü")), max_size=30).map(str.encode)
_clean = st.builds(
    lambda sender, rcpts, lines: (
        f"MAIL FROM:{sender} SMTPUTF8\r\n".encode() + b"".join(f"RCPT TO:{r}\r\n".encode() for r in rcpts)
        + b"DATA\r\nSubject: x\r\n\r\n" + b"".join(l + b"\r\n" for l in lines) + b"."
    ),
    _good, st.lists(_good, min_size=1, max_size=4), st.lists(_clean_line, max_size=6),
)
_line_end = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r"])
sessions = st.lists(st.tuples(st.one_of(_command, _transaction, _clean, _clean), _line_end), max_size=10).map(
    lambda pairs: b"".join(c + e for c, e in pairs)
)
_opening = st.sampled_from([b"", b"EHLO client.example\r\n", b"EHLO client.example\r\n", b"HELO c\r\n"])


@targets.fuzz_settings(250)
@given(
    opening=_opening,
    wire=sessions,
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    trusted=st.booleans(),
    normalize=st.booleans(),
)
def test_session_properties(opening, wire, cuts, trusted, normalize):
    targets.check_session(opening + wire, cuts, trusted=trusted, normalize=normalize)


def test_a_clean_transaction_is_accepted_and_an_untrusted_one_refused():
    # The harness itself: a good session does reach the accept step.
    wire = (
        b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
        b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    with targets._quiet_logs():
        written, accepted = targets._session([wire], targets.TRUSTED, False)
    assert [t.recipients for t in accepted] == [("b@example.net",)]
    assert b"250 2.0.0 OK queued as " in written
    targets.check_session(wire, [5, 40], trusted=False, normalize=False)
    with targets._quiet_logs():
        written, accepted = targets._session([wire], targets.UNTRUSTED, False)
    assert accepted == [] and b"550 5.7.1 Relaying denied" in written


def test_pipelined_unknown_commands_get_their_replies_before_the_goodbye():
    # Found by this fuzzer: five unknown commands in one read made aiosmtpd
    # hang up after its 502 while RelaySMTP still held that 502 and the 500s
    # before it for pipelining: the client saw nothing but the greeting.
    wire = b"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nA: b\r\nC: d\r\n\r\n"
    with targets._quiet_logs():
        written, _ = targets._session([wire], targets.TRUSTED, False)
    lines = written.decode().split("\r\n")
    assert lines[1:4] == ["500 5.5.1 Command not recognized"] * 3
    assert lines[-2] == "502 5.5.1 Too many unrecognized commands, goodbye."


@pytest.mark.parametrize(
    "hang_up",
    [b"QUIT\r\n", b"A\r\nB\r\nC\r\nD\r\nE\r\n"],  # QUIT; aiosmtpd's goodbye after 5 unknown commands
    ids=["quit", "goodbye"],
)
def test_nothing_is_accepted_after_the_connection_is_closing(hang_up):
    # Found by this fuzzer: commands pipelined after QUIT (or after aiosmtpd's
    # goodbye) were still run, so a message was spooled whose 250 could never
    # reach the client, which would then send it again.
    wire = (
        b"EHLO c\r\n" + hang_up + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
        b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    )
    with targets._quiet_logs():
        written, accepted = targets._session([wire], targets.TRUSTED, False)
    assert accepted == []
    assert b"Sender OK" not in written and b"queued" not in written


def test_vrfy_of_undecodable_bytes_is_a_reply_not_an_internal_error():
    # Found by the long atheris run: aiosmtpd answers a VRFY it cannot parse
    # with the argument echoed ("502 Could not VRFY " + arg); bytes that are
    # not UTF-8 made that reply fail to encode, so every such VRFY was an
    # internal error with a logged traceback.
    wire = b"EHLO c\r\nVRFY x\x9b\x9b\r\nVRFY " + b"y" * 480 + b"\r\nQUIT\r\n"
    with targets._quiet_logs() as errors:
        written, _ = targets._session([wire], targets.TRUSTED, False)
    assert errors.records == []
    assert written.count(b"502 5.5.4 Could not VRFY that address\r\n") == 2
    targets.check_session(wire, [9], trusted=True, normalize=False)


@targets.fuzz_settings(100)
@given(data=st.binary(max_size=300))
def test_session_raw_bytes(data):
    targets.run_command(data)
