"""How busy a kept run's outbound connections were, window by window.

Input: the delivery event logs (``delivery-N.jsonl``) of a run kept with
``perf/bench ... --keep``; each delivered event has its transaction's end
(``time``) and duration (``latency``).  Output, per window of the run:
deliveries per second, the median transaction time, and the connections
busy in a transaction on average (the transactions' intervals summed over
the window), which with the connections a site allows says how long they
sat idle between transactions.

    .venv/bin/python -m perf.busy KEPT_DIR [--window 5]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics

import orjson


def transactions(paths: list[str]) -> list[tuple[float, float]]:
    """(start, end) of every delivered recipient's transaction."""
    found = []
    for path in paths:
        with open(path, "rb") as file:
            for line in file:
                event = orjson.loads(line)
                if event.get("outcome") == "delivered" and event.get("latency") is not None:
                    found.append((event["time"] - event["latency"], event["time"]))
    return found


def windows(found: list[tuple[float, float]], width: float) -> list[dict]:
    """Per window from the first start: deliveries/s, median transaction ms, mean busy."""
    if not found:
        return []
    first = min(start for start, _ in found)
    count = int((max(end for _, end in found) - first) // width) + 1
    rows = []
    for n in range(count):
        low, high = first + n * width, first + (n + 1) * width
        ending = [end - start for start, end in found if low <= end < high]
        busy = sum(max(0.0, min(end, high) - max(start, low)) for start, end in found)
        rows.append({"from_s": n * width, "delivered_per_s": round(len(ending) / width, 1),
                     "transaction_ms": round(statistics.median(ending) * 1000, 1) if ending else None,
                     "busy": round(busy / width, 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kept_dir", help="a directory perf/bench --keep printed")
    parser.add_argument("--window", type=float, default=5.0, help="seconds per row")
    args = parser.parse_args(argv)
    paths = glob.glob(os.path.join(args.kept_dir, "**", "delivery-*.jsonl"), recursive=True)
    print(f"{'from s':>7} {'delivered/s':>12} {'transaction ms':>15} {'busy':>6}")
    for row in windows(transactions(paths), args.window):
        print(f"{row['from_s']:>7g} {row['delivered_per_s']:>12} {row['transaction_ms']!s:>15}"
              f" {row['busy']:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
