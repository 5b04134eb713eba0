"""The supervisor: ``relay -c FILE`` — starts, watches and stops the workers.

Input: the configuration file and signals.  Output: one forked worker per
``relay.workers`` (0 = one per core), restarted with backoff when one dies;
SIGTERM drains them all and exits 0; SIGHUP validates the file again and
passes the reload on, keeping every restart-only key at the value the
running workers have (and saying so at every reload until a restart);
SIGUSR1 has every process reopen its log files.  No mail logic lives here:
before the first fork it only takes the instance lock (one relay per spool
and run directory) and runs the spool's offline recovery, while no worker
can be writing.  Workers die with their supervisor (PR_SET_PDEATHSIG).

``relay --check -c FILE`` runs every start-up check and exits; ``relay
--version`` prints the version.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import importlib.metadata
import logging
import os
import resource
import select
import selectors
import signal
import sys
import time

from relay import config, preflight
from relay.cli.control import socket_path as control_socket_path
from relay.control import ControlPlane, MetricsServer, open_control_socket
from relay.dkim.sign import Signer
from relay.errors import ConfigError, SpoolError
from relay.intake.clients import ClientTable
from relay.intake.listener import server_tls_context
from relay.spool.lock import InstanceLock
from relay.spool.recover import recover
from relay.stats import ring

log = logging.getLogger("relay.supervisor")

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
PR_SET_PDEATHSIG = 1
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that ran this long restarts without backoff
KILL_GRACE = 5.0  # past shutdown_timeout, a worker still running gets SIGKILL


class LogFormatter(logging.Formatter):
    """The standard format, with the date part of ``asctime`` made once a
    second: intake logs a line per message."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._dated = (-1, "")  # (second, its date): one tuple, as threads log too

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        dated = self._dated
        if dated[0] != second:
            dated = self._dated = (second, time.strftime(self.default_time_format,
                                                          self.converter(second)))
        return self.default_msec_format % (dated[1], record.msecs)


class TurnHandler(logging.StreamHandler):
    """A worker's log to stderr, the lines of one turn of its event loop
    written together at the turn's end: intake and delivery log a line per
    message, each a write of its own before.  A warning or worse goes out
    at once with what came before it, as does a line logged outside the
    loop (the spool's writer thread, start-up).  Each write stays within
    PIPE_BUF and ends a line: the workers share the supervisor's stderr,
    often a pipe, which keeps only such writes whole."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # another thread, or no loop
                self.flush()
                return
            if record.levelno >= logging.WARNING:
                self.flush()
            elif self._flush_on is not loop:  # (a loop that stopped before it flushed: again)
                loop.call_soon(self.flush)
                self._flush_on = loop
        except RecursionError:  # as logging.StreamHandler.emit
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:
            self._flush_on = None
            lines, self._lines = self._lines, []
            for piece in _pieces(lines, self.terminator):
                self.stream.write(piece)
                super().flush()  # a write of its own


def _pieces(lines: list[str], terminator: str, limit: int = select.PIPE_BUF):
    """The lines joined into pieces of at most ``limit`` bytes, each ending a
    line (a longer line goes alone)."""
    piece: list[str] = []
    size = 0
    for line in lines:
        length = (len(line) if line.isascii() else len(line.encode("utf-8", "backslashreplace"))
                  ) + len(terminator)
        if piece and size + length > limit:
            yield terminator.join(piece) + terminator
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield terminator.join(piece) + terminator


def setup_logging(level: str, worker: int | None = None) -> None:
    who = "supervisor" if worker is None else f"worker {worker}"
    handler = logging.StreamHandler(sys.stderr) if worker is None else TurnHandler(sys.stderr)
    handler.setFormatter(LogFormatter(f"%(asctime)s relay[{who}] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    # The format uses none of these; the logging HOWTO's "Optimization" says to
    # turn them off, which spares a stack walk and lookups per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM (a drain) to this process when its
    parent dies, so orphaned workers never serve a spool that a new
    supervisor may already be recovering.  Where prctl is missing the worker
    watches its parent itself (worker.py)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Slot:
    """One worker index: its process and its restart history."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid: int | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at: float | None = None


