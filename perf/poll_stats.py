"""Poll the stats ring of a running relay at a fixed rate, as a dashboard
would, to measure what reading the stats costs the relay.

Input: the relay's run_dir, a rate in Hz and a duration.  Output: how many
reads it made and how long each took (stdout).  It reads the ring straight
from shared memory, as ``relayctl stats`` does, never asking a worker.

    .venv/bin/python -m perf.poll_stats [RUN_DIR] --hz 100 --seconds 30
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

from relay.stats import ring


def _newest_ring() -> list[str]:
    """The ring of the relay started last (a benchmark's own)."""
    rings = glob.glob("/dev/shm/relay-stats-*")
    return [max(rings, key=os.path.getmtime)] if rings else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="the relay's run_dir; default: the newest ring")
    parser.add_argument("--hz", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    period, took, readers = 1.0 / args.hz, [], {}
    deadline = time.monotonic() + args.seconds
    next_read = time.monotonic()
    while time.monotonic() < deadline:
        started = time.perf_counter()
        paths = [ring.ring_path(args.run_dir)] if args.run_dir else _newest_ring()
        for path in paths:
            try:
                if path not in readers:
                    readers[path] = ring.Reader(path)
                ring.merge(readers[path].read())
            except (OSError, ValueError):
                readers.pop(path, None)  # not started yet, or stopped
        took.append(time.perf_counter() - started)
        next_read += period
        time.sleep(max(0.0, next_read - time.monotonic()))
    print(f"reads {len(took)} at {args.hz:g} Hz; per read median "
          f"{statistics.median(took) * 1e6:.0f} us, max {max(took) * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
