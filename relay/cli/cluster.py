"""``relayctl cluster [--json]``: this host's place in the cluster.

Asks the running relay (through the supervisor): this host's index and
the host count, parts published to other hosts' shard queues (and those
the broker did not confirm), parts consumed from this host's queue,
redelivered duplicates recognised, the last error, each worker's link,
and every shard queue's depth and consumers as the broker says now.
``--json`` prints the answer as is: ``{"ok", "host", "hosts", "published",
"publish_failed", "consumed", "duplicates", "nacked", "bad", "last_error",
"workers": [...], "queues": [{"queue", "host", "messages", "consumers"}]}``.
"""

from __future__ import annotations

import orjson

from relay.cli.admin import _ask


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("cluster", help="this host's shard, its queue and the others'")
    parser.set_defaults(run=run)


def run(args) -> int:
    answer = _ask(args, {"op": "cluster"})
    if isinstance(answer, int):
        return answer
    if args.json:
        print(orjson.dumps(answer).decode())
        return 0
    connected = sum(1 for w in answer["workers"] if w["connected"])
    print(f"host {answer['host']} of {answer['hosts']} (counting from 0),"
          f" {connected}/{len(answer['workers'])} workers connected to the broker")
    print(f"parts published {answer['published']} (not confirmed {answer['publish_failed']}),"
          f" consumed {answer['consumed']}, duplicates {answer['duplicates']},"
          f" handed back {answer['nacked']}, undecodable {answer['bad']}")
    if answer["last_error"]:
        print(f"last error: {answer['last_error']}")
    for queue in answer["queues"]:
        mine = "  <- this host" if queue["host"] == answer["host"] else ""
        if "error" in queue:
            print(f"  {queue['queue']}: {queue['error']}{mine}")
        else:
            print(f"  {queue['queue']}: {queue['messages']} messages,"
                  f" {queue['consumers']} consumer(s){mine}")
    return 0
