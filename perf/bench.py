"""perf/bench: run one scenario against the relay (and Postfix), report the figures.

Input: ``--scenario NAME`` (perf.scenarios), ``--quick``, ``--runs N``,
``--vs-postfix``, ``--json FILE``, ``--connections N`` (idle-connections).
Output: a progress bar on stderr, a table on stdout (medians over the
runs, and the ratio relay/Postfix or 1M-deferred/empty), and the same as
JSON: every run's figures, the medians, the ratios and the machine.

One run: the fake internet starts in its own process (perf.farm), then the
server under test in a temp dir (perf.mta), then the generator (perf.loadgen)
injects every stream from this process until each stream's count is sent
or the scenario's time limit; the run ends when the sinks hold every
accepted recipient or the drain limit passes.  CPU seconds come from /proc
(the server's whole process tree, the sinks' process, this process); RSS
is sampled every 250 ms.  With several variants (relay and Postfix, or an
empty and a full spool) the runs alternate pair by pair, so load from
other users of the machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import uvloop

from perf import deferred as deferred_spool
from perf import procstat, report, scenarios
from perf.farm import Farm
from perf.loadgen import Generator, sources
from perf.mta import Postfix, Relay, postfix_path
from perf.scenarios import Scenario

GENERATOR_SOURCES = 8  # 127.0.1.1 .. 127.0.1.8
SAMPLE_INTERVAL = 0.25  # progress and end-of-run checks
PSS_INTERVAL = 1.0  # smaps_rollup of a few hundred Postfix processes costs real CPU
PROGRESS_INTERVAL_TTY = 0.25
PROGRESS_INTERVAL_PIPE = 5.0
RELAY_CONNECTIONS_PER_DESTINATION = 20  # the relay's default, matched by Postfix


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
                py_spy: str | None, py_spy_gil: bool = False) -> dict:
    """Inject, wait for the deliveries, and measure; returns the run's figures."""
    generator = Generator("127.0.0.1", server.port, sources=sources(GENERATOR_SOURCES), run_tag=run_tag)
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
        "timed_out": int(farm.received() < accepted_recipients()),  # 1: the drain limit passed first
        "cpu_seconds": {
            "server": round(server.cpu_seconds() - cpu_server, 2),
            "generator": round(usage.ru_utime + usage.ru_stime - cpu_generator - sampler_cpu, 2),
            "sampler": round(sampler_cpu, 2),
            "sinks": round(procstat.cpu_seconds(farm.pid) - cpu_sinks, 2),
        },
        "sampled_peak_pss_bytes": peak_pss,
        "peak_rss_bytes": sum(server.peak_rss()) if isinstance(server, Relay) else None,
        "peak_rss_per_worker_bytes": server.peak_rss() if isinstance(server, Relay) else None,
        "outbound_connections": sinks.connections_opened,
        "outbound_transactions": sinks.transactions,
        "errors": dict(generator.errors.most_common(10)),
    })
    return figures


def run_once(scenario: Scenario, kind: str, args, workdir: str, index: int,
             deferred_template: str | None) -> dict:
    """One run of a scenario through one server (kind: relay or postfix)."""
    loadavg = os.getloadavg()[0]
    with Farm(scenario.layout) as farm:
        routes = scenario.layout.routes(farm.mx_port) if args.vs_postfix else None
        if kind == "postfix":
            server = Postfix(workdir, routes=routes,
                             concurrency=RELAY_CONNECTIONS_PER_DESTINATION * args.workers,
                             messages_per_connection=100)
        else:
            server = Relay(workdir, workers=args.workers, deliver_to=farm.config_overrides(),
                           routes=routes, overrides=scenario.relay_overrides, tree=args.relay_tree)
            if deferred_template:
                deferred_spool.copy(deferred_template, server.spool_dir)
        began = time.monotonic()
        server.start()
        startup = time.monotonic() - began
        try:
            rss_idle = server.rss_bytes()
            spy = None
            if args.py_spy and kind == "relay" and index == 0:
                os.makedirs(args.py_spy, exist_ok=True)
                mode = "gil" if args.py_spy_gil else "active"
                spy = os.path.join(args.py_spy, f"{scenario.name}-{kind}-{mode}.txt")
            label = f"{kind}{'+deferred' if deferred_template else ''} #{index + 1}"
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                figures = runner.run(drive(scenario, server, farm, label, f"{kind}{index}", spy,
                                           args.py_spy_gil))
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


def variants(scenario: Scenario, args) -> list[tuple[str, str, bool]]:
    """(label, server kind, with the deferred spool) of each side to compare."""
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="perf/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", required=True, choices=scenarios.NAMES)
    parser.add_argument("--quick", action="store_true", help="the small variant (seconds)")
    parser.add_argument("--runs", type=int, default=1, help="runs per side; medians are reported")
    parser.add_argument("--vs-postfix", action="store_true",
                        help="also run a throwaway Postfix (when installed), alternating with the relay")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    raise_nofile()
    if args.scenario == scenarios.IDLE:
        from perf import idle

        return idle.main(args)
    scenario = scenarios.build(args.scenario, args.quick)
    sides = variants(scenario, args)
    print(f"scenario {scenario.name}{' (quick)' if args.quick else ''}: {scenario.description}",
          file=sys.stderr)
    top = tempfile.mkdtemp(prefix="relay-bench-")
    os.chmod(top, 0o755)  # Postfix's daemons (the postfix user) must reach their queue
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
    try:
        template = None
        if scenario.deferred:
            template = os.path.join(top, "deferred-template")
            began = time.monotonic()
            print(f"building a spool of {scenario.deferred:,} deferred messages", file=sys.stderr)
            deferred_spool.build(template, args.workers, scenario.deferred)
            print(f"  built in {time.monotonic() - began:.1f}s", file=sys.stderr)
        for index in range(args.runs):
            for label, kind, with_deferred in sides:
                workdir = tempfile.mkdtemp(prefix=f"{label}-{index}-", dir=top)
                runs[label].append(run_once(scenario, kind, args, workdir, index,
                                            template if with_deferred else None))
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
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
        "runs": runs,
        "median": medians,
    }
    if len(sides) == 2:
        first, second = (label for label, _, _ in sides)
        # relay/Postfix, or 1M-deferred/empty for deferred-1m
        a, b = (first, second) if not scenario.deferred else (second, first)
        result["ratio"] = {"of": f"{a}/{b}", **report.ratios(medians[a], medians[b])}
    print(f"\n{scenario.name}{' (quick)' if args.quick else ''}: median of {args.runs} run(s)")
    print(report.table(columns))
    if "ratio" in result:
        print(f"\nratio {result['ratio']['of']}: " + ", ".join(
            f"{k} {v}" for k, v in result["ratio"].items() if k != "of"))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
            file.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
