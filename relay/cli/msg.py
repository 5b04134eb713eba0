"""relayctl show, grep and report: one message, one recipient's history,
and the failures of a recent window (postcat, PostmanQ's pmq-grep and
pmq-report).

Input: every worker's spool, read-only (``relay.cli.spoolread``).  Each
verb takes ``--json`` and ``--offline`` (read the spool of a stopped
relay, e.g. after a crash; without it a relay that does not run is an
error).  Output: an aligned table on stdout, or one JSON object with
``--json``.  Times in JSON are Unix seconds (as in the delivery event log);
in tables, local ISO 8601.  Errors are one line on stderr, exit status 1
(2 for a bad configuration or bad arguments).

An event (``EVENT`` below) in JSON:

    {"time": 1714557600.12, "worker": 0, "queue_id": "0005F...",
     "recipient": "user@example.com", "destination": "mx1.example.com,mx2.example.com",
     "mx": "mx1.example.com", "source_ip": "192.0.2.1", "tls": true,
     "code": 451, "enhanced": "4.7.1", "text": "try again later",
     "outcome": "deferred",        # delivered|deferred|bounced|requeued|dropped|deleted|crashed|quarantined
     "class": "recipient",         # connection|recipient|technical|unknown|null
     "latency": 0.215}

``relayctl show ID [--body]``: the envelope, each recipient's state and the
message's events, merged across the spools (a transaction split between
owners has one part per owner under one queue id).  A message whose
recipients are all delivered or bounced has left the queue; its events
remain (until pruned) and are shown.  One removed by ``relayctl delete``
says so (``"deleted"``: when; null otherwise).  ``--body`` prints the
stored message (headers and body) exactly, and nothing else; with
``--json`` it adds
``"body"``, decoded as UTF-8 (invalid bytes become U+FFFD).  An unknown ID
is an error (exit 1).

    {"queue_id": "0005F...", "in_queue": true, "deleted": null,
     "sender": "app@example.com",  # "" for <>; null once out of the queue
     "received": 1714557000.5, "size": 1234, "smtputf8": false,
     "class": "bulk", "campaign": "spring", "tenant": "",  # transactional|bulk; "" = none
     "parts": [{"worker": 0, "state": "active", "coordinator": null}],   # held|active
     "recipients": [{"index": 0, "address": "user@example.com",
                     "domain": "example.com", "worker": 0,
                     "state": "deferred",  # queued|deferred|sending|delivered|bounced|quarantined
                     "attempts": 2, "next_attempt": 1714558200.0,  # null when final or quarantined
                     "last_reply": "451 4.7.1 try again later",
                     "crashes": 0,         # deliveries of it that crashed the worker
                     "error": null}],      # the last crash's "ExceptionType: message"
     "events": [EVENT, ...]}       # oldest first

``relayctl grep ADDRESS [--limit N]``: every event for one recipient
address (case-insensitive), or for every address at a domain with
``@example.com``, newest first; ``--limit`` keeps the N newest.

    {"address": "user@example.com", "matched": 3,   # before --limit
     "events": [EVENT, ...]}                         # newest first

``relayctl report [--since 1h]``: the failed attempts (outcome deferred,
bounced or dropped) of the window, grouped by outcome, class, code,
enhanced code and recipient domain, largest count first, each with its
latest reply; and how many deliveries the window saw.  Counts are attempts
(events), not recipients: a recipient deferred three times counts three.

    {"since": 3600.0, "from": 1714554000.0, "until": 1714557600.0,
     "delivered": 345, "failed": 12,
     "failures": [{"outcome": "deferred", "class": "connection", "code": 421,
                   "enhanced": "4.7.0", "domain": "example.com", "count": 10,
                   "last_time": 1714557500.0, "last_text": "try again later"}]}

``relayctl report --daily [--days N] [--by domain|campaign|class]``: per
UTC day (the last N, default 7) and recipient domain, campaign or class,
how many were sent (delivered), soft-bounced (deferred attempts),
hard-bounced and dropped (dropped, deleted, cancelled, quarantined).  It
reads the daily roll-up each worker adds to as events are committed, so it
covers days whose events ``event_retention`` has pruned.

    {"days": 7, "by": "campaign", "rows": [{"day": "2026-12-01",
     "campaign": "spring", "sent": 10, "soft_bounce": 0, "hard_bounce": 0,
     "dropped": 0}]}        # "" = mail of no campaign
"""

