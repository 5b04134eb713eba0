"""How long a kept run's mail stayed in the relay, destination by destination.

Input: a directory ``perf/bench ... --keep`` printed (every relay run
under it is taken together): the relay's logs (``relay.log``, whose
``QUEUE_ID: accepted`` lines say which messages intake took, so a DSN the
relay made itself is left out) and its delivery event logs
(``delivery-N.jsonl``, one delivered event per recipient).  A message
arrived when its queue id was made (``QueueIds.made_at``: before it was
signed and stored); it left with its delivered event.  Output, per
destination (the receiving site), busiest first: recipients delivered and
the arrived→delivered percentiles per recipient — the time spent in the
relay's queues (retries included) and in the transaction that delivered
it.  A busy site whose waits are long while its connections stay under
the site's limit says the scheduler opened too few of them.

    .venv/bin/python -m perf.waits KEPT_DIR
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re

import orjson

from perf.report import percentiles
from relay.model import QueueIds

# "2026-12-03 13:36:49,754 relay[worker 1] INFO relay.intake: QUEUE_ID: accepted from=<...> ..."
ACCEPTED = re.compile(rb": ([0-9A-F]{18}): accepted ")


def accepted_ids(log_path: str) -> set[str]:
    """The queue ids intake accepted, by the relay's log."""
    found = set()
    with open(log_path, "rb") as file:
        for line in file:
            match = ACCEPTED.search(line)
            if match:
                found.add(match[1].decode())
    return found


def waits(accepted: set[str], event_paths: list[str]) -> dict[str, list[float]]:
    """Destination -> arrived→delivered seconds of each delivered recipient."""
    by_destination = collections.defaultdict(list)
    for path in event_paths:
        with open(path, "rb") as file:
            for line in file:
                event = orjson.loads(line)
                queue_id = event.get("queue_id")
                if event.get("outcome") == "delivered" and queue_id in accepted:
                    by_destination[event["destination"]].append(event["time"] - QueueIds.made_at(queue_id))
    return by_destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kept_dir", help="a directory perf/bench --keep printed")
    args = parser.parse_args(argv)
    accepted: set[str] = set()
    for path in glob.glob(os.path.join(args.kept_dir, "**", "relay.log"), recursive=True):
        accepted |= accepted_ids(path)
    if not accepted:
        parser.error(f"no 'accepted' lines in a relay.log under {args.kept_dir}: a relay run kept"
                     " with --keep, at log_level info, is needed")
    events = glob.glob(os.path.join(args.kept_dir, "**", "delivery-*.jsonl"), recursive=True)
    found = waits(accepted, events)
    if not found:
        parser.error(f"no delivered event of an accepted message under {args.kept_dir}")
    everything = [wait for destination in found.values() for wait in destination]
    print(f"{'destination':<32} {'delivered':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    rows = sorted(found.items(), key=lambda item: -len(item[1])) + [("all", everything)]
    for destination, seconds in rows:
        p = percentiles(seconds)
        print(f"{destination:<32} {len(seconds):>9} {p['p50']!s:>8} {p['p90']!s:>8} {p['p99']!s:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
