"""Reply classification (pure): what one SMTP reply means for delivery.

Input: a ``Reply`` (relay.model; code 0 for a local failure such as a
refused connection, a timeout, a TLS failure) and the ``Stage`` it came at.
Output: an ``Outcome`` — the action (delivered, deferred, bounced), the scope
it applies to (site, message, recipient), the failure class as PostmanQ
names them (connection, recipient, technical, unknown) and whether a bounce
is hard or soft.

Action, from the basic code (RFC 5321 4.2.1):

    2xx                         delivered
    4xx, code 0                 deferred (retried on the schedule)
    5xx                         bounced, except at CONNECT / GREETING /
                                STARTTLS: deferred (see below)
    anything else (1xx, 3xx)    deferred: the server broke the protocol

Scope, as Postfix smtp_trouble.c splits it:

    421 at any stage            SITE (RFC 5321 3.8: the server is closing)
    code 0 at any stage         SITE (the connection is gone or unusable)
    CONNECT, GREETING, EHLO,
      STARTTLS, LOCAL           SITE      try the next MX, throttle the destination
    MAIL, DATA, DOT             MESSAGE   every recipient of the transaction
    RCPT                        RECIPIENT that recipient only

For SITE, the caller first tries the destination's next MX host; the action
is what happens to the recipients when no host is left.

Failure class, refined by the enhanced status code (RFC 3463 section 3) when
the reply carries a valid one whose class digit matches the basic code.
The subject and detail mean the same in 4.x.x and 5.x.x, so the table is
keyed by "subject.detail" (then "subject.*"), like asyncpg's SQLSTATE
table; hard/soft matters only for a bounce:

    X.1.7  X.1.8                TECHNICAL   the *sender's* address is bad
    X.1.*                       RECIPIENT   hard: no such user (1.1), no such
                                            domain (1.2), bad syntax (1.3),
                                            moved (1.6), null MX (1.10, RFC 7505)
    X.2.2                       RECIPIENT   soft: mailbox full
    X.2.3                       TECHNICAL   message longer than the mailbox allows
    X.2.*                       RECIPIENT   hard: mailbox disabled (2.1), ...
    X.3.1                       TECHNICAL   soft: mail system full
    X.3.*                       TECHNICAL   message too big (3.4), misconfigured, ...
    X.4.5                       CONNECTION  soft: mail system congestion
    X.4.*                       CONNECTION  network and routing (no answer, bad
                                            connection, routing loop, ...)
    X.5.*                       TECHNICAL   protocol (syntax, too many recipients)
    X.6.*                       TECHNICAL   message content or media
    X.7.*                       TECHNICAL   security or policy (spam, blocklist, auth)
    X.0.*, X.5.0, X.6.0,
      none, malformed           from the basic code and the stage, below

Without a usable enhanced code:

    code 0                      CONNECTION  soft (whatever enhanced code the
                                            session made up)
    CONNECT ... STARTTLS, LOCAL CONNECTION  the site could not be talked to
    421                         CONNECTION
    450 at RCPT                 RECIPIENT   mailbox busy or unavailable
    550 551 553 at RCPT         RECIPIENT   hard: no such user, not local, bad name
    552 at RCPT                 RECIPIENT   soft: exceeded storage allocation
    556                         RECIPIENT   hard: domain accepts no mail (RFC 7505)
    451 452 455, 500-504,
      550-555 elsewhere         TECHNICAL   local error (greylisting), storage,
                                            syntax, sender refused, too big,
                                            transaction failed
    anything else               UNKNOWN

Two departures from "5xx bounces", both Postfix's defaults: a 5xx greeting
does not bounce (``smtp_skip_5xx_greeting = yes``: RFC 5321 3.1 has the
client try another host, and a host that refuses to talk is a site problem,
not a verdict on the mail), and a refused STARTTLS defers (Postfix reports
it with a made-up 4.7.x status).  A reply code outside 2xx/4xx/5xx is a
protocol violation; Postfix bounces it as 5.5.0, we defer it, so a broken
server or middlebox cannot bounce a whole queue at once.  The 354 reply to
DATA is that step's success, not an outcome: do not classify it.

Local failures that know they are permanent (resolve: NXDOMAIN ``550
5.1.2``, null MX ``556 5.1.10``) carry a real code at Stage.LOCAL and are
classified like any reply, with scope SITE.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from relay.model import Reply, Stage

__all__ = ["Action", "FailureClass", "Outcome", "Scope", "Stage", "classify", "status_code"]


class Action(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


class Scope(enum.Enum):
    SITE = "site"  # the destination: try the next MX, throttle
    MESSAGE = "message"  # every recipient of the transaction
    RECIPIENT = "recipient"  # one recipient


class FailureClass(enum.Enum):
    CONNECTION = "connection"
    RECIPIENT = "recipient"
    TECHNICAL = "technical"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    scope: Scope
    failure_class: FailureClass | None  # None when delivered
    hard: bool  # a hard bounce; False unless the action is BOUNCED


_CONNECTION = FailureClass.CONNECTION
_RECIPIENT = FailureClass.RECIPIENT
_TECHNICAL = FailureClass.TECHNICAL
_UNKNOWN = FailureClass.UNKNOWN

# (failure class, hard if it bounces), by enhanced "subject.detail", then
# "subject.*".  None, and X.0.x by its absence, mean "says nothing, let the
# basic code decide": X.5.0 and X.6.0 are "other protocol / content status",
# and Outlook answers a missing mailbox with "550 5.5.0 ... mailbox
# unavailable" at RCPT, which the basic code reads right.
_BY_STATUS: dict[str, tuple[FailureClass, bool] | None] = {
    "1.7": (_TECHNICAL, True),
    "1.8": (_TECHNICAL, True),
    "1.*": (_RECIPIENT, True),
    "2.2": (_RECIPIENT, False),
    "2.3": (_TECHNICAL, True),
    "2.*": (_RECIPIENT, True),
    "3.1": (_TECHNICAL, False),
    "3.*": (_TECHNICAL, True),
    "4.5": (_CONNECTION, False),
    "4.*": (_CONNECTION, True),
    "5.0": None,
    "5.*": (_TECHNICAL, True),
    "6.0": None,
    "6.*": (_TECHNICAL, True),
    "7.*": (_TECHNICAL, True),
}

# (failure class, hard if it bounces), by (basic code, stage), then
# (basic code, None) for any stage.
_BY_CODE: dict[tuple[int, Stage | None], tuple[FailureClass, bool]] = {
    (421, None): (_CONNECTION, True),
    (450, Stage.RCPT): (_RECIPIENT, True),
    (451, None): (_TECHNICAL, True),
    (452, None): (_TECHNICAL, True),
    (455, None): (_TECHNICAL, True),
    **{(code, None): (_TECHNICAL, True) for code in range(500, 505)},
    (550, Stage.RCPT): (_RECIPIENT, True),
    (551, Stage.RCPT): (_RECIPIENT, True),
    (552, Stage.RCPT): (_RECIPIENT, False),
    (553, Stage.RCPT): (_RECIPIENT, True),
    **{(code, None): (_TECHNICAL, True) for code in range(550, 556)},
    (556, None): (_RECIPIENT, True),  # RFC 7505: the domain accepts no mail
}

# Stages before a transaction: a failure here is the site's.
_SITE_STAGES = frozenset({Stage.CONNECT, Stage.GREETING, Stage.EHLO, Stage.STARTTLS, Stage.LOCAL})
# Stages where a 5xx defers instead of bouncing (see the module docstring).
_SOFT_5XX_STAGES = frozenset({Stage.CONNECT, Stage.GREETING, Stage.STARTTLS})
_MESSAGE_STAGES = frozenset({Stage.MAIL, Stage.DATA, Stage.DOT})

_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})")  # RFC 3463 2


def _enhanced(reply: Reply) -> tuple[str, str] | None:
    """(subject, detail) of the reply's enhanced code, or None when it has
    none, it is malformed, or its class contradicts the basic code: the
    basic code is what an RFC 5321 client acts on, and Postfix and our
    own reply parser (deliver.smtp_proto) drop such codes too."""
    if not reply.enhanced:
        return None
    match = _ENHANCED.fullmatch(reply.enhanced.strip())
    if match is None or int(match.group(1)) != _class_digit(reply.code):
        return None
    # int() drops leading zeros: "5.01.001" is 5.1.1.
    return str(int(match.group(2))), str(int(match.group(3)))


def _class_digit(code: int) -> int | None:
    """RFC 3463 class for a basic code; a local failure (code 0) is transient."""
    if code == 0:
        return 4
    return code // 100 if code // 100 in (2, 4, 5) else None


def status_code(reply: Reply) -> str:
    """The RFC 3463 status for a reply, as a DSN's Status field wants it:
    the reply's own enhanced code when usable, otherwise "X.0.0" from the
    basic code; "4.4.0" for a local failure, "4.5.0" for a reply code
    outside 2xx/4xx/5xx (a protocol error we retry)."""
    parsed = _enhanced(reply)
    klass = _class_digit(reply.code)
    if parsed is not None:
        return f"{klass}.{parsed[0]}.{parsed[1]}"
    if reply.code == 0:
        return "4.4.0"
    if klass is None:
        return "4.5.0"
    return f"{klass}.0.0"


def _scope(reply: Reply, stage: Stage) -> Scope:
    if reply.code in (0, 421) or stage in _SITE_STAGES or _class_digit(reply.code) is None:
        return Scope.SITE
    if stage in _MESSAGE_STAGES:
        return Scope.MESSAGE
    return Scope.RECIPIENT


def _failure(reply: Reply, stage: Stage) -> tuple[FailureClass, bool]:
    if reply.code == 0:
        return _CONNECTION, False
    parsed = _enhanced(reply)
    if parsed is not None:
        subject, detail = parsed
        key = f"{subject}.{detail}"
        rule = _BY_STATUS[key] if key in _BY_STATUS else _BY_STATUS.get(f"{subject}.*")
        if rule is not None:
            return rule
    if stage in _SITE_STAGES:
        return _CONNECTION, True
    return _BY_CODE.get((reply.code, stage)) or _BY_CODE.get((reply.code, None)) or (_UNKNOWN, True)


def classify(reply: Reply, stage: Stage) -> Outcome:
    """The outcome of one reply at one stage (see the module docstring)."""
    scope = _scope(reply, stage)
    klass = _class_digit(reply.code)
    if klass == 2:
        return Outcome(Action.DELIVERED, scope, None, False)
    failure_class, hard = _failure(reply, stage)
    if klass == 5 and stage not in _SOFT_5XX_STAGES:
        return Outcome(Action.BOUNCED, scope, failure_class, hard)
    if klass is None:
        failure_class = _UNKNOWN
    return Outcome(Action.DEFERRED, scope, failure_class, False)