from __future__ import annotations

import argparse
import sys

import orjson

from relay import config
from relay.cli import spoolread
from relay.cli.spoolread import MessageView, ReadError, fail, iso_local, table
from relay.ops import verbs


def add_parser(subparsers) -> None:
    show = subparsers.add_parser(
        "show", help="one message: envelope, recipients, events",
        description="Show a queued message: envelope, per-recipient state and delivery events.")
    show.add_argument("queue_id", metavar="ID", help="queue id (from the 250 reply or the log)")
    show.add_argument("--body", action="store_true", help="print the stored message itself")
    spoolread.add_common_arguments(show)
    show.set_defaults(run=run_show)

    grep = subparsers.add_parser(
        "grep", help="delivery events of a recipient address or domain",
        description="Every delivery event for a recipient address (or @domain), newest first.")
    grep.add_argument("address", metavar="ADDRESS", type=_pattern,
                      help="user@example.com, or @example.com for every address at the domain")
    grep.add_argument("--limit", type=spoolread.positive, metavar="N", help="only the N newest")
    spoolread.add_common_arguments(grep)
    grep.set_defaults(run=run_grep)

    report = subparsers.add_parser(
        "report", help="failures of a recent window, grouped",
        description="Failed attempts (deferred, bounced, dropped) by class, code and domain.")
    report.add_argument("--since", type=_duration, default=_duration("1h"), metavar="DURATION",
                        help="window length: 30m, 1h, 2d ... (default 1h)")
    report.add_argument("--daily", action="store_true",
                        help="instead: sent / soft bounce / hard bounce / dropped per UTC day")
    report.add_argument("--days", type=int, default=7, metavar="N",
                        help="with --daily: the last N days, today included (default 7)")
    report.add_argument("--by", choices=tuple(verbs.DAILY_BY), default="domain",
                        help="with --daily: per recipient domain (default), campaign or class")
    spoolread.add_common_arguments(report)
    report.set_defaults(run=run_report)


def _pattern(text: str) -> str:
    try:
        spoolread.address_pattern(text)  # a usage error, before any spool is opened
        return text
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return config.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _tls(flag: bool) -> str:
    return "yes" if flag else "no"


# -- show -------------------------------------------------------------------


def run_show(args) -> int:
    try:
        shown = verbs.show(args.config, args.queue_id, args.body, args.offline)
    except ReadError as exc:
        return fail(str(exc), exc.status)
    except verbs.NotFound as exc:
        return fail(str(exc))
    if args.json:
        print(orjson.dumps(shown.json(args.body)).decode())
    elif args.body:
        sys.stdout.flush()
        sys.stdout.buffer.write(shown.body)
        sys.stdout.buffer.flush()
    else:
        print(_show_text(shown.view))
    return 0


