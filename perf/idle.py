"""The idle-connections scenario: what an idle inbound SMTP session costs.

Input: ``--connections N`` (10,000 by default, 1,000 with --quick) and
``--runs``.  Output: the relay workers' RSS before and after N clients
connected, read the greeting and said EHLO (and then said nothing), that
growth divided by N, and the DATA-to-250 latency of messages sent on one
more connection before and while the N are held.  Printed as a table and
written as JSON like the other scenarios.

The clients come from several 127.0.2.x source addresses, so the 4-tuples
never run out of ephemeral ports; this process raises its own open-files
soft limit to the hard limit and refuses an N that does not fit under it.
The relay's per-IP session limit and idle timeout are raised for the run:
the figure wanted is memory, not policy.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import sys
import tempfile
import time

import uvloop

from perf import procstat, report
from perf.farm import Farm, layout
from perf.loadgen import SENDER, Client, connect, filler, send_quit, sources
from perf.mta import Relay

CONNECTIONS_PER_SOURCE = 2_000
CONNECT_BATCH = 250  # connections opened concurrently
PROBES = 30  # messages timed before and while the idle ones are held
SETTLE = 2.0  # seconds after the last connection before RSS is read
MB = 1024 * 1024


async def data_to_250(client: Client, n: int, body: bytes) -> float:
    """One message; seconds from writing DATA to the 250 after the dot."""
    client.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<r{n}.0@d0000.example>\r\n".encode())
    for reply in await client.replies(2):
        if not reply.startswith(b"250"):
            raise RuntimeError(f"refused: {reply!r}")
    started = time.perf_counter()
    client.write(b"DATA\r\n")
    (reply,) = await client.replies(1)
    if not reply.startswith(b"354"):
        raise RuntimeError(f"DATA refused: {reply!r}")
    client.write(body)
    (reply,) = await client.replies(1)
    if not reply.startswith(b"250"):
        raise RuntimeError(f"message refused: {reply!r}")
    return time.perf_counter() - started


async def probe(port: int, first: int) -> list[float]:
    body = b"Subject: probe\r\n\r\n" + filler(2048) + b".\r\n"
    client = await connect("127.0.0.1", port, "127.0.0.1")
    try:
        return [await data_to_250(client, first + k, body) for k in range(PROBES)]
    finally:
        await send_quit(client)


async def hold(port: int, count: int) -> tuple[list[Client], float, int]:
    """Open ``count`` sessions (greeting + EHLO) and keep them."""
    addresses = sources(max(1, -(-count // CONNECTIONS_PER_SOURCE)), network="127.0.2")
    held: list[Client] = []
    failures = 0
    began = time.monotonic()
    for start in range(0, count, CONNECT_BATCH):
        batch = range(start, min(start + CONNECT_BATCH, count))
        opened = await asyncio.gather(
            *(connect("127.0.0.1", port, addresses[i % len(addresses)]) for i in batch),
            return_exceptions=True,
        )
        for item in opened:
            if isinstance(item, Client):
                held.append(item)
            else:
                failures += 1
    return held, time.monotonic() - began, failures


async def one_run(relay: Relay, count: int) -> dict:
    await probe(relay.port, 0)  # warm-up: every lazily built object exists before the baseline
    before_latency = await probe(relay.port, 1000)
    await asyncio.sleep(SETTLE)
    workers = relay.worker_pids()
    rss_before = [procstat.rss_bytes(pid) for pid in workers]
    cpu_before = relay.cpu_seconds()
    held, connect_seconds, failures = await hold(relay.port, count)
    await asyncio.sleep(SETTLE)
    rss_after = [procstat.rss_bytes(pid) for pid in workers]
    fds = [procstat.fd_count(pid) for pid in workers]
    during_latency = await probe(relay.port, 2000)
    still_open = sum(1 for client in held if not client.closed)
    cpu_after = relay.cpu_seconds()
    for client in held:
        client.close()
    await asyncio.sleep(0.5)
    growth = sum(rss_after) - sum(rss_before)
    return {
        "connections_requested": count,
        "connections_held": len(held),
        "connections_still_open": still_open,
        "connect_failures": failures,
        "connect_seconds": round(connect_seconds, 2),
        "worker_rss_before_bytes": sum(rss_before),
        "worker_rss_after_bytes": sum(rss_after),
        "worker_rss_after_per_worker_bytes": rss_after,
        "worker_fds": fds,
        "rss_per_idle_connection_bytes": round(growth / max(len(held), 1)),
        "data_to_250_ms_before": report.percentiles(before_latency),
        "data_to_250_ms_held": report.percentiles(during_latency),
        "relay_cpu_seconds_opening": round(cpu_after - cpu_before, 2),
    }


def main(args) -> int:
    count = args.connections or (1_000 if args.quick else 10_000)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if count + 200 > soft:
        print(f"idle-connections: {count} connections need more open files than this process"
              f" may have ({soft}): raise the hard limit (scripts/nofile)", file=sys.stderr)
        return 2
    top = tempfile.mkdtemp(prefix="relay-bench-idle-")
    runs = []
    try:
        for index in range(args.runs):
            workdir = tempfile.mkdtemp(dir=top)
            with Farm(layout(domains=1, sites=1)) as farm:
                relay = Relay(
                    workdir, workers=args.workers, deliver_to=farm.config_overrides(),
                    overrides={"intake": {"max_connections_per_ip": count + 100, "idle_timeout": "30m"}},
                    tree=args.relay_tree,
                )
                relay.start()
                try:
                    print(f"run {index + 1}: holding {count} idle connections", file=sys.stderr)
                    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                        figures = runner.run(one_run(relay, count))
                finally:
                    relay.stop()
            runs.append(figures)
            print(f"  {figures['connections_held']} held,"
                  f" {figures['rss_per_idle_connection_bytes'] / 1024:.1f} KB each", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept: {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    median = report.median(runs)
    rows = [
        ("connections held", f"{median['connections_held']:,.0f} of {count:,}"),
        ("still open after the probes", f"{median['connections_still_open']:,.0f}"),
        ("time to open them", f"{median['connect_seconds']:.1f} s"),
        ("workers' RSS before", f"{median['worker_rss_before_bytes'] / MB:.1f} MB"),
        ("workers' RSS while held", f"{median['worker_rss_after_bytes'] / MB:.1f} MB"),
        ("RSS per idle connection", f"{median['rss_per_idle_connection_bytes'] / 1024:.1f} KB"),
        ("DATA->250 p50/p99 before", "{p50}/{p99} ms".format(**median["data_to_250_ms_before"])),
        ("DATA->250 p50/p99 while held", "{p50}/{p99} ms".format(**median["data_to_250_ms_held"])),
    ]
    print(f"\nidle-connections: median of {args.runs} run(s)")
    for name, value in rows:
        print(f"{name:<32}{value:>24}")
    if args.json:
        from perf.bench import machine

        with open(args.json, "w") as file:
            json.dump({
                "scenario": "idle-connections", "quick": args.quick,
                "command": "perf/bench " + " ".join(sys.argv[1:]),
                "machine": machine(), "runs": runs, "median": median,
            }, file, indent=2)
            file.write("\n")
    return 0
