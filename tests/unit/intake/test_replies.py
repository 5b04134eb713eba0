"""relay.intake.replies: the catalogue and enhance()."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake import replies
from relay.intake.replies import _DEFAULTS, _REWRITES, enhance

ENHANCED = re.compile(r"^(\d)\d\d[ -]([245])\.\d{1,3}\.\d{1,3} \S")

# Replies aiosmtpd 1.4 sends on its own (aiosmtpd/smtp.py), written out in full.
AIOSMTPD_REPLIES = [
    "250 OK",
    "221 Bye",
    "500 Command line too long",
    "500 Line too long (see RFC5321 4.5.3.1.6)",
    "500 Error: bad syntax",
    "500 Error: strict ASCII mode",
    '500 Error: command "FOO" not recognized',
    "500 Error: command 'AUTH' not recognized",
    "501 Syntax: MAIL FROM: <address>",
    "501 Syntax: RCPT TO: <address>",
    "501 Error: SMTPUTF8 disabled",
    "501 Error: SMTPUTF8 takes no arguments",
    "501 Error: BODY can only be one of 7BIT, 8BITMIME",
    "501 Syntax: HELO hostname",
    "501 Syntax: EHLO hostname",
    "501 Syntax: QUIT",
    "501 Syntax: STARTTLS",
    "501 Syntax: RSET",
    "501 Syntax: DATA",
    "501 Syntax: VRFY <address>",
    "501 Not enough value",
    "501 Too many values",
    "502 Could not VRFY x",
    "502 EXPN not implemented",
    "503 Error: nested MAIL command",
    "503 Error: need MAIL command",
    "503 Error: need RCPT command",
    "503 Error: send HELO first",
    "503 Error: send EHLO first",
    "503 Already authenticated",
    "530 Must issue a STARTTLS command first",
    "552 Error: message size exceeds fixed maximum message size",
    "552 Error: Too much mail data",
    "555 MAIL FROM parameters not recognized or not implemented",
    "555 RCPT TO parameters not recognized or not implemented",
    "554 Command refused due to lack of security",
    "454 TLS not available",
    "252 Cannot VRFY user, but will accept message and attempt delivery",
    "250 Syntax: MAIL FROM: <address>",
    "214 Supported commands: DATA EHLO HELO",
]


def catalogue() -> dict[str, str]:
    return {
        name: value
        for name, value in vars(replies).items()
        if name.startswith("S") and name[1:4].isdigit() and isinstance(value, str)
    }


@pytest.mark.parametrize("name, reply", sorted(catalogue().items()))
def test_every_catalogue_reply_has_an_enhanced_code_of_its_class(name, reply):
    match = ENHANCED.match(reply)
    assert match, reply
    assert match.group(1) == match.group(2)  # 4xx -> 4.x.x, 5xx -> 5.x.x
    assert name[1:4] == reply[:3]  # S550_... holds a 550 reply
    assert enhance(reply) == reply


def test_queued_reply():
    assert replies.queued("ABC123") == "250 2.0.0 OK queued as ABC123"
    assert enhance(replies.queued("ABC123")) == replies.queued("ABC123")


@pytest.mark.parametrize("start, ours", _REWRITES, ids=[s for s, _ in _REWRITES])
def test_every_rewrite_target_has_an_enhanced_code(start, ours):
    match = ENHANCED.match(ours)
    assert match, ours
    assert ours[:3] == start[:3]  # a rewrite never changes the reply code
    assert match.group(1) == match.group(2)


_LIVE_REWRITES = [(s, o) for s, o in _REWRITES if not replies._HAS_ENHANCED.match(s)]
_DEAD_REWRITES = [(s, o) for s, o in _REWRITES if replies._HAS_ENHANCED.match(s) and s != o]


@pytest.mark.parametrize("start, ours", _LIVE_REWRITES, ids=[s for s, _ in _LIVE_REWRITES])
def test_rewrites_apply(start, ours):
    assert enhance(start) == ours
    assert enhance(start + " and more text") == ours


@pytest.mark.parametrize("start, ours", _DEAD_REWRITES, ids=[s for s, _ in _DEAD_REWRITES])
def test_rewrites_of_already_enhanced_replies_apply(start, ours):
    assert enhance(start) == ours


@pytest.mark.parametrize("reply", AIOSMTPD_REPLIES)
def test_every_aiosmtpd_reply_gets_an_enhanced_code(reply):
    out = enhance(reply)
    match = ENHANCED.match(out)
    assert match, out
    assert out[:3] == reply[:3]
    assert match.group(1) == match.group(2)


@pytest.mark.parametrize(
    "reply",
    [
        "250 2.1.5 Recipient OK",
        "550 5.7.1 Relaying denied",
        "451 4.3.0 Temporary failure",
        "421 4.7.0 MAIL sent too many times",
        "502 5.5.1 Too many unrecognized commands, goodbye.",
        "538 5.7.11 Encryption required for requested authentication mechanism",
        "504 5.5.4 Unrecognized authentication type",
        "235 2.7.0 Authentication successful",
        "535 5.7.8 Authentication credentials invalid",
        "501 5.5.2 Can't decode base64",
        "250-2.0.0 continued",
    ],
)
def test_replies_with_an_enhanced_code_are_unchanged(reply):
    assert enhance(reply) == reply


@pytest.mark.parametrize(
    "reply",
    [
        "220 relay.example ESMTP relay",
        "220 Ready to start TLS",
        "220-relay.example ESMTP",
        "334 VXNlcm5hbWU6",
        "334 ",
        "354 End data with <CR><LF>.<CR><LF>",
    ],
)
def test_greeting_and_intermediate_replies_are_unchanged(reply):
    assert enhance(reply) == reply


@pytest.mark.parametrize("code, default", sorted(_DEFAULTS.items()))
def test_defaults_by_code(code, default):
    assert default[0] == code[0]
    assert enhance(f"{code} Something happened") == f"{code} {default} Something happened"
    assert enhance(f"{code}-Something happened") == f"{code}-{default} Something happened"


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("451 Local error", "451 4.3.0 Local error"),
        ("550 No such user", "550 5.0.0 No such user"),
        ("535 Authentication failed", "535 5.7.8 Authentication failed"),
        ("452 Too many", "452 4.3.1 Too many"),
        ("250 ", "250 2.0.0"),
    ],
)
def test_default_examples(reply, expected):
    assert enhance(reply) == expected


@pytest.mark.parametrize("reply", ["299 Odd", "599 Odd", "250", "25", "", "hello", "250Xtext"])
def test_unknown_or_malformed_replies_are_unchanged(reply):
    assert enhance(reply) == reply


@settings(max_examples=100, deadline=None)
@given(code=st.sampled_from(sorted(_DEFAULTS)), text=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
def test_enhance_property(code, text):
    out = enhance(f"{code} {text}")
    assert out[:3] == code
    assert re.match(r"^\d{3} [245]\.\d{1,3}\.\d{1,3}( |$)", out), out
    assert enhance(out) == out  # idempotent
