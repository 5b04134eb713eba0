"""How long a kept run's mail stayed in the relay, destination by destination.

Input: a run kept with ``perf/bench ... --keep``: the relay's log
(``relay.log``, whose ``QUEUE_ID: accepted`` lines carry the acceptance
time to the millisecond) and its delivery event logs (``delivery-N.jsonl``,
one delivered event per recipient with the delivery's time).  Output, per
destination (the receiving site), busiest first: recipients delivered and
the accepted→delivered percentiles — the time a message waited in the
relay's queues and in its one transaction.  A busy site whose waits are
long while its connections stay under the site's limit says the
scheduler opened too few of them.

    .venv/bin/python -m perf.waits KEPT_DIR
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import time

import orjson

from perf.report import percentiles

# "2026-12-03 13:36:49,754 relay[worker 1] INFO relay.intake: QID: accepted ..."
ACCEPTED = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*?: ([0-9A-F]+): accepted ")


def accepted_at(log_path: str) -> dict[str, float]:
    """Queue id -> when intake accepted it (the log's local time, as epoch seconds)."""
    found = {}
    with open(log_path, "rb") as file:
        for line in file:
            match = ACCEPTED.match(line)
            if match:
                stamp = time.mktime(time.strptime(match[1].decode(), "%Y-%m-%d %H:%M:%S"))
                found[match[3].decode()] = stamp + int(match[2]) / 1000
    return found


def waits(accepted: dict[str, float], event_paths: list[str]) -> dict[str, list[float]]:
    """Destination -> accepted→delivered seconds of each delivered recipient."""
    by_destination = collections.defaultdict(list)
    for path in event_paths:
        with open(path, "rb") as file:
            for line in file:
                event = orjson.loads(line)
                start = accepted.get(event.get("queue_id"))
                if event.get("outcome") == "delivered" and start is not None:
                    by_destination[event["destination"]].append(event["time"] - start)
    return by_destination


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kept_dir", help="a directory perf/bench --keep printed")
    args = parser.parse_args(argv)
    logs = glob.glob(os.path.join(args.kept_dir, "**", "relay.log"), recursive=True)
    if not logs:
        parser.error(f"no relay.log under {args.kept_dir}: was it a relay run kept with --keep?")
    accepted: dict[str, float] = {}
    for path in logs:
        accepted.update(accepted_at(path))
    events = glob.glob(os.path.join(args.kept_dir, "**", "delivery-*.jsonl"), recursive=True)
    found = waits(accepted, events)
    everything = [wait for destination in found.values() for wait in destination]
    print(f"{'destination':<32} {'delivered':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    rows = sorted(found.items(), key=lambda item: -len(item[1])) + [("all", everything)]
    for destination, seconds in rows:
        p = percentiles(seconds)
        print(f"{destination:<32} {len(seconds):>9} {p['p50']!s:>8} {p['p90']!s:>8} {p['p99']!s:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
