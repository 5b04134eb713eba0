"""perf/bench: run one scenario against the relay (and Postfix), report the figures.

Input: ``--scenario NAME`` (perf.scenarios), ``--quick``, ``--runs N``,
``--vs-postfix``, ``--dkim``, ``--tls``, ``--chunking`` (perf.options), ``--ceiling``
(perf.ceiling), ``--json FILE``, ``--connections N`` (idle-connections).
Output: a progress bar on stderr, a table on stdout (medians over the
runs, and the ratio relay/Postfix or 1M-deferred/empty; with --dkim, what
the sinks saw of each side's signatures), and the same as JSON: every
run's figures, the medians, the ratios and the machine.

One run: the fake internet starts in its own process (perf.farm), then the
server under test in a temp dir (perf.mta), then the generator (perf.loadgen)
injects every stream from this process until each stream's count is sent
or the scenario's time limit; the run ends when the sinks hold every
accepted recipient or the drain limit passes.  CPU seconds come from /proc
(the server's whole process tree, with Postfix's signing milters, the
sinks' process, this process); RSS
is sampled every 250 ms.  With several variants (relay and Postfix, or an
empty and a full spool, or SMTP and HTTP or AMQP intake) the runs
alternate pair by pair, so load from other users of the machine hits both
sides alike.  With ``--ceiling`` each round ends with the C-pair
(smtp-source -> smtp-sink, no server between) at the scenario's size and
connections, and every side's delivered/s is reported as a fraction of it.

http-inject and amqp-intake compare two intakes of one relay config, stream
by stream (labels ``smtp/<stream>`` and ``http/<stream>`` or
``amqp/<stream>``, one run each): the HTTP side's generator is
perf.http_load (the same messages as requests); the AMQP side fills a
queue of the run's own name first, then starts the relay and times the
consumption (perf.amqp_load).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import uvloop

from perf import amqp_load, ceiling, procstat, report, scenarios
from perf import options as bench_options
from perf import deferred as deferred_spool
from perf.http_load import HttpGenerator
from perf.farm import Farm
from perf.loadgen import Generator, sources
from perf.mta import Cluster, OpenDkim, Postfix, Relay, free_port, postfix_path
from perf.scenarios import Scenario

GENERATOR_SOURCES = 8  # 127.0.1.1 .. 127.0.1.8
SAMPLE_INTERVAL = 0.25  # progress and end-of-run checks
PSS_INTERVAL = 1.0  # smaps_rollup of a few hundred Postfix processes costs real CPU
PROGRESS_INTERVAL_TTY = 0.25
PROGRESS_INTERVAL_PIPE = 5.0
# The relay's default connection_limit per site, for the whole relay (split
# evenly between its workers); Postfix gets the same per destination.
RELAY_CONNECTIONS_PER_DESTINATION = 20
HTTP_TOKEN_NAME = "bench"
AMQP_START_LIMIT = 60.0  # seconds for the relay to start and take its first messages


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as file:
            model = next((l.split(":", 1)[1].strip() for l in file if l.startswith("model name")), "")
        with open("/proc/meminfo") as file:
            memory = int(file.readline().split()[1]) * 1024
    except OSError:
        memory = 0
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_bytes": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


class Progress:
    """One line on stderr, redrawn in place on a terminal, every few seconds otherwise."""

    def __init__(self, label: str, total_messages: int, total_recipients: int) -> None:
        self.label = label
        self.total_messages = total_messages
        self.total_recipients = total_recipients
        self.tty = sys.stderr.isatty()
        self.interval = PROGRESS_INTERVAL_TTY if self.tty else PROGRESS_INTERVAL_PIPE
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, injected: int, delivered: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        done = delivered / self.total_recipients if self.total_recipients else 1.0
        bar = "#" * int(30 * min(done, 1.0))
        line = (f"{self.label:<16} [{bar:<30}] injected {injected}/{self.total_messages}"
                f" delivered {delivered}/{self.total_recipients} {now - self.started:6.1f}s")
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if force else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class PySpy:
    """py-spy recording the relay's processes during a run (when asked and installed)."""

    def __init__(self, pid: int, output: str, gil: bool = False) -> None:
        command = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.output = output
        # --gil: only threads holding the GIL, i.e. Python's own CPU; without
        # it, threads in SQLite or fsync (GIL released) are sampled too.
        with open(output + ".log", "wb") as log:
            self.proc = subprocess.Popen(
                [command, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
                 "--rate", "200", "--nonblocking", "--output", output, *(["--gil"] if gil else [])],
                stdout=log, stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def drive(scenario: Scenario, server, farm: Farm, label: str, run_tag: str,
                py_spy: str | None, py_spy_gil: bool = False, http: tuple[int, str] | None = None,
                tls=None, dkim_files: bench_options.Files | None = None) -> dict:
    """Inject (over SMTP, or over HTTP when ``http`` is (port, token)), wait
    for the deliveries, and measure; returns the run's figures.  ``tls``:
    the generator's STARTTLS context (SMTP only); ``dkim_files``: the keys
    to verify a signed message with (--dkim)."""
    if http is None:
        generator = Generator("127.0.0.1", server.port, sources=sources(GENERATOR_SOURCES),
                              run_tag=run_tag, ports=getattr(server, "ports", ()), tls=tls,
                              server_hostname=bench_options.INTAKE_NAME)
    else:
        generator = HttpGenerator("127.0.0.1", http[0], http[1], run_tag=run_tag)
    total_messages = sum(s.messages for s in scenario.streams)
    progress = Progress(label, total_messages, sum(s.messages * s.recipients for s in scenario.streams))
    peak_pss = 0
    cpu_server = server.cpu_seconds()
    cpu_sinks = procstat.cpu_seconds(farm.pid)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_generator = usage.ru_utime + usage.ru_stime
    spy = PySpy(server.root_pid, py_spy, py_spy_gil) if py_spy else None
    started = time.monotonic()
    injecting = asyncio.ensure_future(generator.run(list(scenario.streams), started + scenario.time_limit))

    def accepted_recipients() -> int:
        return sum(i.recipients for i in generator.injections if i.code == 250)

    drain_deadline = None
    sampler_cpu = 0.0  # this process's CPU spent reading /proc: not the generator's
    next_pss = 0.0
    while True:
        if time.monotonic() >= next_pss:
            next_pss = time.monotonic() + PSS_INTERVAL
            began = time.process_time()
            peak_pss = max(peak_pss, server.pss_bytes())
            sampler_cpu += time.process_time() - began
        progress.update(len(generator.injections), farm.received())
        if injecting.done():
            injecting.result()
            if scenario.held:  # nothing is delivered: intake alone is measured
                break
            if drain_deadline is None:
                drain_deadline = time.monotonic() + scenario.drain_limit
            if farm.received() >= accepted_recipients() or time.monotonic() > drain_deadline:
                break
        await asyncio.sleep(SAMPLE_INTERVAL)
    elapsed = time.monotonic() - started
    progress.update(len(generator.injections), farm.received(), force=True)
    if spy is not None:
        spy.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    sinks = farm.stats()
    figures = report.summarise(generator.injections, farm.receipts(), scenario.layout.group_of())
    figures.update({
        "elapsed_seconds": round(elapsed, 2),
        # 1: the drain limit passed first
        "timed_out": int(not scenario.held and farm.received() < accepted_recipients()),
        "cpu_seconds": {
            "server": round(server.cpu_seconds() - cpu_server, 2),
            "generator": round(usage.ru_utime + usage.ru_stime - cpu_generator - sampler_cpu, 2),
            "sampler": round(sampler_cpu, 2),
            "sinks": round(procstat.cpu_seconds(farm.pid) - cpu_sinks, 2),
        },
        "sampled_peak_pss_bytes": peak_pss,
        "peak_rss_bytes": sum(server.peak_rss()) if isinstance(server, (Relay, Cluster)) else None,
        "peak_rss_per_worker_bytes": (server.peak_rss() if isinstance(server, (Relay, Cluster))
                                      else None),
        "outbound_connections": sinks.connections_opened,
        "outbound_transactions": sinks.transactions,
        "outbound_chunked_transactions": sinks.chunked_transactions,
        **dkim_figures(sinks, dkim_files),
        "errors": dict(generator.errors.most_common(10)),
    })
    return figures


def dkim_figures(sinks, files: bench_options.Files | None) -> dict:
    """What the sinks saw of DKIM: signed transactions, signatures, and the
    check of the first signed message's signatures (with ``files``' keys;
    None when nothing was signed or no keys were given)."""
    verified = None
    if files is not None and files.dkim_keys and sinks.signed_sample:
        verified = bench_options.verify_sample(sinks.signed_sample, files)
    return {"outbound_signed_transactions": sinks.signed_transactions,
            "outbound_dkim_signatures": sinks.signatures,
            "dkim_sample_verified": verified}


def dkim_lines(runs: dict[str, list[dict]]) -> list[str]:
    """One line per side: its signatures over all runs, and each run's check
    of a signed message (``ok``: every signature verified)."""
    lines = []
    for label, found in runs.items():
        transactions = sum(run.get("outbound_transactions") or 0 for run in found)
        signed = sum(run.get("outbound_signed_transactions") or 0 for run in found)
        signatures = sum(run.get("outbound_dkim_signatures") or 0 for run in found)
        checks = []
        for run in found:
            verified = run.get("dkim_sample_verified")
            if verified is None:
                checks.append("not checked" if run.get("outbound_signed_transactions") else "none signed")
            elif len(verified) < len(bench_options.DKIM_KEYS) or not all(verified):
                checks.append(f"{verified.count(True)} of {len(bench_options.DKIM_KEYS)} signatures verified")
            else:
                checks.append(f"ok ({len(verified)} of {len(bench_options.DKIM_KEYS)})")
        lines.append(f"{label}: {signed:,} of {transactions:,} transactions signed, {signatures:,}"
                     f" signatures; first signed message of each run: {', '.join(checks)}")
    return lines


async def drive_amqp(scenario: Scenario, server: Relay, farm: Farm, backlog: amqp_load.Backlog,
                     label: str, py_spy: str | None = None, py_spy_gil: bool = False) -> dict:
    """Start the relay on a full queue, time its consumption and the
    deliveries; returns the run's figures (started: the consumption).
    ``py_spy``: record from when the relay has started (its first second
    of consumption is missed: it consumes before start() returns)."""
    from relay.stats import ring

    (stream,) = scenario.streams
    total = stream.messages
    progress = Progress(label, total, total * stream.recipients)
    readers: list = []

    def acked() -> int | None:
        try:
            if not readers:
                readers.append(ring.Reader(ring.ring_path(os.path.join(server.directory, "run"))))
            return ring.merge(readers[0].read())["counters"]["amqp_acked"]
        except (OSError, ValueError):
            readers.clear()  # not there yet
            return None

    loop = asyncio.get_running_loop()
    cpu_sinks = procstat.cpu_seconds(farm.pid)
    began = time.monotonic()
    ready_at: list[float] = []
    spies: list[PySpy] = []

    def start() -> None:
        server.start()
        ready_at.append(time.monotonic())
        if py_spy:
            spies.append(PySpy(server.root_pid, py_spy, py_spy_gil))

    # The relay consumes as soon as a worker is up, before start() returns.
    starting = loop.run_in_executor(None, start)
    deadline = began + AMQP_START_LIMIT + scenario.time_limit
    consumed = asyncio.ensure_future(amqp_load.wait_consumed(backlog, total, acked, deadline))
    await asyncio.wait([starting, consumed], return_when=asyncio.FIRST_EXCEPTION)
    if starting.done() and starting.exception() is not None:
        consumed.cancel()
        raise starting.exception()
    start, spooled = await consumed
    await starting
    startup = ready_at[0] - began
    peak_pss = server.pss_bytes()
    drain_deadline = time.monotonic() + scenario.drain_limit
    while farm.received() < total * stream.recipients and time.monotonic() < drain_deadline:
        peak_pss = max(peak_pss, server.pss_bytes())
        progress.update(acked() or 0, farm.received())
        await asyncio.sleep(SAMPLE_INTERVAL)
    progress.update(acked() or 0, farm.received(), force=True)
    elapsed = time.monotonic() - began
    for spy in spies:
        spy.stop()
    for reader in readers:
        reader.close()
    sinks = farm.stats()
    records = amqp_load.injections(stream, start, spooled)
    figures = report.summarise(records, farm.receipts(), scenario.layout.group_of())
    # Every record starts at the consumption's start: per-message latencies
    # would be meaningless, so none are reported.
    figures["inject_to_250_ms"] = report.percentiles([])
    figures["inject_to_delivered_ms"] = report.percentiles([])
    for found in figures["by_stream"].values():
        found["inject_to_250_ms"] = found["inject_to_delivered_ms"] = report.percentiles([])
    figures.update({
        "elapsed_seconds": round(elapsed, 2),
        "timed_out": int(farm.received() < total * stream.recipients or not spooled),
        # Consumption overlaps the relay's startup: its CPU cannot be told
        # apart from the startup's, so only the total is given.
        "server_cpu_seconds_with_startup": round(server.cpu_seconds(), 2),
        "cpu_seconds": {
            "server": None,
            "generator": 0.0,
            "sampler": 0.0,
            "sinks": round(procstat.cpu_seconds(farm.pid) - cpu_sinks, 2),
        },
        "sampled_peak_pss_bytes": peak_pss,
        "peak_rss_bytes": sum(server.peak_rss()),
        "peak_rss_per_worker_bytes": server.peak_rss(),
        "outbound_connections": sinks.connections_opened,
        "outbound_transactions": sinks.transactions,
        "outbound_chunked_transactions": sinks.chunked_transactions,
        **dkim_figures(sinks, None),
        "errors": {},
        "startup_seconds": round(startup, 2),
        # The same figures as injected_per_s and delivered_per_s, by the names
        # this side measures them under.
        "consumed_to_spooled_per_s": figures["injected_per_s"],
        "consumed_to_delivered_per_s": figures["delivered_per_s"],
    })
    return figures


def http_config(port: int) -> tuple[dict, str]:
    """The ``[http]`` table on ``port`` with a new inject token, and that token."""
    from relay.intake.http import tokens

    token = tokens.new_token()
    return {"address": f"127.0.0.1:{port}",
            "tokens": [{"name": HTTP_TOKEN_NAME, "token_hash": tokens.hash_token(token),
                        "scopes": ["inject"]}]}, token


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on HTTP port {port} after {timeout}s")
            time.sleep(0.05)


def signing_milters(workdir: str, options: bench_options.Options,
                    files: bench_options.Files) -> list[OpenDkim]:
    """The signing milters of the Postfix under test with --dkim, one per
    key, where OpenDKIM is installed (none: Postfix runs unsigned, as the
    report says)."""
    command = bench_options.opendkim_path()
    if not options.dkim or command is None:
        return []
    milters = []
    for algorithm, selector, key_file in files.dkim_keys:
        directory = os.path.join(workdir, f"opendkim-{selector}")
        port = free_port()
        milters.append(OpenDkim(command, directory, port, bench_options.opendkim_files(
            algorithm, selector, key_file, directory, port)))
    return milters


def sinks_pki(workdir: str, options: bench_options.Options) -> str | None:
    """Where the sinks' test CA lives with --tls (None: the sinks are plaintext)."""
    if not options.tls:
        return None
    directory = os.path.join(workdir, "sinks-pki")
    os.makedirs(directory)
    return directory


def run_once(scenario: Scenario, kind: str, args, workdir: str, index: int,
             deferred_template: str | None, intake: str = "smtp",
             files: bench_options.Files = bench_options.Files()) -> dict:
    """One run of a scenario through one server (kind: relay or postfix),
    its mail taken in by ``intake`` (smtp, http or amqp; the last two: relay
    only); ``files``: what --dkim and --tls need (perf.options)."""
    loadavg = os.getloadavg()[0]
    options = bench_options.Options(dkim=args.dkim, tls=args.tls, chunking=args.chunking)
    if intake == "amqp":
        return _run_amqp(scenario, args, workdir, index, loadavg, options, files)
    with Farm(scenario.layout, pki_directory=sinks_pki(workdir, options),
              chunking=options.chunking) as farm:
        routes = scenario.layout.routes(farm.mx_port) if args.vs_postfix else None
        extra = bench_options.relay_overrides(options, files, farm.ca_path)
        http = None
        if kind.startswith("hosts-"):
            server = Cluster(workdir, hosts=int(kind.split("-")[1]), workers=scenario.workers or 1,
                             deliver_to=farm.config_overrides(), amqp_url=amqp_load.URL,
                             overrides=bench_options.merge(scenario.relay_overrides, extra),
                             tree=args.relay_tree)
        elif kind == "postfix":
            milters = signing_milters(workdir, options, files)
            server = Postfix(workdir, routes=routes,
                             concurrency=RELAY_CONNECTIONS_PER_DESTINATION,
                             messages_per_connection=100,
                             main_cf={**bench_options.postfix_main_cf(
                                          options, files, farm.ca_path,
                                          tuple(milter.port for milter in milters)),
                                      **({"defer_transports": "smtp"} if scenario.held else {})},
                             milters=milters,
                             tls_policy=(bench_options.postfix_tls_policy(
                                 routes, scenario.layout.mx_names()) if options.tls else ""))
        else:
            overrides = bench_options.merge(scenario.relay_overrides, extra)
            if scenario.intake == "http":
                # Both sides of http-inject serve HTTP: one config, two intakes.
                http_port = free_port()
                overrides["http"], token = http_config(http_port)
                if intake == "http":
                    http = (http_port, token)
            server = Relay(workdir, workers=scenario.workers or args.workers,
                           deliver_to=farm.config_overrides(), routes=routes, overrides=overrides,
                           tree=args.relay_tree)
            if deferred_template:
                deferred_spool.copy(deferred_template, server.spool_dir)
        began = time.monotonic()
        server.start()
        startup = time.monotonic() - began
        if scenario.held and isinstance(server, Relay):
            for domain, _ in scenario.layout.domains:
                server.relayctl("suspend", domain)
        try:
            if http is not None:
                wait_listening(http[0])
            rss_idle = server.rss_bytes()
            spy = None
            if args.py_spy and kind == "relay" and index == 0:
                os.makedirs(args.py_spy, exist_ok=True)
                mode = "gil" if args.py_spy_gil else "active"
                spy = os.path.join(args.py_spy, f"{scenario.name}-{kind}-{mode}.txt")
            label = f"{kind}{'+deferred' if deferred_template else ''} #{index + 1}"
            if scenario.intake:
                label = f"{intake}/{scenario.streams[0].name} #{index + 1}"
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                figures = runner.run(drive(scenario, server, farm, label, f"{kind}{index}", spy,
                                           args.py_spy_gil, http,
                                           bench_options.client_context(files),
                                           files if options.dkim else None))
        finally:
            server.stop()
        if deferred_template:
            # Proof that the run had the big spool: still there after the run.
            figures["spool_deferred_after"] = deferred_spool.count(server.spool_dir)
        figures.update({
            "server": kind,
            "startup_seconds": round(startup, 2),
            "rss_after_start_bytes": rss_idle,
            "loadavg_before": loadavg,
            "profile": spy,
        })
        return figures


def _run_amqp(scenario: Scenario, args, workdir: str, index: int, loadavg: float,
              options: bench_options.Options, files: bench_options.Files) -> dict:
    """The AMQP side: fill a queue of this run's own, start the relay on it, time it, delete it."""
    (stream,) = scenario.streams
    queue = f"relay-bench-{uuid.uuid4().hex[:12]}"
    with Farm(scenario.layout, pki_directory=sinks_pki(workdir, options),
              chunking=options.chunking) as farm, \
            asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        backlog = runner.run(amqp_load.Backlog(queue).open())
        server = None
        try:
            began = time.monotonic()
            runner.run(backlog.fill(amqp_load.postmanq_bodies(stream, f"amqp{index}")))
            published = time.monotonic() - began
            overrides = bench_options.merge(
                scenario.relay_overrides,
                {**bench_options.relay_overrides(options, files, farm.ca_path),
                 "amqp": {"consumer": [{"url": amqp_load.URL, "queue": queue}]}})
            server = Relay(workdir, workers=scenario.workers or args.workers,
                           deliver_to=farm.config_overrides(), overrides=overrides,
                           tree=args.relay_tree)
            try:
                spy = None
                if args.py_spy and index == 0:
                    os.makedirs(args.py_spy, exist_ok=True)
                    mode = "gil" if args.py_spy_gil else "active"
                    spy = os.path.join(args.py_spy, f"{scenario.name}-amqp-{mode}.txt")
                figures = runner.run(drive_amqp(scenario, server, farm, backlog,
                                                f"amqp/{stream.name} #{index + 1}", spy,
                                                args.py_spy_gil))
            finally:
                server.stop()
        finally:
            runner.run(backlog.delete())
            runner.run(backlog.close())
    figures.update({
        "server": "relay",
        "publish_seconds": round(published, 2),
        "rss_after_start_bytes": None,
        "loadavg_before": loadavg,
        "profile": spy,
    })
    return figures


def variants(scenario: Scenario, args) -> list[tuple[str, str, bool]]:
    """(label, server kind, with the deferred spool) of each side to compare."""
    if scenario.intake:
        if args.vs_postfix:
            print(f"--vs-postfix: not for {scenario.name} (it compares two intakes of the relay)",
                  file=sys.stderr)
        return [(f"{intake}/{stream.name}", "relay", False)
                for stream in scenario.streams for intake in ("smtp", scenario.intake)]
    if scenario.cluster:
        if args.vs_postfix:
            print("--vs-postfix: not for cluster (it compares cluster sizes)", file=sys.stderr)
        return [(f"hosts-{n}", f"hosts-{n}", False) for n in range(1, scenario.cluster + 1)]
    if scenario.deferred:
        if args.vs_postfix:
            print("--vs-postfix: not for deferred-1m (it compares the relay with itself)", file=sys.stderr)
        return [("relay-empty", "relay", False), ("relay-deferred", "relay", True)]
    sides = [("relay", "relay", False)]
    if args.vs_postfix:
        if postfix_path() is None:
            print("--vs-postfix: postfix is not installed (or this is not root): comparison skipped",
                  file=sys.stderr)
        else:
            sides.append(("postfix", "postfix", False))
    return sides


def side(scenario: Scenario, label: str) -> tuple[Scenario, str]:
    """The scenario a side runs and its intake: for http-inject and
    amqp-intake, label ``<intake>/<stream>`` runs that stream alone."""
    if not scenario.intake:
        return scenario, "smtp"
    intake, _, name = label.partition("/")
    return dataclasses.replace(scenario, streams=tuple(
        s for s in scenario.streams if s.name == name)), intake


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="perf/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", required=True, choices=scenarios.NAMES)
    parser.add_argument("--quick", action="store_true", help="the small variant (seconds)")
    parser.add_argument("--runs", type=int, default=1, help="runs per side; medians are reported")
    parser.add_argument("--vs-postfix", action="store_true",
                        help="also run a throwaway Postfix (when installed), alternating with the relay")
    parser.add_argument("--dkim", action="store_true",
                        help="the relay signs every message (ed25519 and rsa-2048 identities, keys"
                             " made for the run); Postfix's figure stays unsigned (no OpenDKIM)")
    parser.add_argument("--tls", action="store_true",
                        help="STARTTLS on both hops: the server offers it to the generator (test"
                             " certificate), the sinks offer it (test CA) and delivery verifies it")
    parser.add_argument("--chunking", action="store_true",
                        help="the sinks offer CHUNKING and the relay uses it ([shaping] chunking):"
                             " BDAT in the envelope's write (Postfix's client has none: DATA)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also measure smtp-source -> smtp-sink (Postfix's C test tools) at the"
                             " scenario's size and connections; report delivered/s as a fraction")
    parser.add_argument("--json", metavar="FILE", help="write the figures here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="relay workers (default: one per core)")
    parser.add_argument("--connections", type=int, default=None,
                        help="idle-connections: how many to hold (default 10,000; 1,000 with --quick)")
    parser.add_argument("--py-spy", metavar="DIR",
                        help="record the relay with py-spy during the first run (raw stacks in DIR)")
    parser.add_argument("--py-spy-gil", action="store_true",
                        help="with --py-spy: sample only threads holding the GIL (Python CPU)")
    parser.add_argument("--relay-tree", metavar="DIR",
                        help="import the relay from DIR (e.g. `git archive` of a commit, with the"
                             " built relay/_fast modules) instead of this checkout")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, spools)")
    return parser.parse_args(argv)


