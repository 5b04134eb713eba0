"""relay.cli.sendmail and relay.cli.mailq: the pure parts (argv, the
message, the queue listing); no files, no sockets."""

from __future__ import annotations

import email
import email.policy
import time

import pytest

from relay.cli import mailq
from relay.cli.sendmail import (
    DataError, Options, UsageError, exit_status, parse_args, prepare, read_message, split_header,
)
from relay.cli.spoolread import WaitingRecipient
from relay.spool.format import MessageState, RecipientState


def args(*argv):
    return parse_args(list(argv))


# -- argv ----------------------------------------------------------------------


def test_defaults_are_postfixs():
    options = args("a@x.example")
    assert (options.mode, options.extract, options.dot_ends, options.sender) == (
        "deliver", False, True, None)
    assert options.recipients == ["a@x.example"]


@pytest.mark.parametrize("argv", [["-i"], ["-oi"], ["-o", "i"], ["-ti"]])
def test_i_and_oi_turn_the_dot_rule_off(argv):
    assert args(*argv, "a@x.example").dot_ends is False


@pytest.mark.parametrize("argv, sender", [
    (["-f", "me@x.example"], "me@x.example"), (["-fme@x.example"], "me@x.example"),
    (["-r", "me@x.example"], "me@x.example"), (["-f", "<>"], ""), (["-f<me@x.example>"], "me@x.example"),
])
def test_sender_from_f_or_r(argv, sender):
    assert args(*argv, "a@x.example").sender == sender


def test_clustered_letters_and_attached_arguments():
    options = args("-tiFJane Doe", "-CFILE")
    assert options.extract and not options.dot_ends
    assert options.full_name == "Jane Doe" and options.config == "FILE"


def test_double_dash_ends_options_so_a_dash_recipient_is_a_recipient():
    options = args("-i", "--", "-oops@x.example", "-t")
    assert options.recipients == ["-oops@x.example", "-t"]
    assert options.extract is False


def test_options_stop_at_the_first_recipient():
    assert args("a@x.example", "-t").recipients == ["a@x.example", "-t"]


@pytest.mark.parametrize("argv", [["-oem"], ["-oee"], ["-o", "x"], ["-odb"], ["-v"], ["-N", "never"],
                                  ["-O", "smtputf8=yes"], ["-B", "8BITMIME"], ["-h", "10"], ["-m"]])
def test_compatibility_flags_are_ignored(argv):
    options = args(*argv, "a@x.example")
    assert options == Options(recipients=["a@x.example"])


@pytest.mark.parametrize("argv, mode", [
    (["-bm"], "deliver"), (["-bs"], "smtp"), (["-bp"], "list"), (["-q"], "flush"),
    (["-q30m"], "none"), (["-bi"], "none"),
])
def test_modes(argv, mode):
    assert args(*argv).mode == mode


def test_flush_one_site():
    assert args("-qRexample.com").flush_domain == "example.com"
    assert args("-qR", "example.com").flush_domain == "example.com"


def test_mailq_by_its_name():
    assert parse_args([], "/usr/bin/mailq").mode == "list"


@pytest.mark.parametrize("argv", [["-Z"], ["-f"], ["-bd"], ["-bs", "a@x.example"], ["-bp", "-t"]])
def test_usage_errors(argv):
    with pytest.raises(UsageError):
        args(*argv)


# -- reading the input ---------------------------------------------------------------

INPUT = [b"Subject: x\n", b"\n", b"one\n", b".\n", b"after\n"]


def test_a_lone_dot_ends_the_input():
    assert read_message(INPUT, dot_ends=True) == b"Subject: x\r\n\r\none\r\n"


def test_with_i_a_lone_dot_is_data():
    assert read_message(INPUT, dot_ends=False) == b"Subject: x\r\n\r\none\r\n.\r\nafter\r\n"


def test_crlf_input_and_a_last_line_without_newline():
    assert read_message([b"a\r\n", b".\r\n"], True) == b"a\r\n"
    assert read_message([b"a\n", b"b"], True) == b"a\r\nb\r\n"
    assert read_message([b"..\n"], True) == b"..\r\n"  # not a lone dot: kept as is


def test_split_header_with_continuations_and_from_line():
    fields, body = split_header(b"From me Tue\r\nTo: a@x,\r\n  b@x\r\nSubject: s\r\n\r\nbody\r\n")
    assert fields == [b"To: a@x,\r\n  b@x", b"Subject: s"]
    assert body == b"body\r\n"


def test_split_header_without_a_header():
    assert split_header(b"just a body line\r\n") == ([], b"just a body line\r\n")


# -- the message -----------------------------------------------------------------

MESSAGE = (b"From: App <app@x.example>\r\nTo: To One <to@x.example>\r\nCc: cc@y.example\r\n"
           b"Bcc: hidden@z.example\r\nSubject: hi\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
           b"Message-ID: <1@x.example>\r\n\r\nHello\r\n")


def build(message: bytes, *argv, **kwargs):
    return prepare(message, args(*argv), login="cron", hostname="relay.test",
                   date="Tue, 1 Dec 2026 10:00:00 +0000", message_id="<new@relay.test>", **kwargs)


