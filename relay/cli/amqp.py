"""``relayctl amqp [--json]``: the AMQP consumers and feeds of every worker.

Asks each running worker (through the supervisor) for its consumers
(queue, connected, prefetch, unacked, consumed / acked / nacked / failed /
duplicates) and its feeds (cursor, lag, published, last error).
``--json`` prints ``{"ok", "workers", "per_worker": [{"worker",
"consumers": [...], "feeds": [...]}]}``.
"""

from __future__ import annotations

import orjson

from relay.cli.admin import _ask


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("amqp", help="AMQP consumers and feeds of the running relay")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=run)


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
