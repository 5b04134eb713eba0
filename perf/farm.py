"""The far end of a benchmark: the fake internet in a process of its own.

Input: a ``Layout`` (MX sites with their behaviour, and which site each
recipient domain's MX record points to).  Output: a running FakeDNS and
SinkFarm (relay.testing.fakenet) on uvloop in a child process, a shared
counter of recipients received (for the progress bar) and, on request, the
receipts — (time received, recipients) for each accepted transaction —
the count of connections the sinks accepted, the DKIM-Signature fields
they saw and the first signed message (for the harness to verify).

Why a process: the sinks' SMTP work is a third of a benchmark's CPU; in
the generator's process it would compete for that process's GIL and skew
the inject timings.  Why receipts are stamped here: ``Received`` carries no
time, and the sink's receipt is the delivery time the harness reports.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from dataclasses import dataclass, field

START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Site:
    """One MX host: a sink on a loopback address, under one name."""

    ip: str
    name: str  # the MX host name its domains point to
    reply_delay: float = 0.0  # seconds before each reply after the greeting
    max_messages: int | None = None  # per connection; then 421 at MAIL
    group: str = "fast"  # for reports: which kind of receiver this is


@dataclass(frozen=True)
class Layout:
    sites: tuple[Site, ...]
    domains: tuple[tuple[str, int], ...]  # (domain, index of its MX site)
    apexes: tuple[str, ...] = ("example",)

    def routes(self, port: int) -> dict[str, tuple[str, int]]:
        """Static next hops of every domain (for DNS-free comparisons)."""
        return {domain: (self.sites[site].ip, port) for domain, site in self.domains}

    def mx_names(self) -> dict[str, str]:
        """The MX host name of each site's address (its certificate names both)."""
        return {site.ip: site.name for site in self.sites}

    def group_of(self) -> dict[str, str]:
        return {domain: self.sites[site].group for domain, site in self.domains}


@dataclass
class Stats:
    connections_opened: int = 0
    chunked_transactions: int = 0  # of ``transactions``, those sent with BDAT
    transactions: int = 0
    signed_transactions: int = 0  # of ``transactions``, those whose message had a DKIM-Signature
    signatures: int = 0  # DKIM-Signature fields, over every message
    signed_sample: bytes = b""  # the first signed message, as received
    by_site: dict = field(default_factory=dict)  # ip -> connections opened


