"""relay.outcome.bounce: RFC 3464 DSNs, read back with the stdlib email parser."""

from __future__ import annotations

import ast
import email
import email.policy
import email.utils
import os
import re
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.model import Reply
from relay.outcome import bounce
from relay.outcome.bounce import MAX_HEADERS, FailedRecipient, build_dsn, original_headers, should_bounce

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
ARRIVAL = NOW - 3 * 86400

ORIGINAL = (
    b"Received: from app.example.com (app.example.com [192.0.2.10])\r\n"
    b"\tby relay.example.com with ESMTP id 0123456789ABC01234\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, carol@example.org\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <abc123@example.com>\r\n"
    b"\r\n"
    b"SECRET BODY LINE 1\r\n"
    b"Received: not a header, this is the body\r\n"
    b"SECRET BODY LINE 3\r\n"
)

GMAIL_NO_USER = Reply(
    550, "5.1.1", "The email account that you tried to reach does not exist.", "gmail-smtp-in.l.google.com"
)
FULL = Reply(452, "4.2.2", "The email account that you tried to reach is over quota.", "mx.example.org")


def build(recipients, **overrides) -> bytes:
    arguments = dict(
        reporting_mta="relay.example.com",
        queue_id="0123456789ABC01234",
        sender="alice@example.com",
        arrival=ARRIVAL,
        recipients=recipients,
        original=ORIGINAL,
        now=NOW,
    )
    arguments.update(overrides)
    return build_dsn(**arguments)


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def failed(address="bob@example.net", reply=GMAIL_NO_USER, action="failed"):
    return FailedRecipient(address=address, reply=reply, action=action, last_attempt=NOW - 60)


@pytest.fixture
def dsn() -> bytes:
    return build([failed(), failed("carol@example.org", FULL, "failed")])


# -- structure -------------------------------------------------------------------


def test_multipart_report_with_three_parts(dsn):
    message = parse(dsn)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message.defects == [] and all(p.defects == [] for p in parts)


def test_top_level_headers(dsn):
    message = parse(dsn)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert message["To"].addresses[0].addr_spec == "alice@example.com"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"].datetime == email.utils.parsedate_to_datetime("Tue, 14 Nov 2023 22:13:20 +0000")
    assert re.fullmatch(r"<[^<>@\s]+@relay\.example\.com>", message["Message-ID"])


def test_crlf_everywhere(dsn):
    assert dsn.endswith(b"\r\n")
    assert b"\n" not in dsn.replace(b"\r\n", b"")
    assert b"\r" not in dsn.replace(b"\r\n", b"")
    assert max(len(line) for line in dsn.split(b"\r\n")) <= 998


def test_delivered_as_7bit_when_everything_is_ascii(dsn):
    assert dsn.isascii()
    assert parse(dsn)["Content-Transfer-Encoding"] == "7bit"


# -- the human part ------------------------------------------------------------------


def test_human_part_lists_each_recipient_and_the_remote_reply(dsn):
    text = list(parse(dsn).iter_parts())[0].get_content()
    assert "relay.example.com" in text
    assert (
        "<bob@example.net>: host gmail-smtp-in.l.google.com said: 550 5.1.1 "
        "The email account that you tried to reach does not exist." in text
    )
    assert "<carol@example.org>: host mx.example.org said: 452 4.2.2" in text


def test_local_failure_is_explained_without_a_fake_code():
    refused = Reply(0, "4.4.1", "connection refused", "mx.example.net")
    text = list(parse(build([failed(reply=refused)])).iter_parts())[0].get_content()
    assert "<bob@example.net>: delivery failed talking to mx.example.net: connection refused" in text
    assert "0 4.4.1" not in text


# -- the delivery-status part ----------------------------------------------------------


def status_blocks(data: bytes):
    part = list(parse(data).iter_parts())[1]
    assert part.get_content_type() == "message/delivery-status"
    return part.get_payload()


def test_per_message_fields(dsn):
    per_message = status_blocks(dsn)[0]
    assert per_message["Reporting-MTA"] == "dns; relay.example.com"
    assert per_message["X-Queue-ID"] == "0123456789ABC01234"
    assert per_message["Arrival-Date"] == "Sat, 11 Nov 2023 22:13:20 +0000"


def test_per_recipient_fields(dsn):
    blocks = status_blocks(dsn)
    assert len(blocks) == 3
    bob, carol = blocks[1], blocks[2]
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; gmail-smtp-in.l.google.com"
    assert bob["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 The email account that you tried to reach does not exist."
    )
    assert bob["Last-Attempt-Date"] == "Tue, 14 Nov 2023 22:12:20 +0000"
    # An expired deferral keeps its 4.x.x status, as Postfix does.
    assert carol["Final-Recipient"] == "rfc822; carol@example.org"
    assert carol["Status"] == "4.2.2"


def expired(address="carol@example.org", reply=FULL):
    return FailedRecipient(address=address, reply=reply, action="failed", last_attempt=NOW - 60,
                           expired=True)


