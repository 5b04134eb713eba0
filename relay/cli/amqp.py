"""``relayctl amqp [--json]`` and ``relayctl amqp move``.

``amqp``: asks each running worker (through the supervisor) for its
consumers (queue, connected, prefetch, unacked, consumed / acked / nacked /
failed / duplicates) and its feeds (cursor, lag, published, last error).
``--json`` prints ``{"ok", "workers", "per_worker": [{"worker",
"consumers": [...], "feeds": [...]}]}``.

``amqp move --from QUEUE --to QUEUE [--code N] [--sender RE] [--recipient
RE] [--dry-run] [--url URL]`` moves messages between queues as PostmanQ's
pmq-publish does (filters OR-ed, none = every message), but never loses
one: each message is taken with basic.get (unacked), published persistent
to ``--to`` (the default exchange, mandatory) and acked only after the
broker confirmed the copy; messages that do not match are handed back at
the end.  ``--dry-run`` takes and hands back every message, moving none.
It talks to the broker directly (the relay need not run); the URL is the
consumer's whose queue is named, else the first consumer's.  Prints
``{"moved", "matched", "seen"}`` with ``--json``.
"""

from __future__ import annotations

import asyncio
import re
import sys

import orjson

from relay import config
from relay.cli.admin import _ask
from relay.errors import ConfigError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("amqp", help="AMQP consumers and feeds; move messages between queues")
    parser.set_defaults(run=run)
    actions = subparsers.add_subverbs(parser, dest="action", metavar="ACTION")
    move = actions.add_parser("move", help="move messages between queues (pmq-publish)")
    move.add_argument("--from", dest="source", required=True, metavar="QUEUE")
    move.add_argument("--to", dest="target", required=True, metavar="QUEUE")
    move.add_argument("--code", type=int, help="error.code is this")
    move.add_argument("--sender", help="envelope (or sender) matches this regular expression")
    move.add_argument("--recipient", help="recipient matches this regular expression")
    move.add_argument("--dry-run", action="store_true", help="count, move nothing")
    move.add_argument("--url", help="broker URL (default: from [[amqp.consumer]])")
    move.set_defaults(run=run_move)


def matches(doc, code=None, sender=None, recipient=None) -> bool:
    """pmq-publish's filters, OR-ed; no filter matches every message."""
    if code is None and sender is None and recipient is None:
        return True
    if not isinstance(doc, dict):
        return False
    error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    if code is not None and error.get("code") == code:
        return True
    envelope = doc.get("envelope", doc.get("sender"))
    if sender is not None and isinstance(envelope, str) and re.search(sender, envelope):
        return True
    recipients = doc.get("recipients") or [doc.get("recipient")]
    return recipient is not None and any(
        isinstance(r, str) and re.search(recipient, r) for r in recipients)


async def move(url: str, source: str, target: str, *, code=None, sender=None, recipient=None,
               dry_run: bool = False) -> dict:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.get_queue(source, ensure=True)
        await channel.get_queue(target, ensure=True)  # must exist: never publish into the void
        kept, seen, matched, moved = [], 0, 0, 0
        while (message := await queue.get(fail=False)) is not None:
            seen += 1
            try:
                doc = orjson.loads(message.body)
            except orjson.JSONDecodeError:
                doc = None
            if not matches(doc, code, sender, recipient):
                kept.append(message)
                continue
            matched += 1
            if dry_run:
                kept.append(message)
                continue
            await channel.default_exchange.publish(
                aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 content_type=message.content_type, headers=message.headers),
                routing_key=target)
            await message.ack()  # only once the copy was confirmed
            moved += 1
        for message in kept:
            await message.nack(requeue=True)
        return {"moved": moved, "matched": matched, "seen": seen}
    finally:
        await connection.close()


def run_move(args) -> int:
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 2
    url = args.url
    if url is None:
        consumers = settings.amqp.consumers
        named = [c for c in consumers if args.source.startswith(c.queue) or args.target.startswith(c.queue)]
        if not (named or consumers):
            print("relayctl: no [[amqp.consumer]] in the configuration: give --url", file=sys.stderr)
            return 2
        url = (named or consumers)[0].url
    try:
        result = asyncio.run(move(url, args.source, args.target, code=args.code, sender=args.sender,
                                  recipient=args.recipient, dry_run=args.dry_run))
    except Exception as exc:  # the broker's refusal, a missing queue, no connection
        print(f"relayctl: amqp move failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        verb = "would move" if args.dry_run else "moved"
        print(f"{verb} {result['matched'] if args.dry_run else result['moved']} of "
              f"{result['seen']} messages from {args.source} to {args.target}")
    return 0


def render(answer: dict) -> str:
    lines = [f"{'worker':<8}{'queue':<32}{'connected':>10}{'prefetch':>9}{'unacked':>8}"
             f"{'consumed':>10}{'acked':>9}{'nacked':>8}{'failed':>8}{'dupes':>7}"]
    feeds = []
    for worker in answer.get("per_worker", []):
        for c in worker.get("consumers", []):
            lines.append(
                f"{worker['worker']:<8}{c['queue'][:31]:<32}{'yes' if c['connected'] else 'NO':>10}"
                f"{c['prefetch']:>9}{c['unacked']:>8}{c['consumed']:>10}{c['acked']:>9}"
                f"{c['nacked']:>8}{c['failed']:>8}{c['duplicates']:>7}")
        for f in worker.get("feeds", []):
            feeds.append(f"{worker['worker']:<8}{f['feed']:<32}{f['cursor']:>10}{f['lag']:>9}"
                         f"{f['published']:>10}  {f['last_error'] or '-'}")
    if len(lines) == 1:
        lines.append("no [[amqp.consumer]] configured")
    if feeds:
        lines += ["", f"{'worker':<8}{'feed':<32}{'cursor':>10}{'lag':>9}{'published':>10}  last error"]
        lines += feeds
    return "\n".join(lines)


def run(args) -> int:
    answer = _ask(args, {"op": "amqp"})
    if isinstance(answer, int):
        return answer
    print(orjson.dumps(answer).decode() if args.json else render(answer))
    return 0
