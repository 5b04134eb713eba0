"""relay.outcome.classify: real-world replies -> action, scope, class, hard/soft."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.model import Reply
from relay.outcome.classify import Action, FailureClass, Outcome, Scope, Stage, classify, status_code

D, F, B = Action.DELIVERED, Action.DEFERRED, Action.BOUNCED
SITE, MSG, RCPT = Scope.SITE, Scope.MESSAGE, Scope.RECIPIENT
CONN, RCPT_C, TECH, UNK = (
    FailureClass.CONNECTION,
    FailureClass.RECIPIENT,
    FailureClass.TECHNICAL,
    FailureClass.UNKNOWN,
)
HARD, SOFT = True, False


def reply(line: str, mx: str | None = "mx.example.net") -> Reply:
    """A Reply from a one-line server answer, split the way smtp_proto does."""
    code, _, rest = line.partition(" ")
    first, _, text = rest.partition(" ")
    if first.count(".") == 2 and first[0] in "245":
        return Reply(int(code), first, text, mx)
    return Reply(int(code), None, rest, mx)


# (reply line, stage, expected outcome).  Texts are what the big providers
# send (lightly shortened).
CASES = [
    # Delivered.
    ("250 2.0.0 OK  1700000000 a1-20020a05 - gsmtp", Stage.DOT, Outcome(D, MSG, None, SOFT)),
    ("250 2.1.5 Recipient OK", Stage.RCPT, Outcome(D, RCPT, None, SOFT)),
    ("250 Queued mail for delivery", Stage.DOT, Outcome(D, MSG, None, SOFT)),
    # Gmail: no such user.
    (
        "550 5.1.1 The email account that you tried to reach does not exist. Please try "
        "double-checking the recipient's email address for typos or unnecessary spaces.",
        Stage.RCPT,
        Outcome(B, RCPT, RCPT_C, HARD),
    ),
    # Outlook: X.5.0 says nothing, so 550 at RCPT decides.
    (
        "550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302). "
        "[AM1EUR02FT012.eop-EUR02.prod.protection.outlook.com]",
        Stage.RCPT,
        Outcome(B, RCPT, RCPT_C, HARD),
    ),
    ("550 5.5.0 Requested action not taken: mailbox unavailable", Stage.MAIL,
     Outcome(B, MSG, TECH, HARD)),
    # Yahoo: disabled mailbox.
    ("554 5.2.1 The email account that you tried to reach is disabled.", Stage.RCPT,
     Outcome(B, RCPT, RCPT_C, HARD)),
    ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     Stage.RCPT, Outcome(B, RCPT, RCPT_C, HARD)),
    ("553 5.1.3 The recipient address is not a valid RFC-5321 address", Stage.RCPT,
     Outcome(B, RCPT, RCPT_C, HARD)),
    # Mailbox full: temporary at RCPT; a 5xx full mailbox is a soft bounce.
    ("452 4.2.2 The email account that you tried to reach is over quota.", Stage.RCPT,
     Outcome(F, RCPT, RCPT_C, SOFT)),
    ("452 4.2.2 mailbox full", Stage.RCPT, Outcome(F, RCPT, RCPT_C, SOFT)),
    ("552 5.2.2 The email account that you tried to reach is over quota.", Stage.RCPT,
     Outcome(B, RCPT, RCPT_C, SOFT)),
    ("552 5.2.2 Mailbox full", Stage.DOT, Outcome(B, MSG, RCPT_C, SOFT)),
    # Throttling and closing: the site, whatever the stage.
    ("421 4.7.0 Try again later, closing connection. (EHLO) - gsmtp", Stage.EHLO,
     Outcome(F, SITE, TECH, SOFT)),
    ("421 4.7.0 Try again later, closing connection", Stage.RCPT, Outcome(F, SITE, TECH, SOFT)),
    ("421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume "
     "or user complaints", Stage.MAIL, Outcome(F, SITE, TECH, SOFT)),
    ("421 4.3.2 Service shutting down", Stage.DOT, Outcome(F, SITE, TECH, SOFT)),
    ("421 Service not available, closing transmission channel", Stage.DATA,
     Outcome(F, SITE, CONN, SOFT)),
    # 421 with a contradicting 5.x.x enhanced code: still deferred.
    ("421 5.7.0 Too many errors", Stage.RCPT, Outcome(F, SITE, CONN, SOFT)),
    # Spam and policy.
    ("554 5.7.1 spam", Stage.DOT, Outcome(B, MSG, TECH, HARD)),
    ("550 5.7.1 [192.0.2.1] Our system has detected that this message is likely unsolicited "
     "mail. To reduce the amount of spam sent to Gmail, this message has been blocked.",
     Stage.DOT, Outcome(B, MSG, TECH, HARD)),
    ("550 5.7.26 This message does not have authentication information or fails to pass "
     "authentication checks (SPF or DKIM).", Stage.DOT, Outcome(B, MSG, TECH, HARD)),
    ("550 5.7.1 Service unavailable, Client host [192.0.2.1] blocked using Spamhaus.",
     Stage.RCPT, Outcome(B, RCPT, TECH, HARD)),
    ("553 5.7.1 Sender address rejected: not owned by user", Stage.MAIL,
     Outcome(B, MSG, TECH, HARD)),
    ("550 5.1.7 Invalid sender address", Stage.MAIL, Outcome(B, MSG, TECH, HARD)),
    # Greylisting.
    ("451 4.7.1 Greylisted, please try again in 300 seconds", Stage.RCPT,
     Outcome(F, RCPT, TECH, SOFT)),
    ("451 4.7.1 greylisted", Stage.RCPT, Outcome(F, RCPT, TECH, SOFT)),
    ("450 4.2.0 <user@example.com>: Recipient address rejected: Greylisted", Stage.RCPT,
     Outcome(F, RCPT, RCPT_C, SOFT)),
    # Too big.
    ("552 5.3.4 too big", Stage.DOT, Outcome(B, MSG, TECH, HARD)),
    ("552 5.3.4 Your message exceeded Google's message size limits.", Stage.MAIL,
     Outcome(B, MSG, TECH, HARD)),
    ("452 4.3.1 Insufficient system resources", Stage.MAIL, Outcome(F, MSG, TECH, SOFT)),
    ("552 5.3.1 Mail system full", Stage.DOT, Outcome(B, MSG, TECH, SOFT)),
    # Network and routing.
    ("451 4.4.0 DNS temporary failure", Stage.RCPT, Outcome(F, RCPT, CONN, SOFT)),
    ("554 5.4.4 Unable to route", Stage.RCPT, Outcome(B, RCPT, CONN, HARD)),
    ("451 4.4.5 Mail system congestion", Stage.DOT, Outcome(F, MSG, CONN, SOFT)),
    ("554 5.4.5 Mail system congestion", Stage.DOT, Outcome(B, MSG, CONN, SOFT)),
    ("452 4.5.3 Too many recipients", Stage.RCPT, Outcome(F, RCPT, TECH, SOFT)),
    # X.0.0 says nothing: the basic code and stage decide.
    ("550 5.0.0 User unknown", Stage.RCPT, Outcome(B, RCPT, RCPT_C, HARD)),
    ("554 5.0.0 Transaction failed", Stage.DOT, Outcome(B, MSG, TECH, HARD)),
    # Greeting, EHLO and STARTTLS: the site.
    ("554 5.7.1 Service unavailable; client host blocked", Stage.GREETING,
     Outcome(F, SITE, TECH, SOFT)),
    ("554 No SMTP service here", Stage.GREETING, Outcome(F, SITE, CONN, SOFT)),
    ("421 Too many concurrent SMTP connections", Stage.GREETING, Outcome(F, SITE, CONN, SOFT)),
    ("502 5.5.2 Command not recognized", Stage.EHLO, Outcome(B, SITE, TECH, HARD)),
    ("550 Access denied", Stage.EHLO, Outcome(B, SITE, CONN, HARD)),
    ("454 4.7.0 TLS not available due to local problem", Stage.STARTTLS,
     Outcome(F, SITE, TECH, SOFT)),
    ("554 5.7.3 STARTTLS refused", Stage.STARTTLS, Outcome(F, SITE, TECH, SOFT)),
]

# Replies without enhanced codes, at each stage: the basic code decides.
BASIC = [
    ("450 Mailbox busy", Stage.RCPT, Outcome(F, RCPT, RCPT_C, SOFT)),
    ("450 Mailbox busy", Stage.MAIL, Outcome(F, MSG, UNK, SOFT)),
    ("451 Local error in processing", Stage.MAIL, Outcome(F, MSG, TECH, SOFT)),
    ("451 Please try again later", Stage.RCPT, Outcome(F, RCPT, TECH, SOFT)),
    ("451 Temporary local problem", Stage.DOT, Outcome(F, MSG, TECH, SOFT)),
    ("452 Too many recipients", Stage.RCPT, Outcome(F, RCPT, TECH, SOFT)),
    ("452 Insufficient system storage", Stage.MAIL, Outcome(F, MSG, TECH, SOFT)),
    ("500 Syntax error", Stage.MAIL, Outcome(B, MSG, TECH, HARD)),
    ("503 Bad sequence of commands", Stage.DATA, Outcome(B, MSG, TECH, HARD)),
    ("550 No such user here", Stage.RCPT, Outcome(B, RCPT, RCPT_C, HARD)),
    ("550 Sender rejected", Stage.MAIL, Outcome(B, MSG, TECH, HARD)),
    ("550 Message rejected", Stage.DOT, Outcome(B, MSG, TECH, HARD)),
    ("551 User not local; please try <other@example.org>", Stage.RCPT,
     Outcome(B, RCPT, RCPT_C, HARD)),
    ("552 Requested mail action aborted: exceeded storage allocation", Stage.RCPT,
     Outcome(B, RCPT, RCPT_C, SOFT)),
    ("552 Message size exceeds fixed limit", Stage.DOT, Outcome(B, MSG, TECH, HARD)),
    ("553 Requested action not taken: mailbox name not allowed", Stage.RCPT,
     Outcome(B, RCPT, RCPT_C, HARD)),
    ("554 Transaction failed", Stage.DATA, Outcome(B, MSG, TECH, HARD)),
    ("554 Transaction failed", Stage.DOT, Outcome(B, MSG, TECH, HARD)),
    ("556 Domain does not accept mail", Stage.RCPT, Outcome(B, RCPT, RCPT_C, HARD)),
    ("557 Something new", Stage.RCPT, Outcome(B, RCPT, UNK, HARD)),
    ("471 Something odd", Stage.DOT, Outcome(F, MSG, UNK, SOFT)),
    ("500 Command unrecognized", Stage.EHLO, Outcome(B, SITE, CONN, HARD)),
]

# Local failures: code 0, whatever the stage and made-up enhanced code.
LOCAL = [
    (Reply(0, None, "connection refused", "mx.example.net"), Stage.CONNECT),
    (Reply(0, "4.4.1", "connection refused", "mx.example.net"), Stage.CONNECT),
    (Reply(0, "4.4.2", "timeout at greeting", "mx.example.net"), Stage.GREETING),
    (Reply(0, "4.7.5", "TLS handshake failed: WRONG_VERSION_NUMBER", "mx.example.net"), Stage.STARTTLS),
    (Reply(0, "4.7.4", "STARTTLS not offered", "mx.example.net"), Stage.EHLO),
    (Reply(0, "4.4.2", "connection lost: Connection reset by peer", "mx.example.net"), Stage.RCPT),
    (Reply(0, "4.4.2", "timeout at dot", "mx.example.net"), Stage.DOT),
    (Reply(0, "4.5.0", "protocol error: malformed reply line", "mx.example.net"), Stage.MAIL),
    (Reply(0, None, "DNS lookup timed out", None), Stage.LOCAL),
]


@pytest.mark.parametrize("line, stage, expected", CASES + BASIC, ids=lambda v: str(v)[:40])
def test_real_world_replies(line, stage, expected):
    assert classify(reply(line), stage) == expected


@pytest.mark.parametrize("failure, stage", LOCAL, ids=lambda v: str(v)[:40])
def test_local_failures_defer_the_site(failure, stage):
    assert classify(failure, stage) == Outcome(F, SITE, CONN, SOFT)


def test_local_failures_that_know_they_are_permanent_bounce():
    # deliver.resolve makes these up for NXDOMAIN and null MX (RFC 7505).
    nxdomain = Reply(550, "5.1.2", "Host or domain name not found", None)
    null_mx = Reply(556, "5.1.10", "Domain does not accept mail (null MX)", None)
    servfail = Reply(451, "4.4.3", "Temporary DNS failure", None)
    assert classify(nxdomain, Stage.LOCAL) == Outcome(B, SITE, RCPT_C, HARD)
    assert classify(null_mx, Stage.LOCAL) == Outcome(B, SITE, RCPT_C, HARD)
    assert classify(servfail, Stage.LOCAL) == Outcome(F, SITE, CONN, SOFT)


@pytest.mark.parametrize("code", [100, 220, 354, 334, 600, 99, -1, 1000])
def test_codes_outside_the_protocol_defer_the_site(code):
    outcome = classify(Reply(code, None, "what?", "mx"), Stage.RCPT)
    if code // 100 == 2:
        assert outcome.action is D
    else:
        assert outcome == Outcome(F, SITE, UNK, SOFT)


@pytest.mark.parametrize("enhanced", ["5.1.1", " 5.1.1 ", "5.01.001"])
def test_enhanced_code_spelling(enhanced):
    assert classify(Reply(550, enhanced, "no", "mx"), Stage.DOT).failure_class is RCPT_C


@pytest.mark.parametrize("enhanced", ["4.1.1", "5.1", "5.1.1.1", "x.1.1", "5.1.1234", "", "2.1.1"])
def test_malformed_or_contradicting_enhanced_codes_are_ignored(enhanced):
    # At DOT, 550 without a usable enhanced code is technical; 5.1.1 would be recipient.
    assert classify(Reply(550, enhanced, "no", "mx"), Stage.DOT) == Outcome(B, MSG, TECH, HARD)


def test_the_421_rule_holds_at_every_stage():
    for stage in Stage:
        outcome = classify(Reply(421, "4.7.0", "closing", "mx"), stage)
        assert (outcome.action, outcome.scope, outcome.hard) == (F, SITE, False)


def test_scope_by_stage_for_an_ordinary_failure():
    expected = {
        Stage.CONNECT: SITE, Stage.GREETING: SITE, Stage.EHLO: SITE, Stage.STARTTLS: SITE,
        Stage.LOCAL: SITE, Stage.MAIL: MSG, Stage.DATA: MSG, Stage.DOT: MSG, Stage.RCPT: RCPT,
    }
    assert set(expected) == set(Stage)
    for stage, scope in expected.items():
        assert classify(Reply(450, "4.2.1", "try later", "mx"), stage).scope is scope


@pytest.mark.parametrize(
    "r, status",
    [
        (Reply(550, "5.1.1", "x", "mx"), "5.1.1"),
        (Reply(550, "5.01.001", "x", "mx"), "5.1.1"),
        (Reply(550, None, "x", "mx"), "5.0.0"),
        (Reply(450, None, "x", "mx"), "4.0.0"),
        (Reply(550, "4.2.2", "x", "mx"), "5.0.0"),
        (Reply(0, None, "refused", "mx"), "4.4.0"),
        (Reply(0, "4.4.1", "refused", "mx"), "4.4.1"),
        (Reply(354, None, "go ahead", "mx"), "4.5.0"),
        (Reply(250, "2.0.0", "ok", "mx"), "2.0.0"),
    ],
)
def test_status_code(r, status):
    assert status_code(r) == status


@settings(max_examples=300, deadline=None)
@given(
    code=st.one_of(st.just(0), st.integers(200, 599), st.integers(-5, 1200)),
    enhanced=st.one_of(st.none(), st.from_regex(r"[0-9]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
                       st.text(max_size=8)),
    stage=st.sampled_from(list(Stage)),
)
def test_classify_is_total_and_consistent(code, enhanced, stage):
    """Every input gets an outcome, and the invariants of the table hold."""
    outcome = classify(Reply(code, enhanced, "text", "mx"), stage)
    if 200 <= code <= 299:
        assert outcome.action is D and outcome.failure_class is None
    else:
        assert outcome.action in (F, B) and outcome.failure_class is not None
    if outcome.action is not B:
        assert outcome.hard is False
    if outcome.action is B:
        assert 500 <= code <= 599
    if code in (0, 421) or stage not in (Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.DOT):
        assert outcome.scope is SITE
    assert status_code(Reply(code, enhanced, "text", "mx"))[0] in "245"