class Supervisor:
    def __init__(self, settings: config.Settings, metrics_sock=None) -> None:
        # The settings the running workers have; a reload changes only the
        # reloadable keys, so a worker forked later gets the same restart-only
        # values as its siblings.
        self.settings = settings
        self.workers = settings.worker_count
        self.slots = [Slot(i) for i in range(self.workers)]
        self.stopping = False
        self._metrics_sock = metrics_sock

    def run(self) -> int:
        run_dir = self.settings.relay.run_dir
        ring.create(run_dir, self.workers)
        # Per-client-IP counts for the whole relay, inherited by every fork.
        self.clients = ClientTable(self.workers)
        self.control = ControlPlane(self.settings, self.workers, self._worker_pids)
        self._wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        for signum in SIGNALS:
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries them
        self.selector = selectors.DefaultSelector()
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, "signals")
        self._listeners = [open_control_socket(run_dir)]
        self.selector.register(self._listeners[0], selectors.EVENT_READ, self.control.serve_control)
        self._metrics = None
        if self._metrics_sock is not None:
            self._listeners.append(self._metrics_sock)
            self._metrics = MetricsServer(self._metrics_sock, self.control.ring_path)
        for slot in self.slots:
            self._fork(slot)
        log.info(
            "relay started: %d workers, listening on %s",
            self.workers,
            ", ".join(f"{h}:{p}" for h, p in (l.address for l in self.settings.listen)),
        )
        try:
            while True:
                for key, _ in self.selector.select(self._wait_time()):
                    if key.data != "signals":
                        key.data(key.fileobj)
                        continue
                    for signum in self._pending_signals():
                        if signum == signal.SIGCHLD:
                            self._reap()
                        elif signum in (signal.SIGTERM, signal.SIGINT):
                            return self._stop()
                        elif signum == signal.SIGHUP:
                            self._reload()
                        elif signum == signal.SIGUSR1:
                            self._signal_workers(signal.SIGUSR1)
                            log.info("SIGUSR1: workers reopen their logs")
                self._restart_due()
        finally:
            if self._metrics is not None:
                self._metrics.shutdown()
            for sock in self._listeners:
                sock.close()
            try:
                os.unlink(control_socket_path(run_dir))
            except FileNotFoundError:
                pass
            ring.remove(run_dir)

    def _pending_signals(self) -> list[int]:
        try:
            data = os.read(self._wakeup_r, 512)
        except BlockingIOError:
            return []
        return list(dict.fromkeys(data))  # each signal once, in arrival order

    def _worker_pids(self) -> list[tuple[int, int | None]]:
        return [(slot.index, slot.pid) for slot in self.slots]

    def _wait_time(self) -> float:
        due = [s.restart_at for s in self.slots if s.restart_at is not None]
        if not due:
            return 1.0
        return max(0.0, min(min(due) - time.monotonic(), 1.0))

    def _fork(self, slot: Slot) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child
            # What the supervisor made is never garbage here: no collection
            # may touch (and so copy) its pages.  worker.quiet_gc does the rest.
            gc.freeze()
            code = 2
            try:
                die_with_parent(parent)
                signal.set_wakeup_fd(-1)
                for signum in SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                # Until the worker installs its own handler, a reload must not
                # kill it (SIGHUP's default action).
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                self.selector.close()
                os.close(self._wakeup_r)
                for sock in self._listeners:
                    sock.close()
                setup_logging(self.settings.relay.log_level, slot.index)
                from relay import worker

                code = worker.main(self.settings, slot.index, self.workers, parent, self.clients)
            except BaseException:
                log.exception("worker %d crashed", slot.index)
            finally:
                logging.shutdown()
                os._exit(code)
        slot.pid = pid
        slot.started = time.monotonic()
        slot.restart_at = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot in self.slots:
                if slot.pid == pid:
                    self._schedule_restart(slot, status)
                    slot.pid = None

    def _schedule_restart(self, slot: Slot, status: int) -> None:
        if os.WIFSIGNALED(status):
            how = f"killed by signal {os.WTERMSIG(status)}"
        else:
            how = f"exited with status {os.waitstatus_to_exitcode(status)}"
        ran = time.monotonic() - slot.started
        slot.failures = 1 if ran > STABLE_AFTER else slot.failures + 1
        delay = 0.0 if slot.failures == 1 else min(BACKOFF_FIRST * 2 ** (slot.failures - 2), BACKOFF_MAX)
        slot.restart_at = time.monotonic() + delay
        log.error("worker %d (pid %d) %s after %.1fs; restarting in %.1fs",
                  slot.index, slot.pid or 0, how, ran, delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid is None and slot.restart_at is not None and slot.restart_at <= now:
                self._fork(slot)
                log.info("worker %d restarted (pid %d)", slot.index, slot.pid)

    def _reload(self) -> None:
        try:
            new = config.load(self.settings.source)
            server_tls_context(new.tls)
            Signer.from_identities(new.dkim)
            preflight.check_ca_file(new.deliver.ca_file)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        # Said at every reload until a restart: the file and the running relay
        # disagree until then.
        needs_restart = config.restart_needed(self.settings, new)
        if needs_restart:
            log.warning("SIGHUP: these changes take effect only after a restart: %s",
                        ", ".join(needs_restart))
        self.settings = config.pin_restart_keys(new, self.settings)
        self.control.settings = self.settings
        setup_logging(self.settings.relay.log_level)
        self._signal_workers(signal.SIGHUP)
        log.info("SIGHUP: configuration reloaded")

    def _signal_workers(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, signum)
                except ProcessLookupError:  # exited; reaped on the next SIGCHLD
                    pass

    def _stop(self) -> int:
        self.stopping = True
        log.info("stopping: draining workers")
        for slot in self.slots:
            if slot.pid is not None:
                os.kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.relay.shutdown_timeout + KILL_GRACE
        while any(slot.pid is not None for slot in self.slots):
            if time.monotonic() > deadline:
                for slot in self.slots:
                    if slot.pid is not None:
                        log.error("worker %d did not stop in time: SIGKILL", slot.index)
                        os.kill(slot.pid, signal.SIGKILL)
                deadline = time.monotonic() + KILL_GRACE
            self.selector.select(0.05)
            self._pending_signals()
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    for slot in self.slots:
                        slot.pid = None
                    break
                if pid == 0:
                    break
                for slot in self.slots:
                    if slot.pid == pid:
                        slot.pid = None
        log.info("relay stopped")
        return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relay", description="Run the SMTP relay.")
    parser.add_argument("-c", "--config", default="conf/relay.toml", help="TOML configuration file")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and every file it names, then exit")
    parser.add_argument("--version", action="version", version=f"relay {version()}")
    return parser.parse_args(argv)


def version() -> str:
    try:
        return importlib.metadata.version("relay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def prepare(settings: config.Settings):
    """Checks and recovery before the first fork, under the instance lock;
    returns the /metrics socket (or None).  Raises ConfigError/SpoolError."""
    preflight.check(settings)
    metrics_sock = preflight.open_metrics_socket(settings.stats.metrics_address)
    try:
        os.makedirs(settings.relay.run_dir, exist_ok=True)
        recover(settings.relay.spool_dir, settings.worker_count, settings.cluster.hosts,
                settings.cluster.index, settings.relay.spread_domains)
    except BaseException:
        if metrics_sock is not None:
            metrics_sock.close()
        raise
    return metrics_sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = config.load(args.config)
        if args.check:
            preflight.check(settings)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"relay: {args.config}: configuration OK ({settings.worker_count} workers, "
              f"{len(settings.listen)} listen addresses, {len(settings.dkim)} DKIM identities)")
        return 0
    setup_logging(settings.relay.log_level)
    for old, new in config.DEPRECATED_DELIVER_KEYS.items():
        if getattr(settings.deliver, old) != config.DELIVER_KEYS[old].default:
            log.warning("[deliver] %s is deprecated: it is now [shaping.default] %s (whole relay)",
                        old, new)
    lock = InstanceLock(settings.relay.spool_dir, settings.relay.run_dir)
    try:
        lock.acquire()
    except SpoolError as exc:
        log.error("%s", exc)
        return 2
    try:
        nofile = raise_nofile_limit()
        log.info("open files limit: %d", nofile)
        try:
            metrics_sock = prepare(settings)
        except (ConfigError, SpoolError) as exc:
            log.error("%s", exc)
            return 2
        return Supervisor(settings, metrics_sock).run()
    finally:
        # The workers hold their inherited copies until they exit.
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
