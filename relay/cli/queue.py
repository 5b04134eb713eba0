"""relayctl queue: the shape of the queue, like Postfix's qshape.

Input: every worker's spool, read-only (``relay.cli.spoolread``); options
``--by domain|destination`` (default domain), ``--top N`` (only the N
largest rows; the TOTAL row still counts everything), ``--json`` and
``--offline`` (read the spool of a stopped relay).

Output: per recipient domain the recipients still waiting (queued,
deferred or being sent) in active messages, by age since the message
arrived, in qshape's buckets: 0-5m, 5-10m, 10-20m, 20-40m, 40-80m,
80-160m, 160-320m, 320m+; largest total first, after a TOTAL row.
Recipients in held parts (a multi-owner transaction waiting for its
decision, normally for milliseconds) are not in the rows: they are counted
apart, and so are quarantined recipients (their delivery crashed the
worker ``deliver.quarantine_after`` times; ``relayctl requeue --quarantined
ID`` releases them), with their messages' ids.  ``--by destination`` groups domains by the MX set their mail was
last sent to (from their events); a domain not tried yet is its own row.

``--json`` prints one object:

    {"total": 12,                  # waiting recipients in active messages
     "held": 0,                    # waiting recipients in held parts
     "held_parts": 0,              # held parts (messages) in all spools
     "quarantined": 0,             # quarantined recipients (not in total)
     "quarantined_ids": [],        # their queue ids (at most 100)
     "by": "domain",
     "buckets": ["0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m",
                 "160-320m", "320m+"],
     "by_age": [10, 2, 0, 0, 0, 0, 0, 0],        # the TOTAL row
     "domains": [{"domain": "example.com", "total": 10,
                  "by_age": [8, 2, 0, 0, 0, 0, 0, 0]}, ...]}

With ``--by destination`` the list is ``"destinations"`` and each entry has
``"destination"`` (comma-separated MX host names, or the domain) in place
of ``"domain"``.  Exit status 0; 1 when the relay is not running (without
``--offline``) or the spool cannot be read; 2 for a bad configuration.
"""

from __future__ import annotations

import orjson

from relay.cli import spoolread
from relay.cli.spoolread import BUCKETS, ReadError, fail
from relay.ops import verbs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "queue", help="waiting recipients per domain and age (qshape)",
        description="Waiting recipients per recipient domain and age since arrival.")
    parser.add_argument("--by", choices=("domain", "destination"), default="domain",
                        help="group by recipient domain (default) or by destination (MX set)")
    parser.add_argument("--top", type=spoolread.positive, metavar="N",
                        help="only the N largest rows")
    spoolread.add_common_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        report = verbs.queue(args.config, args.by, args.top, args.offline)
    except ReadError as exc:
        return fail(str(exc), exc.status)
    if args.json:
        print(orjson.dumps(report.json).decode())
        return 0
    shape = report.shape
    rows = shape.rows[: args.top] if args.top else shape.rows
    numbers = range(1, 2 + len(BUCKETS))
    print(spoolread.table(
        [args.by.upper(), "TOTAL", *BUCKETS],
        [["TOTAL", shape.total, *shape.by_age]]
        + [[row.name, row.total, *row.by_age] for row in rows],
        right=numbers,
    ))
    if len(rows) < len(shape.rows):
        print(f"({len(shape.rows) - len(rows)} more {args.by}s not shown)")
    print(f"held: {shape.held} recipients in {report.held_parts} parts"
          " awaiting their transaction's decision")
    quarantined, ids = report.json["quarantined"], report.json["quarantined_ids"]
    if quarantined:
        print(f"quarantined: {quarantined} recipients, their delivery crashed the relay"
              f" (relayctl show ID; relayctl requeue --quarantined ID): {' '.join(ids)}")
    else:
        print("quarantined: 0 recipients")
    return 0
