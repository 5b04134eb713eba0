"""The C-pair ceiling: Postfix's smtp-source straight into smtp-sink.

Input: a scenario (how many messages, their size, recipients per message,
connections) and a free loopback port.  Output: what the pair moves on
this machine in this run — recipients/s and messages/s, its CPU, the
command — and the fraction of it each server under test delivered.

No server in between: the bound that loopback and two small C programs
set for anything relaying the same traffic (issue 15).  The pair speaks
plaintext (neither program does STARTTLS) and nothing is signed, so with
``--dkim``/``--tls`` the fraction also measures what those cost.
smtp-source sends ``-l`` bytes of body after a few header lines, keeps
each of its ``-s`` sessions open for all its messages (``-d``) and does
not pipeline; smtp-sink answers without storing anything.  Debian's
postfix package installs both (``postfix_tools()`` is None without them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from perf import procstat
from perf.loadgen import SENDER
from perf.mta import wait_greeting

SINK_BACKLOG = 1024
RECIPIENT = "ceiling@d0000.example"


@dataclass(frozen=True)
class Shape:
    messages: int
    size: int  # body bytes per message (mean over the streams and their size mix)
    recipients: int  # per message (mean, rounded)
    sessions: int  # connections at once


def shape(scenario) -> Shape:
    """The pair's traffic for ``scenario``: its messages, their mean size,
    recipients per message and the sum of its streams' connections."""
    streams = scenario.streams
    messages = sum(s.messages for s in streams)

    def mean_size(stream) -> float:
        return sum(size * weight for size, weight in stream.sizes) / sum(w for _, w in stream.sizes)

    return Shape(
        messages=messages,
        size=round(sum(s.messages * mean_size(s) for s in streams) / messages),
        recipients=max(1, round(sum(s.messages * s.recipients for s in streams) / messages)),
        sessions=sum(s.concurrency for s in streams),
    )


def postfix_tools() -> tuple[str, str] | None:
    """(smtp-source, smtp-sink), or None when either is missing."""
    found = []
    for name in ("smtp-source", "smtp-sink"):
        path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def commands(tools: tuple[str, str], pair: Shape, port: int, root: bool) -> tuple[list[str], list[str]]:
    """(smtp-source argv, smtp-sink argv) for ``pair`` on 127.0.0.1:port."""
    source, sink = tools
    address = f"127.0.0.1:{port}"
    source_argv = [source, "-s", str(pair.sessions), "-m", str(pair.messages), "-l", str(pair.size),
                   "-r", str(pair.recipients), "-d", "-f", SENDER, "-t", RECIPIENT,
                   "-M", "loadgen.test", address]
    # As root smtp-sink must drop to a user of its own (-u); -m: its session limit.
    sink_argv = [sink, *(["-u", "nobody"] if root else []),
                 "-m", str(max(256, 2 * pair.sessions)), address, str(SINK_BACKLOG)]
    return source_argv, sink_argv


def measure(tools: tuple[str, str], pair: Shape, port: int) -> dict:
    """One run of the pair: its figures (the keys perf.report's table reads)."""
    source_argv, sink_argv = commands(tools, pair, port, os.geteuid() == 0)
    loadavg = os.getloadavg()[0]
    sink = subprocess.Popen(sink_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        try:
            wait_greeting(port, 10.0, alive=lambda: sink.poll() is None)
        except RuntimeError as exc:
            raise RuntimeError(f"smtp-sink: {exc}: {sink.stderr.read().decode(errors='replace')[-500:]}"
                               if sink.poll() is not None else f"smtp-sink: {exc}") from None
        sink_cpu = procstat.cpu_seconds(sink.pid)
        began = time.monotonic()
        source = subprocess.Popen(source_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        try:
            _, status, usage = os.wait4(source.pid, 0)  # its rusage: the source's CPU
        except BaseException:
            source.kill()
            source.wait()
            raise
        source.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - began
        sink_cpu = procstat.cpu_seconds(sink.pid) - sink_cpu
        if source.returncode != 0:
            raise RuntimeError(f"smtp-source exited {source.returncode}:"
                               f" {source.stderr.read().decode(errors='replace')[-500:]}")
    finally:
        sink.terminate()
        try:
            sink.wait(10)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait(5)
    elapsed = max(elapsed, 1e-9)
    recipients = pair.messages * pair.recipients
    return {
        "injected": pair.messages,
        "delivered": recipients,
        "injected_per_s": round(pair.messages / elapsed, 1),
        "delivered_per_s": round(recipients / elapsed, 1),
        "elapsed_seconds": round(elapsed, 3),
        "cpu_seconds": {"server": None, "generator": round(usage.ru_utime + usage.ru_stime, 2),
                        "sinks": round(sink_cpu, 2)},
        "loadavg_before": loadavg,
    }


def fractions(medians: dict[str, dict], ceiling: dict) -> dict[str, float | None]:
    """Each side's delivered/s as a fraction of the pair's."""
    top = ceiling.get("delivered_per_s")
    out = {}
    for label, figures in medians.items():
        mine = figures.get("delivered_per_s")
        out[label] = round(mine / top, 3) if mine is not None and top else None
    return out


def describe(tools: tuple[str, str], pair: Shape) -> dict:
    """The JSON record's fixed part: the traffic and the command (port elided)."""
    source_argv, sink_argv = commands(tools, pair, 0, os.geteuid() == 0)
    names = [os.path.basename(source_argv[0]), *source_argv[1:-1], "127.0.0.1:PORT"]
    sinks = [os.path.basename(sink_argv[0]), *sink_argv[1:-2], "127.0.0.1:PORT", sink_argv[-1]]
    return {
        "messages": pair.messages, "size_bytes": pair.size, "recipients": pair.recipients,
        "sessions": pair.sessions, "source_command": " ".join(names), "sink_command": " ".join(sinks),
    }