def test_expired_recipient_says_the_message_expired():
    data = build([failed(), expired()])
    text = list(parse(data).iter_parts())[0].get_content()
    assert ("<carol@example.org>: message expired after 3 days in the queue; the last attempt:"
            " host mx.example.org said: 452 4.2.2") in text
    assert "<bob@example.net>: host gmail-smtp-in.l.google.com said: 550 5.1.1" in text
    assert "expired" not in text.split("<bob@example.net>:")[1].splitlines()[0]
    bob, carol = status_blocks(data)[1:]
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.2.2"  # the last reply's, as Postfix keeps it
    assert carol["Remote-MTA"] == "dns; mx.example.org"
    assert carol["Diagnostic-Code"] == (
        "X-Relay; message expired after 3 days in the queue, last reply: 452 4.2.2 The email"
        " account that you tried to reach is over quota. from mx.example.org")
    assert bob["Diagnostic-Code"].startswith("smtp; 550 5.1.1")


def test_expiry_after_a_local_failure_quotes_its_text():
    refused = Reply(0, "4.4.1", "connection refused", "mx.example.net")
    [_, block] = status_blocks(build([expired("bob@example.net", refused)]))
    assert block["Diagnostic-Code"] == (
        "X-Relay; message expired after 3 days in the queue, last reply: connection refused"
        " from mx.example.net")


def test_status_without_enhanced_code_comes_from_the_basic_code():
    blocks = status_blocks(build([failed(reply=Reply(554, None, "Transaction failed", "mx.example.net"))]))
    assert blocks[1]["Status"] == "5.0.0"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 554 Transaction failed"


def test_local_failure_has_no_smtp_diagnostic():
    dns = Reply(550, "5.1.2", "Host or domain name not found", None)  # made up by resolve
    refused = Reply(0, "4.4.1", "connection refused", "mx.example.net")
    blocks = status_blocks(build([failed(reply=dns), failed("carol@example.org", refused)]))
    assert "Remote-MTA" not in blocks[1]
    assert blocks[1]["Status"] == "5.1.2"
    assert blocks[1]["Diagnostic-Code"] == "X-Relay; Host or domain name not found"
    assert blocks[2]["Remote-MTA"] == "dns; mx.example.net"
    assert blocks[2]["Status"] == "4.4.1"
    assert blocks[2]["Diagnostic-Code"] == "X-Relay; connection refused"


