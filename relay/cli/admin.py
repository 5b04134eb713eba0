"""relayctl verbs that change the queue (postsuper / postqueue -f style):

* ``flush [DOMAIN]`` — deferred mail (of one domain) is retried now;
* ``requeue [--code 550] [--sender REGEX] [--recipient REGEX] [--all]
  [--dry-run]`` — bounced recipients matching every filter go back in the
  queue and off the suppression list (pmq-publish); with no filter it
  refuses unless ``--all`` says every bounce is meant; ``--dry-run`` counts
  them and changes nothing;
* ``delete ID...`` — remove messages from the queue, each recipient not
  yet delivered with a ``deleted`` event (spool and delivery log); an id
  no spool holds is an error (exit 1) naming it, the others are deleted;
* ``requeue --quarantined ID...`` — the quarantined recipients of these
  messages (their delivery crashed the worker ``deliver.quarantine_after``
  times) go back in the queue with their crash count reset; exit status 1
  when none of them had a quarantined recipient;
* ``suspend DOMAIN`` / ``resume DOMAIN`` — hold a domain's mail in the
  queue (kept across restarts) / let it go again; ``suspend --list`` shows
  the suspended domains, as both verbs do after their change;
* ``trace add|remove|list ADDRESS...`` — log every step of the delivery of
  mail to these recipients, with millisecond times (logger relay.trace), as
  for a message carrying ``X-Relay-Trace: 1``.

Each goes to the supervisor, which passes it to the owner worker of the
domain or to every worker.  ``--json`` prints the supervisor's answer:
``{"ok": true, "workers": [...], "count": n}`` (``"suspended": [...]`` for
suspend/resume, ``"traced": [...]`` for trace, ``"deleted": [ID...],
"missing": [ID...]`` for delete).
"""

from __future__ import annotations

import re
import sys

import orjson

from relay import config
from relay.cli import spoolread
from relay.cli.control import ControlError, NotRunning, request
from relay.errors import ConfigError

_HEX = re.compile(r"[0-9A-Fa-f]+")


def add_parser(subparsers) -> None:
    flush = subparsers.add_parser("flush", help="retry deferred mail now")
    flush.add_argument("domain", nargs="?", help="only this recipient domain")
    requeue = subparsers.add_parser("requeue", help="put bounced recipients back in the queue")
    requeue.add_argument("--code", help="last reply starts with this, e.g. 550 or '550 5.1.1'")
    requeue.add_argument("--sender", help="envelope sender matches this regular expression")
    requeue.add_argument("--recipient", help="recipient matches this regular expression")
    requeue.add_argument("--quarantined", nargs="+", metavar="ID",
                         help="instead: release the quarantined recipients of these messages")
    requeue.add_argument("--all", action="store_true",
                         help="every bounced recipient (needed when no filter is given)")
    requeue.add_argument("--dry-run", action="store_true",
                         help="only count the recipients that would be requeued")
    delete = subparsers.add_parser("delete", help="remove messages from the queue")
    delete.add_argument("ids", nargs="+", metavar="ID")
    suspend = subparsers.add_parser("suspend", help="hold a domain's mail in the queue")
    suspend.add_argument("domain", nargs="?")
    suspend.add_argument("--list", action="store_true", help="only list the suspended domains")
    resume = subparsers.add_parser("resume", help="deliver a suspended domain's mail again")
    resume.add_argument("domain")
    add_trace_parser(subparsers)
    for verb, parser in (("flush", flush), ("requeue", requeue), ("delete", delete),
                         ("suspend", suspend), ("resume", resume)):
        parser.set_defaults(run=run, op=verb)


def _request(args) -> dict:
    message = {"op": args.op}
    if args.op == "delete":
        args.ids = [spoolread.queue_id(i) for i in args.ids]
    for name in ("domain", "code", "sender", "recipient", "ids", "quarantined", "all", "dry_run"):
        value = getattr(args, name, None)
        if value:
            message[name] = value
    return message


def _ask(args, message: dict) -> dict | int:
    """The running relay's answer, or the exit status after saying why not."""
    try:
        settings = config.load(args.config)
        return request(settings.relay.run_dir, message)
    except ConfigError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 2
    except (NotRunning, ControlError) as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 1


def run(args) -> int:
    if args.op == "suspend" and bool(args.domain) == args.list:
        print("relayctl: suspend needs a DOMAIN, or --list", file=sys.stderr)
        return 2
    if args.op == "suspend" and args.list:
        args.op = "suspensions"
    quarantined = getattr(args, "quarantined", None)
    if quarantined and (args.code or args.sender or args.recipient):
        print("relayctl: requeue --quarantined takes no --code, --sender or --recipient",
              file=sys.stderr)
        return 2
    if quarantined:
        # Queue ids are upper-case hex; accept them as typed in lower case too.
        args.quarantined = [queue_id.upper() if _HEX.fullmatch(queue_id) else queue_id
                            for queue_id in quarantined]
    if (args.op == "requeue" and not quarantined
            and not (args.code or args.sender or args.recipient or args.all)):
        # Without a filter this takes back every bounce: say so explicitly.
        print("relayctl: requeue needs --code, --sender or --recipient, or --all for every"
              " bounced recipient (--dry-run counts them first)", file=sys.stderr)
        return 2
    answer = _ask(args, _request(args))
    if isinstance(answer, int):
        return answer
    if quarantined and not answer.get("count"):
        if args.json:
            print(orjson.dumps(answer).decode())
        print("relayctl: no quarantined recipients in " + " ".join(args.quarantined),
              file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(answer).decode())
    elif args.op in ("suspend", "resume", "suspensions"):
        suspended = answer.get("suspended") or []
        print("suspended domains: " + (", ".join(suspended) if suspended else "none"))
    else:
        noun = {"flush": "recipients due now", "requeue": "recipients requeued",
                "delete": "messages deleted"}[args.op]
        if getattr(args, "dry_run", False):
            noun = "recipients would be requeued (dry run: nothing changed)"
        if quarantined:
            noun = "quarantined recipients requeued"
        print(f"{answer.get('count', 0)} {noun}")
    if answer.get("missing"):
        print(f"relayctl: delete: no such message in any spool: {', '.join(answer['missing'])}",
              file=sys.stderr)
        return 1
    return 0


def add_trace_parser(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="log every delivery step for chosen recipients")
    parser.add_argument("action", choices=("add", "remove", "list"))
    parser.add_argument("addresses", nargs="*", metavar="ADDRESS")
    parser.set_defaults(run=run_trace)


def run_trace(args) -> int:
    message = {"op": "trace", "add": [], "remove": []}
    if args.action in ("add", "remove"):
        if not args.addresses:
            print(f"relayctl: trace {args.action} needs at least one ADDRESS", file=sys.stderr)
            return 1
        message[args.action] = args.addresses
    answer = _ask(args, message)
    if isinstance(answer, int):
        return answer
    traced = answer.get("traced", [])
    print(orjson.dumps(answer).decode() if args.json
          else "traced recipients: " + (", ".join(traced) if traced else "none"))
    return 0