def _serve(layout: Layout, conn, delivered, pki_directory: str | None, chunking: bool) -> None:
    """The child: build the fake internet, answer commands until "stop"."""
    import uvloop

    from perf.options import count_signatures
    from relay.testing.fakenet import TLS_OFF, TLS_ON, Behaviour, FakeInternet, SinkFarm

    class TimedFarm(SinkFarm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.receipts: list[tuple[float, tuple[str, ...]]] = []
            self.chunked = 0
            self.signed = 0
            self.signatures = 0
            self.signed_sample = b""

        def _record(self, sink, received):
            self.receipts.append((time.time(), received.rcpt_tos))
            self.chunked += received.chunked
            signatures = count_signatures(received.data)
            if signatures:
                self.signed += 1
                self.signatures += signatures
                self.signed_sample = self.signed_sample or received.data
            delivered.value += len(received.rcpt_tos)
            # Received objects are not needed: keep memory flat on big runs.
            return len(self.receipts)

    async def main() -> None:
        net = FakeInternet(apexes=layout.apexes, keep_data=False)
        # keep_data: each message reaches _record, which counts its
        # signatures and keeps none but the first signed one.
        net.farm = TimedFarm(keep_data=True, pki_directory=pki_directory)
        tls = TLS_ON if pki_directory else TLS_OFF
        for site in layout.sites:
            behaviour = Behaviour(reply_delay=site.reply_delay, max_messages=site.max_messages,
                                  tls=tls, chunking=chunking)
            net.add_host(site.name, site.ip, behaviour)
        for domain, site in layout.domains:
            net.dns.add_mx(domain, [(10, layout.sites[site].name)])
        ca_path = ""
        if pki_directory:
            ca_path = net.farm.ca_cert_path
            for sink in net.farm.sinks.values():
                sink._tls_context()  # issued now, not at the run's first connections
        await net.start()
        loop = asyncio.get_running_loop()
        stopped = loop.create_future()

        def on_command() -> None:
            # libuv's poll handle made the pipe non-blocking; a big pickle
            # must be written whole, so block while answering.
            os.set_blocking(conn.fileno(), True)
            try:
                command = conn.recv()
            except EOFError:
                command = "stop"
            if command == "receipts":
                conn.send(net.farm.receipts)
            elif command == "stats":
                sinks = net.farm.sinks.values()
                conn.send(Stats(
                    connections_opened=sum(s.connections_opened for s in sinks),
                    transactions=len(net.farm.receipts),
                    chunked_transactions=net.farm.chunked,
                    signed_transactions=net.farm.signed,
                    signatures=net.farm.signatures,
                    signed_sample=net.farm.signed_sample,
                    by_site={s.ip: s.connections_opened for s in sinks},
                ))
            elif command == "stop" and not stopped.done():
                stopped.set_result(None)

        loop.add_reader(conn.fileno(), on_command)
        conn.send(("ready", net.nameserver, net.mx_port, ca_path))
        await stopped
        loop.remove_reader(conn.fileno())
        await net.stop()
        conn.send("stopped")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


class Farm:
    """Start/stop the fake internet process; read its counters and receipts.

    With ``pki_directory`` every sink offers STARTTLS with a certificate
    (its MX name and its IP) from a test CA kept there: ``ca_path``.  With
    ``chunking`` every sink offers CHUNKING (BDAT, RFC 3030)."""

    def __init__(self, layout: Layout, pki_directory: str | None = None,
                 chunking: bool = False) -> None:
        self.layout = layout
        context = multiprocessing.get_context("spawn")
        self.delivered = context.RawValue("q", 0)
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(layout, child, self.delivered, pki_directory, chunking),
            name="perf-farm",
            daemon=True,
        )
        self.nameserver = ""
        self.mx_port = 0
        self.ca_path = ""

    def start(self) -> "Farm":
        self.process.start()
        if not self._conn.poll(START_TIMEOUT):
            self.process.kill()
            raise RuntimeError("the fake internet did not start")
        _, self.nameserver, self.mx_port, self.ca_path = self._conn.recv()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def config_overrides(self) -> dict:
        return {"dns": {"nameservers": [self.nameserver]}, "deliver": {"mx_port": self.mx_port}}

    def received(self) -> int:
        """Recipients received so far (cheap: a shared counter)."""
        return self.delivered.value

    def _ask(self, command: str):
        self._conn.send(command)
        if not self._conn.poll(START_TIMEOUT):
            raise RuntimeError(f"the fake internet did not answer {command!r}")
        return self._conn.recv()

    def receipts(self) -> list[tuple[float, tuple[str, ...]]]:
        return self._ask("receipts")

    def stats(self) -> Stats:
        return self._ask("stats")

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self._ask("stop")
            except (RuntimeError, OSError, EOFError):
                pass
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self._conn.close()

    def __enter__(self) -> "Farm":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def layout(domains: int, sites: int, *, slow_sites: int = 0, slow_delay: float = 2.0,
           max_messages: int | None = None, first_ip: int = 10, prefix: str = "d") -> Layout:
    """``domains`` recipient domains spread round robin over ``sites`` MX
    hosts (127.0.0.10, .11, ...); the first ``slow_sites`` answer each
    command after ``slow_delay`` seconds; ``max_messages`` makes every site
    answer 421 after that many messages on one connection."""
    if sites > 240:
        raise ValueError("at most 240 sites (127.0.0.10 .. 127.0.0.249)")
    made = tuple(
        Site(
            ip=f"127.0.0.{first_ip + i}",
            name=f"mx.p{i:03d}.example",
            reply_delay=slow_delay if i < slow_sites else 0.0,
            max_messages=max_messages,
            group="slow" if i < slow_sites else "fast",
        )
        for i in range(sites)
    )
    return Layout(made, tuple((f"{prefix}{n:04d}.example", n % sites) for n in range(domains)))


if __name__ == "__main__":  # a manual look: python -m perf.farm
    with Farm(layout(4, 2)) as farm:
        print("dns", farm.nameserver, "mx port", farm.mx_port, "pid", farm.pid, os.getpid())
        print(farm.stats())