def test_multiline_and_hostile_reply_text_stays_in_its_field():
    hostile = Reply(
        550, "5.7.1", "Rejected\nsecond line\r\nFinal-Recipient: rfc822; forged@x\x00\x1b[31m", "mx"
    )
    blocks = status_blocks(build([failed(reply=hostile)]))
    assert len(blocks) == 2
    diagnostic = blocks[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 Rejected second line Final-Recipient:")
    assert "\x00" not in diagnostic and "\x1b" not in diagnostic


def test_long_reply_text_is_folded_and_bounded():
    long = Reply(550, "5.7.1", " ".join(["word"] * 600), "mx.example.net")
    dsn = build([failed(reply=long)])
    assert max(len(line) for line in dsn.split(b"\r\n")) <= 998
    diagnostic = status_blocks(dsn)[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 word word") and diagnostic.endswith("...")
    assert len(diagnostic) <= bounce.MAX_DIAGNOSTIC + len("smtp; ")


def test_non_ascii_reply_text_is_escaped_in_the_report_and_readable_in_the_text():
    german = Reply(550, "5.1.1", "Empfänger unbekannt", "mx.example.de")
    dsn = build([failed("bob@example.de", german)])
    assert dsn.isascii()
    parts = list(parse(dsn).iter_parts())
    assert "550 5.1.1 Empfänger unbekannt" in parts[0].get_content()
    assert parts[1].get_payload()[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf\\x{E4}nger unbekannt"


def test_non_ascii_recipient_uses_the_utf8_address_type():
    dsn = build([failed("jörg+news@bücher.example", GMAIL_NO_USER), failed()])
    assert dsn.isascii()  # the report and text parts stay 7-bit (RFC 6533 xtext, QP)
    blocks = status_blocks(dsn)
    # RFC 6533 utf-8-addr-xtext: non-ASCII and "+", "=", "\" as \x{HEX}.
    assert blocks[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}news@b\\x{FC}cher.example"
    assert blocks[2]["Final-Recipient"] == "rfc822; bob@example.net"
    text = list(parse(dsn).iter_parts())[0].get_content()
    assert "<jörg+news@bücher.example>: host gmail-smtp-in.l.google.com said" in text


# -- the original headers -------------------------------------------------------------------


def test_original_headers_included_and_body_excluded(dsn):
    part = list(parse(dsn).iter_parts())[2]
    headers = part.get_content()
    assert "Subject: Quarterly numbers" in headers
    assert "Message-ID: <abc123@example.com>" in headers
    assert "\tby relay.example.com with ESMTP" in headers  # folded line kept
    assert b"SECRET BODY" not in dsn
    assert b"not a header, this is the body" not in dsn


def test_original_headers_section():
    assert original_headers(ORIGINAL) == ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2]
    assert original_headers(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\r\nB: 2\r\n"
    assert original_headers(b"A: 1\r\nB: 2") == b"A: 1\r\nB: 2\r\n"  # no body, no final CRLF
    assert original_headers(b"\r\nbody only\r\n") == b""
    assert original_headers(b"") == b""


def test_original_headers_are_bounded_and_cut_between_fields():
    folded = b"X-Long: start\r\n" + b"\tcontinued\r\n" * 20
    original = b"Subject: hi\r\n" + folded * 2000 + b"\r\nbody\r\n"
    head = original_headers(original)
    assert len(head) <= MAX_HEADERS
    assert head.startswith(b"Subject: hi\r\n") and head.endswith(b"\tcontinued\r\n")
    # Whole fields only: every X-Long field has all its 20 continuation lines.
    assert head.count(b"\tcontinued\r\n") == 20 * head.count(b"X-Long: start\r\n")
    dsn = build([failed()], original=original)
    assert len(dsn) < MAX_HEADERS + 8 * 1024
    assert b"body" not in dsn.split(b"\r\n\r\n", 1)[1].split(b"Undelivered Message Headers")[1]


def test_utf8_original_headers_use_message_global_headers():
    original = "Subject: Grüße\r\nFrom: jörg@bücher.example\r\n\r\nbody\r\n".encode("utf-8")
    dsn = build([failed()], original=original)
    message = parse(dsn)
    assert message["Content-Transfer-Encoding"] == "8bit"
    part = list(message.iter_parts())[2]
    assert part.get_content_type() == "message/global-headers"
    assert "Subject: Grüße".encode() in dsn


def test_boundary_never_occurs_in_the_parts():
    first = build([failed()])
    boundary = parse(first).get_boundary()
    sneaky = b"X-Sneaky: --" + boundary.encode() + b"\r\n" + ORIGINAL
    message = parse(build([failed()], original=sneaky))
    assert message.get_boundary() != boundary
    assert len(list(message.iter_parts())) == 3


# -- delayed notices, ids, arguments ---------------------------------------------------


def test_delayed_notice():
    dsn = build([failed("carol@example.org", FULL, "delayed")], delayed=True)
    message = parse(dsn)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert status_blocks(dsn)[1]["Action"] == "delayed"
    text = list(message.iter_parts())[0].get_content()
    assert "WARNING ONLY" in text and "still being retried" in text


def test_message_id_is_unique_per_notice_and_stable_per_input():
    def message_id(recipients=(failed(),), **overrides):
        return parse(build(list(recipients), **overrides))["Message-ID"]

    ids = {
        message_id(),
        message_id(now=NOW + 1),
        message_id(queue_id="0123456789ABC09999"),
        message_id(delayed=True),
        message_id(recipients=[failed("other@example.net")]),
    }
    assert len(ids) == 5
    assert message_id() == message_id()


@pytest.mark.parametrize(
    "bad",
    [
        dict(recipients=[]),
        dict(recipients=[failed(action="bounced")]),
        dict(sender="alice@example.com\r\nBcc: victim@example.net"),
        dict(sender=""),  # never a DSN for <>
        dict(sender="MAILER-DAEMON@example.net"),
        dict(recipients=[failed("bob@example.net\r\nX: y")]),
    ],
)
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        build([failed()] if "recipients" not in bad else bad.pop("recipients"), **bad)


@settings(max_examples=60, deadline=None)
@given(
    address=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=1,
                    max_size=40),
    text=st.text(max_size=300),
    code=st.sampled_from([0, 421, 450, 550, 554]),
)
def test_any_reply_and_address_give_a_parsable_dsn(address, text, code):
    dsn = build([failed(address, Reply(code, None, text, "mx.example.net"))])
    assert b"\n" not in dsn.replace(b"\r\n", b"")
    message = parse(dsn)
    assert len(list(message.iter_parts())) == 3
    blocks = status_blocks(dsn)
    assert len(blocks) == 2 and blocks[1]["Action"] == "failed"


# -- who gets a DSN ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender, expected",
    [
        ("", False),
        ("<>", False),
        ("MAILER-DAEMON@relay.example.com", False),
        ("mailer-daemon@example.net", False),
        ("MAILER-DAEMON", False),
        ('"MAILER-DAEMON"@example.net', False),
        ("alice@example.com", True),
        ("postmaster@example.com", True),
        ("owner-list@lists.example.org", True),  # list bounce processing needs these
        ("list-request@lists.example.org", True),
        ("daemon@example.com", True),
    ],
)
def test_should_bounce(sender, expected):
    assert should_bounce(sender) is expected


# -- no dependencies ---------------------------------------------------------------------


def test_bounce_needs_only_the_standard_library():
    """DSNs are plain RFC 3464 text: no dkimpy, no third-party MIME library."""
    package = os.path.dirname(bounce.__file__)
    for name in ("bounce.py", "classify.py"):
        with open(os.path.join(package, name), encoding="utf-8") as file:
            tree = ast.parse(file.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root == "relay" or root in sys.stdlib_module_names, f"{name} imports {root}"