def _show_text(view: MessageView) -> str:
    lines = [f"queue id:   {view.queue_id}"]
    if view.in_queue:
        first = view.parts[0]
        spools = ", ".join(
            f"worker-{p.worker}.db ({spoolread.message_state_name(p.state)}"
            + (f", coordinator {p.coordinator})" if p.coordinator is not None else ")")
            for p in view.parts
        )
        lines += [
            f"sender:     <{first.sender}>",
            f"received:   {iso_local(first.received)}",
            f"size:       {first.size} bytes" + (" (SMTPUTF8)" if first.smtputf8 else ""),
            f"class:      {first.lane}"
            + (f", campaign {first.campaign}" if first.campaign else "")
            + (f", tenant {first.tenant}" if first.tenant else ""),
            f"spool:      {spools}",
            "",
            table(
                ["RECIPIENT", "STATE", "ATTEMPTS", "NEXT ATTEMPT", "WORKER", "LAST REPLY"],
                [[r.address, spoolread.state_name(r.state), r.attempts,
                  "-" if r.state in spoolread.UNSCHEDULED_STATES else iso_local(r.next_attempt),
                  r.worker, r.last_reply]
                 for r in view.recipients],
                right=(2, 4),
            ),
        ]
        crashed = [r for r in view.recipients if r.crashes]
        if crashed:
            lines += ["", table(["RECIPIENT", "STATE", "CRASHES", "ERROR"],
                                [[r.address, spoolread.state_name(r.state), r.crashes, r.error]
                                 for r in crashed], right=(2,))]
    elif view.deleted is not None:
        lines.append(f"state:      deleted by the operator at {iso_local(view.deleted)}"
                     " (relayctl delete)")
    else:
        lines.append("state:      left the queue (every recipient delivered or bounced)")
    lines += ["", f"events: {len(view.events)}"]
    if view.events:
        lines.append(table(
            ["TIME", "RECIPIENT", "OUTCOME", "CODE", "ENHANCED", "MX", "TLS", "TEXT"],
            [[iso_local(e.time), e.recipient, e.outcome, e.code, e.enhanced, e.mx, _tls(e.tls),
              e.text] for e in view.events],
            right=(3,),
        ))
    return "\n".join(lines)


# -- grep -------------------------------------------------------------------


def run_grep(args) -> int:
    try:
        grepped = verbs.grep(args.config, args.address, args.limit, args.offline)
    except ValueError as exc:
        return fail(f"grep: {exc}", 2)
    except ReadError as exc:
        return fail(str(exc), exc.status)
    pattern, events, matched = grepped.pattern, grepped.events, grepped.matched
    if args.json:
        print(orjson.dumps(grepped.json()).decode())
        return 0
    if not matched:
        print(f"no events for {args.address}")
        return 0
    # A domain matches many addresses: then say which one each line is about.
    who = ["RECIPIENT"] if pattern.domain_only else []
    print(table(
        ["TIME", "QUEUE ID", *who, "OUTCOME", "CODE", "ENHANCED", "MX", "TLS", "TEXT"],
        [[iso_local(e.time), e.queue_id, *([e.recipient] if who else []), e.outcome, e.code,
          e.enhanced, e.mx, _tls(e.tls), e.text] for e in events],
        right=(3 + len(who),),
    ))
    if len(events) < matched:
        print(f"({len(events)} of {matched} events shown)")
    return 0


# -- report -----------------------------------------------------------------


def run_daily(args) -> int:
    if args.days < 1:
        return fail("report --days: expected at least 1", 2)
    try:
        result = verbs.daily(args.config, args.days, args.by, args.offline)
    except ReadError as exc:
        return fail(str(exc), exc.status)
    if args.json:
        print(orjson.dumps(result.json()).decode())
        return 0
    print(f"the last {args.days} day(s) (UTC) by {args.by}")
    print(table(
        ["DAY", args.by.upper(), "SENT", "SOFT BOUNCE", "HARD BOUNCE", "DROPPED"],
        [[r["day"], r[args.by] or "-", r["sent"], r["soft_bounce"], r["hard_bounce"], r["dropped"]]
         for r in result.rows],
        right=(2, 3, 4, 5),
    ))
    return 0


def run_report(args) -> int:
    if args.daily:
        return run_daily(args)
    try:
        result = verbs.report(args.config, args.since, args.offline)
    except ReadError as exc:
        return fail(str(exc), exc.status)
    if args.json:
        print(orjson.dumps(result.json()).decode())
        return 0
    failures, failed, start, delivered = (result.failures, result.failed, result.start,
                                          result.delivered)
    by_outcome = ", ".join(
        f"{outcome} {sum(r.count for r in failures if r.outcome == outcome)}"
        for outcome in spoolread.FAILURE_OUTCOMES
    )
    print(f"since {iso_local(start)}: delivered {delivered}, failed {failed} ({by_outcome})")
    if failures:
        print(table(
            ["COUNT", "OUTCOME", "CLASS", "CODE", "ENHANCED", "DOMAIN", "LAST REPLY"],
            [[r.count, r.outcome, r.failure_class, r.code, r.enhanced, r.domain, r.last_text]
             for r in failures],
            right=(0, 3),
        ))
    return 0
