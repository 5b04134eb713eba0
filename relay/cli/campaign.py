"""relayctl campaign: campaigns (X-Relay-Campaign) and the operator's hold on them.

* ``campaign list`` — every campaign: state (active, paused, cancelled),
  class, recipients queued and held, delivered / deferred / bounced /
  dropped so far (from the daily roll-up, so they outlive the events), and
  first and last activity;
* ``campaign show NAME`` — the same for one (an unknown name: exit 1);
* ``campaign pause NAME`` — its mail stays in the queue, held, attempts
  unchanged; transactions in flight finish;
* ``campaign resume NAME`` — held mail is due now (and a cancelled
  campaign takes new mail again);
* ``campaign cancel NAME`` — every waiting recipient ends with a
  ``cancelled`` event and no DSN; the count is printed; cancelling again
  finds nothing (0); later mail of the campaign is cancelled too, until
  ``resume``.

States are kept in every worker's spool and apply in every worker; a name
may be paused or cancelled before any of its mail arrives.  ``--json``:
``{"ok", "action", "count", "campaigns": [{"name", "state", "tenant",
"class", "queued", "held", "delivered", "deferred", "bounced", "dropped",
"first", "last"}]}``.
"""

from __future__ import annotations

import sys

import orjson

from relay.cli.admin import _ask
from relay.cli.spoolread import iso_local, table

ACTIONS = ("list", "show", "pause", "resume", "cancel")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("campaign", help="list, pause, resume or cancel campaigns")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("name", nargs="?", help="the campaign (X-Relay-Campaign)")
    parser.set_defaults(run=run)


def run(args) -> int:
    if (args.action == "list") == bool(args.name):
        print(f"relayctl: campaign {args.action} "
              + ("takes no NAME" if args.action == "list" else "needs a NAME"),
              file=sys.stderr)
        return 2
    message = {"op": "campaign", "action": args.action}
    if args.name:
        message["name"] = args.name
    answer = _ask(args, message)
    if isinstance(answer, int):
        return answer
    if args.json:
        print(orjson.dumps(answer).decode())
        return 0
    done = {"pause": "held", "resume": "due now", "cancel": "cancelled"}.get(args.action)
    if done:
        print(f"campaign {args.name}: {answer['count']} recipient(s) {done}")
    campaigns = answer.get("campaigns", [])
    if args.action == "list" and not campaigns:
        print("no campaigns")
    elif campaigns:
        print(table(
            ["CAMPAIGN", "TENANT", "STATE", "CLASS", "QUEUED", "HELD", "DELIVERED", "DEFERRED",
             "BOUNCED", "DROPPED", "FIRST", "LAST"],
            [[c["name"], c["tenant"] or "-", c["state"], c["class"], c["queued"], c["held"],
              c["delivered"], c["deferred"], c["bounced"], c["dropped"],
              iso_local(c["first"]) if c["first"] else "-",
              iso_local(c["last"]) if c["last"] else "-"] for c in campaigns],
            right=(4, 5, 6, 7, 8, 9),
        ))
    return 0