def headers(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def test_t_takes_to_cc_bcc_and_removes_bcc():
    sub = build(MESSAGE, "-t")
    assert sub.recipients == ("to@x.example", "cc@y.example", "hidden@z.example")
    assert b"Bcc" not in sub.data and b"hidden" not in sub.data
    assert sub.data.endswith(b"Subject: hi\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
                             b"Message-ID: <1@x.example>\r\n\r\nHello\r\n")


def test_t_adds_the_command_line_recipients_once():
    sub = build(MESSAGE, "-t", "extra@w.example", "TO@x.example")
    assert sub.recipients == ("extra@w.example", "TO@x.example", "cc@y.example", "hidden@z.example")


def test_with_resent_headers_only_resent_recipients_count():
    message = b"Resent-To: r@x.example\r\nResent-Bcc: rb@x.example\r\n" + MESSAGE
    sub = build(message, "-t")
    assert sub.recipients == ("r@x.example", "rb@x.example")
    assert b"Resent-Bcc" not in sub.data and b"\r\nBcc:" not in sub.data
    assert b"Resent-To: r@x.example" in sub.data


def test_without_t_headers_give_no_recipients():
    sub = build(MESSAGE, "a@x.example")
    assert sub.recipients == ("a@x.example",)
    assert b"Bcc" not in sub.data  # removed with or without -t: it must never leak


def test_no_recipient_is_a_usage_error():
    with pytest.raises(UsageError):
        build(b"Subject: x\r\n\r\nbody\r\n", "-t")
    with pytest.raises(UsageError):
        build(b"To: undisclosed-recipients:;\r\n\r\nbody\r\n", "-t")


def test_missing_from_date_message_id_are_added():
    sub = build(b"Subject: x\r\n\r\nbody\r\n", "-F", "Cron Daemon", "root")
    parsed = headers(sub.data)
    assert parsed["From"] == "Cron Daemon <cron@relay.test>"
    assert b"\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n" in sub.data
    assert parsed["Message-ID"] == "<new@relay.test>"
    assert sub.recipients == ("root@relay.test",)  # unqualified: @hostname
    assert sub.sender == "cron@relay.test"
    assert sub.data.endswith(b"\r\n\r\nbody\r\n")


def test_full_name_is_not_used_when_there_is_a_from():
    sub = build(MESSAGE, "-F", "Someone Else", "a@x.example")
    assert b"Someone Else" not in sub.data and sub.data.count(b"From:") == 1


def test_full_name_from_env_and_non_ascii_is_encoded():
    sub = build(b"\r\nbody\r\n", "-f", "app@x.example", "a@x.example", env_name="Zoë")
    assert headers(sub.data)["From"] == "Zoë <app@x.example>"
    assert sub.data.isascii()


def test_null_sender():
    sub = build(MESSAGE, "-f", "<>", "a@x.example")
    assert sub.sender == ""


def test_recipients_in_one_word_separated_by_commas():
    assert build(MESSAGE, "a@x.example, B <b@y.example>").recipients == ("a@x.example", "b@y.example")


def test_long_lines_are_folded_as_postfix_does():
    line = b"x" * 2500
    sub = build(b"Subject: long\r\n\r\n" + line + b"\r\nend\r\n", "a@x.example")
    body = sub.data.split(b"\r\n\r\n", 1)[1]
    lines = body.split(b"\r\n")
    assert all(len(piece) <= 998 for piece in lines)
    assert lines[0] == b"x" * 998 and lines[1] == b" " + b"x" * 997 and lines[2] == b" " + b"x" * 505
    assert lines[3:] == [b"end", b""]
    assert b"".join(piece.lstrip(b" ") for piece in lines[:3]) == line


@pytest.mark.parametrize("code, text, status", [
    (451, "4.3.0 Temporary failure", 75), (452, "4.3.1 storage", 75),
    (550, "5.7.1 Relaying denied", 77), (552, "5.3.4 too big", 69), (554, "", 69),
])
def test_exit_status_of_a_refusal(code, text, status):
    assert exit_status(code, text) == status


def test_data_error_type_exists_for_bad_input():
    assert issubclass(DataError, Exception)


# -- mailq -----------------------------------------------------------------------

NOW = 1_795_000_000.0


def row(queue_id, address, state=RecipientState.QUEUED, reply=None, worker=0,
        message_state=MessageState.ACTIVE, sender="app@x.example", received=NOW, size=2048):
    return WaitingRecipient(worker, queue_id, sender, received, size, int(message_state), address,
                            int(state), reply)


def test_mailq_empty():
    assert mailq.render([]) == "Mail queue is empty\n"


def test_mailq_lists_like_postqueue():
    rows = [
        row("B", "b@y.example", received=NOW + 60, sender=""),
        row("A", "a1@x.example", RecipientState.DEFERRED, "451 4.7.1 later", worker=0),
        row("A", "a2@z.example", RecipientState.SENDING, worker=1),
        row("A", "a3@z.example", RecipientState.DEFERRED, "451 4.7.1 later", worker=1),
    ]
    text = mailq.render(mailq.entries(rows), localtime=time.gmtime)
    lines = text.splitlines()
    assert lines[0].startswith("-Queue ID-  --Size-- ----Arrival Time----")
    assert lines[1] == "A*              2048 " + time.strftime("%a %b %e %H:%M:%S", time.gmtime(NOW)) \
        + "  app@x.example"
    assert lines[2] == "(451 4.7.1 later)"
    indent = " " * 42  # under the sender
    assert lines[3:5] == [indent + "a1@x.example", indent + "a3@z.example"]
    assert lines[5] == indent + "a2@z.example"
    assert lines[7].startswith("B ") and lines[7].endswith("  MAILER-DAEMON")
    assert lines[-1] == "-- 4 Kbytes in 2 Requests."


def test_mailq_marks_held_parts():
    [entry] = mailq.entries([row("H", "a@x.example", message_state=MessageState.HELD)])
    assert entry.flag == "!"
