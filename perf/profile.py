"""Top functions by own time from a py-spy recording (``--format raw``).

Input: the collapsed-stack file ``perf/bench --py-spy DIR`` leaves (one
line per distinct stack: ``frame;frame;...;frame COUNT``).  Output: the
functions where samples ended (own time), with their share of all active
samples (a C extension's time is charged to the Python frame that called
it: ``Runner.run`` is uvloop's loop itself, ``Spool._commit`` includes
SQLite and its fsync), and the same grouped by process and by module — what is worth
moving into relay/_fast (DESIGN.md: any pure-Python function over ~5% of
CPU at full load).

With ``--inclusive FUNCTION`` (repeatable) it also gives the share of
samples with that function anywhere on the stack (the time spent in it and
below it: a part of the relay, such as ``SMTP._handle_client`` for intake's
sessions), and with ``--callers FUNCTION`` the own time of that function by
the function that called it (which writes the socket writes are).

Usage: python -m perf.profile FILE [--top N] [--inclusive FUNCTION ...] [--callers FUNCTION]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_LINE = re.compile(r"\s*\(([^)]*?)(?::\d+)?\)$")


def frame_key(frame: str) -> tuple[str, str]:
    """('function', 'file') of a py-spy frame 'function (file:line)'."""
    match = _LINE.search(frame)
    if not match:
        return frame.strip(), ""
    return frame[: match.start()].strip(), match.group(1)


def parse(path: str):
    own: collections.Counter[tuple[str, str]] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    processes: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            frames = stack.split(";")
            total += samples
            # --subprocesses prefixes the process chain (supervisor;worker):
            # the last one is where the sample was taken.
            chain = [f for f in frames if f.startswith("process ")]
            if chain:
                processes[chain[-1].split(":", 1)[0]] += samples
            function, filename = frame_key(frames[-1])
            own[(function, filename)] += samples
            modules[filename] += samples
    return own, modules, processes, total


def _samples(path: str):
    """(frames as (function, file) pairs, samples) for each stack in the file."""
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                yield [frame_key(f) for f in stack.split(";")], int(count)


def inclusive(path: str, functions: list[str]) -> collections.Counter[str]:
    """Samples with each of ``functions`` anywhere on the stack."""
    found: collections.Counter[str] = collections.Counter()
    for frames, samples in _samples(path):
        names = {function for function, _ in frames}
        for function in functions:
            if function in names:
                found[function] += samples
    return found


def callers(path: str, function: str) -> collections.Counter[str]:
    """Own samples of ``function``, by the function that called it."""
    found: collections.Counter[str] = collections.Counter()
    for frames, samples in _samples(path):
        if len(frames) > 1 and frames[-1][0] == function:
            found[frames[-2][0]] += samples
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.profile")
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--inclusive", action="append", default=[], metavar="FUNCTION",
                        help="share of samples with FUNCTION on the stack (repeatable)")
    parser.add_argument("--callers", metavar="FUNCTION", help="FUNCTION's own time by caller")
    args = parser.parse_args(argv)
    own, modules, processes, total = parse(args.file)
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples (active threads only)")
    print(f"\n{'own %':>6}  function (file)")
    for (function, filename), samples in own.most_common(args.top):
        print(f"{100 * samples / total:6.1f}  {function} ({filename})")
    print(f"\n{'own %':>6}  file")
    for filename, samples in modules.most_common(15):
        print(f"{100 * samples / total:6.1f}  {filename}")
    if processes:
        print(f"\n{'%':>6}  process")
        for name, samples in processes.most_common():
            print(f"{100 * samples / total:6.1f}  {name}")
    if args.inclusive:
        print(f"\n{'incl %':>6}  function (with what it calls)")
        found = inclusive(args.file, args.inclusive)
        for function in args.inclusive:
            print(f"{100 * found[function] / total:6.1f}  {function}")
    if args.callers:
        print(f"\n{'own %':>6}  {args.callers}, called by")
        for caller, samples in callers(args.file, args.callers).most_common(args.top):
            print(f"{100 * samples / total:6.1f}  {caller}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