def _terminate(signum, frame) -> None:
    # SIGTERM unwinds like ^C, so the servers and the farm are stopped.
    raise SystemExit(128 + signum)


async def _check_broker() -> None:
    connection = await amqp_load.connect()
    await connection.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    raise_nofile()
    if args.scenario == scenarios.IDLE:
        from perf import idle

        if args.dkim or args.tls or args.ceiling:
            print("--dkim, --tls, --ceiling: not for idle-connections (it sends no mail)", file=sys.stderr)
        return idle.main(args)
    scenario = scenarios.build(args.scenario, args.quick)
    sides = variants(scenario, args)
    if scenario.intake == "amqp" or scenario.cluster:
        try:
            asyncio.run(_check_broker())
        except amqp_load.Unreachable as exc:
            print(f"{scenario.name}: {exc}", file=sys.stderr)
            return 2
    options = bench_options.Options(dkim=args.dkim, tls=args.tls, chunking=args.chunking)
    pair, tools = None, None
    if args.ceiling and scenario.intake:
        # Its sides run different streams one at a time: no one pair fits them all.
        print(f"--ceiling: not for {scenario.name} (its sides run different streams)", file=sys.stderr)
    elif args.ceiling:
        tools = ceiling.postfix_tools()
        if tools is None:
            print("--ceiling: smtp-source/smtp-sink are not installed (Debian's postfix package):"
                  " ceiling skipped", file=sys.stderr)
        else:
            pair = ceiling.shape(scenario)
    print(f"scenario {scenario.name}{' (quick)' if args.quick else ''}: {scenario.description}",
          file=sys.stderr)
    described = bench_options.describe(options, any(kind == "postfix" for _, kind, _ in sides))
    print(bench_options.summary(described), file=sys.stderr)
    top = tempfile.mkdtemp(prefix="relay-bench-")
    os.chmod(top, 0o755)  # Postfix's daemons (the postfix user) must reach their queue
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
    ceiling_runs: list[dict] = []
    try:
        files = bench_options.make_files(top, options)
        template = None
        if scenario.deferred:
            template = os.path.join(top, "deferred-template")
            began = time.monotonic()
            print(f"building a spool of {scenario.deferred:,} deferred messages", file=sys.stderr)
            deferred_spool.build(template, args.workers, scenario.deferred)
            print(f"  built in {time.monotonic() - began:.1f}s", file=sys.stderr)
        for index in range(args.runs):
            for label, kind, with_deferred in sides:
                workdir = tempfile.mkdtemp(prefix=f"{label.replace('/', '-')}-{index}-", dir=top)
                mine, intake = side(scenario, label)
                runs[label].append(run_once(mine, kind, args, workdir, index,
                                            template if with_deferred else None, intake, files))
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
            if pair is not None:
                found = ceiling.measure(tools, pair, free_port())
                ceiling_runs.append(found)
                print(f"{'C-pair #' + str(index + 1):<16} {pair.messages} messages in"
                      f" {found['elapsed_seconds']:.2f}s: {found['delivered_per_s']:,.0f} delivered/s",
                      file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept: {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    medians = {label: report.median(found) for label, found in runs.items()}
    columns = dict(medians)
    result = {
        "scenario": scenario.name,
        "quick": args.quick,
        "description": scenario.description,
        "command": "perf/bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "relay_tree": args.relay_tree or "checkout",
        "options": described,
        "runs": runs,
        "median": medians,
    }
    if ceiling_runs:
        top_median = report.median(ceiling_runs)
        fraction = ceiling.fractions(medians, top_median)
        result["ceiling"] = {**ceiling.describe(tools, pair), "runs": ceiling_runs,
                             "median": top_median, "fraction": fraction}
        columns = {label: {**figures, "ceiling_fraction": fraction[label]}
                   for label, figures in medians.items()}
        columns[report.CEILING] = top_median
    pairs = []
    if scenario.intake:  # HTTP or AMQP / SMTP, stream by stream
        pairs = [(f"{scenario.intake}/{s.name}", f"smtp/{s.name}") for s in scenario.streams]
    elif len(sides) == 2:
        first, second = (label for label, _, _ in sides)
        # relay/Postfix, or 1M-deferred/empty for deferred-1m
        pairs = [(first, second) if not scenario.deferred else (second, first)]
    # "http/batch-1 / smtp/batch-1": spaced when the labels have slashes of their own
    slash = " / " if scenario.intake else "/"
    found = [{"of": f"{a}{slash}{b}", **report.ratios(medians[a], medians[b])} for a, b in pairs]
    if len(found) == 1:
        result["ratio"] = found[0]
    elif found:
        result["ratios"] = found
    print(f"\n{scenario.name}{' (quick)' if args.quick else ''}: median of {args.runs} run(s)")
    print(bench_options.summary(described))
    print(report.table(columns))
    if ceiling_runs:
        print(f"{report.CEILING}: {result['ceiling']['source_command']} (plaintext, unsigned)")
    if options.dkim:
        print("\nDKIM, as the sinks saw it:")
        for line in dkim_lines(runs):
            print(f"  {line}")
    if scenario.cluster:
        print("\ncluster: CPU per delivered message (every instance's process tree):")
        for label, figures in medians.items():
            delivered = figures.get("delivered") or 0
            cpu = (figures.get("cpu_seconds") or {}).get("server")
            if delivered and cpu is not None:
                print(f"  {label}: {cpu / delivered * 1000:.2f} ms")
    if scenario.intake == "amqp":
        print("\namqp: injected/s is consumed->spooled (first consumption to every message acked,"
              " ring read every 0.25 s), delivered/s consumed->delivered; no per-message latencies")
    for one in found:
        print(f"\nratio {one['of']}: " + ", ".join(f"{k} {v}" for k, v in one.items() if k != "of"))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
            file.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
