"""One worker process: a uvloop event loop that wires the stages together.

Input: the settings, this worker's index and the worker count.  Output: an
SMTP intake on every listen address (its own SO_REUSEPORT sockets), the
HTTP inject API on ``[http] address`` (likewise), the
spool of the shard slots it owns, the peer socket other workers hand their
parts to, and the delivery loop of its slots' mail.  SIGHUP reloads the
reloadable keys (restart-only keys keep the values this worker started
with, as its siblings do), SIGUSR1 reopens the delivery log, and a worker
whose supervisor is gone drains and exits.  Exit status 0 after a drain
(SIGTERM), 2 on a startup error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import os
import signal
import time
from typing import Callable

import orjson
import uvloop

from relay import config
from relay.dispatch import Dispatcher
from relay.dkim.sign import Signer
from relay.errors import ConfigError, RelayError
from relay.feeds.amqp import Feeds
from relay.intake.amqp import AmqpIntake
from relay.intake.clients import ClientTable
from relay.intake.handler import IntakeState
from relay.intake.http.server import HttpIntake
from relay.intake.listener import open_listen_sockets, server_tls_context
from relay.model import Transaction
from relay.ops import admin_http
from relay.route.cluster import ClusterLink
from relay.route.forward import Router
from relay.spool.seen import IntakeIndex
from relay.spool.store import Spool
from relay.stats import ring
from relay.stats.process import ProcessFigures

log = logging.getLogger("relay.worker")

STATS_INTERVAL = 0.25  # seconds between publications to the stats ring
# The cyclic collector's thresholds.  CPython's default (700 allocations)
# runs a young collection every few messages here, though nearly all of a
# message's objects die by reference counting; a rarer one finds the same
# cycles.  The older generations keep CPython's ratios (10, 10): raising
# them too measured no faster, and kept cyclic garbage (a body with it) longer.
GC_THRESHOLDS = (20_000, 10, 10)

class Worker:
    def __init__(self, settings: config.Settings, index: int, workers: int,
                 parent_pid: int | None = None, clients: ClientTable | None = None) -> None:
        self.settings = settings
        self.clients = clients
        self.index = index
        self.workers = workers
        self.parent_pid = parent_pid
        self._stop = asyncio.Event()

    async def accept(self, txn: Transaction) -> None:
        """Intake's last step: sign once, then hand the message to its owners.
        The signed bytes are the bytes that will be sent."""
        signature = self.signer.sign(txn.body, txn.sender)
        if signature:
            txn = dataclasses.replace(txn, body=signature + txn.body)
        await self.router.submit(txn)

    async def run(self) -> int:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.process = ProcessFigures()
        self._queue_counts: dict[str, int] = {}
        try:
            self.ring = ring.Writer(ring.ring_path(settings.relay.run_dir), self.index)
        except (OSError, ValueError) as exc:  # a worker run without its supervisor
            log.warning("no stats ring: %s", exc)
            self.ring = None
        self.signer = Signer.from_identities(settings.dkim)
        self.spool = Spool(settings.relay.spool_dir, self.index)
        await self.spool.open()
        # AMQP message keys: this worker's share recorded in its spool, and
        # lookups across every spool (redeliveries, the feeds' origins).
        self.seen = IntakeIndex(settings.relay.spool_dir, self.spool)
        self.router = Router(self.index, self.workers, self.spool, settings.relay.run_dir,
                             keys=self.seen, hosts=settings.cluster.hosts,
                             host=settings.cluster.index,
                             spread=settings.relay.spread_domains)
        await self.router.serve()
        clients = None
        if self.clients is not None:
            clients = self.clients.view(self.index, settings.intake.auth_lockout)
        self.intake = IntakeState(
            settings, self.index, self.accept, server_tls_context(settings.tls), clients
        )
        self.cluster = None
        if settings.cluster.hosts > 1:  # [cluster]: other hosts' parts through the broker
            self.cluster = ClusterLink(settings, self.index, self.router.submit_here,
                                       self.seen.committed, self.intake.counters)
            self.router.publish = self.cluster.publish
            self.cluster.start()
        self.amqp = AmqpIntake(settings, self.intake, self.spool, self.router)
        self.amqp.start()
        self.feeds = Feeds(settings, self.index, self.spool, self.seen, self.intake.counters)
        self.feeds.start()
        self.dispatcher = Dispatcher(settings, self.index, self.workers, self.spool,
                                     self.router.submit, self.intake.queue_ids)
        dispatching = asyncio.create_task(self.dispatcher.run(), name="dispatch")
        dispatching.add_done_callback(
            functools.partial(_fatal_if_failed, before_exit=self.dispatcher.event_log.flush))
        self.router.control = self.control
        traced = await self.spool.get_meta("traced")  # relayctl trace, kept across restarts
        self.intake.traced = frozenset(orjson.loads(traced)) if traced else frozenset()
        # create_server listens again on the socket it is given, with its own
        # backlog (100 unless told): pass the configured one.
        servers = [
            await loop.create_server(functools.partial(self.intake.factory, listen.class_), sock=sock,
                                     backlog=settings.relay.listen_backlog)
            for listen, sock in zip(settings.listen, open_listen_sockets(settings))
        ]
        self.http = HttpIntake(settings, self.intake, admin_http.routes())  # [http]: inject, admin
        await self.http.start()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGUSR1, self.dispatcher.reopen_log)
        loop.add_signal_handler(signal.SIGUSR2, _log_tasks)
        publishing = asyncio.create_task(self._publish_stats(), name="stats")
        log.info("worker %d of %d ready", self.index, self.workers)
        await self._stop.wait()
        await self._drain(servers)
        dispatching.cancel()
        publishing.cancel()
        await self.feeds.stop()
        self._publish_once()
        await self.dispatcher.close()
        await self.router.close()
        if self.cluster is not None:
            await self.cluster.close()
        self.seen.close()
        await self.spool.close()
        log.info("worker %d stopped", self.index)
        return 0

    async def _drain(self, servers) -> None:
        """New connections get 421 4.3.2, sessions in flight finish, every
        write is committed; then exit, within relay.shutdown_timeout."""
        deadline = self._deadline = time.monotonic() + self.settings.relay.shutdown_timeout
        self.intake.drain()
        await self.amqp.stop(max(deadline - time.monotonic(), 0.1))
        if self.cluster is not None:
            await self.cluster.stop_consuming(max(deadline - time.monotonic(), 0.1))
        log.info("worker %d draining %d sessions", self.index, len(self.intake.sessions))
        while self.intake.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.intake.sessions):
            session.transport and session.transport.abort()
        for server in servers:
            server.close()
        await self.http.close()  # HTTP requests in flight finish (they answered 503 meanwhile)
        # Transactions in flight finish; their DSNs still reach their owners,
        # which keep serving until every peer says it is done.
        await self.dispatcher.stop(max(deadline - time.monotonic(), 0.1))
        # Other workers' sessions may still hand parts to this one.
        await self.router.announce_done()
        if not await self.router.wait_peers_done(deadline - time.monotonic()):
            log.warning("worker %d: not every peer finished draining in time", self.index)

    # -- operator commands ----------------------------------------------------

    async def control(self, request: dict) -> dict:
        """relayctl verbs that change state, for this worker's slots."""
        op, now = request["op"], time.time()
        if op == "flush":
            return {"count": await self.spool.flush(request.get("domain"), now)}
        if op == "requeue" and request.get("quarantined"):
            return {"count": await self.spool.release_quarantined(request["quarantined"], now)}
        if op == "requeue":
            count = await self.spool.requeue(
                code=request.get("code"), sender=request.get("sender"),
                recipient=request.get("recipient"), now=now,
                dry_run=bool(request.get("dry_run")),
            )
            return {"count": count}
        if op == "delete":
            deleted = await self.dispatcher.delete(request["ids"])
            return {"count": len(deleted), "deleted": deleted}
        if op == "trace":
            traced = set(self.dispatcher.traced)
            for address in request.get("add", []):
                traced.add(address.lower())
            for address in request.get("remove", []):
                traced.discard(address.lower())
            await self.dispatcher.set_traced(frozenset(traced))
            self.intake.traced = self.dispatcher.traced
            return {"traced": sorted(traced)}
        if op == "shaping":
            return self.dispatcher.shaping()
        if op == "shaping_cancel":
            cancelled = self.dispatcher.cancel_effect(int(request["id"]))
            if cancelled is None:
                raise RelayError(f"no effect {request['id']} in force")
            return {"cancelled": cancelled}
        if op == "cluster":
            if self.cluster is None:
                raise RelayError("this relay is not in a cluster ([cluster] hosts = 1)")
            answer = {"cluster": self.cluster.status()}
            if request.get("queues") and self.cluster.connected:
                answer["queues"] = await self.cluster.queues()
            return answer
        if op == "amqp":
            return {"amqp": {"consumers": self.amqp.status(), "feeds": self.feeds.status()}}
        if op in ("suspend", "resume"):
            await self.dispatcher.suspend(request["domain"], op == "suspend")
            return {"suspended": sorted(self.dispatcher.suspended)}
        if op == "campaign":
            return await self.dispatcher.campaign(request["action"], request.get("name"))
        if op == "suspensions":
            return {"suspended": sorted(self.dispatcher.suspended)}
        raise RelayError(f"unknown command {op!r}")

    # -- stats ---------------------------------------------------------------

    async def _publish_stats(self) -> None:
        """Every ~250 ms: this worker's figures into its region of the ring."""
        tick = 0
        while True:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                # PR_SET_PDEATHSIG covers Linux; this covers the rest.
                log.error("worker %d: supervisor %d is gone; draining", self.index, self.parent_pid)
                self.parent_pid = None
                self._stop.set()
            if tick % 20 == 0:  # the queue counts cost a query: every 5 s
                try:
                    self._queue_counts = await self.spool.counts()
                except RelayError:
                    pass
            self._publish_once()
            tick += 1
            await asyncio.sleep(STATS_INTERVAL)

    def _publish_once(self) -> None:
        if self.ring is None:
            return
        counters = {**self.intake.counters, **self.dispatcher.counters}
        gauges = {
            **self.process.gauges(),
            **self._queue_counts,
            "ready": self.dispatcher.loaded,
            "inbound_connections": len(self.intake.sessions),
            "outbound_connections": self.dispatcher.outbound_connections(),
            **self.feeds.gauges(),
            **self.amqp.gauges(),
            **(self.cluster.gauges() if self.cluster is not None else {}),
        }
        histograms = {
            "data_to_250": self.intake.data_to_250.value(),
            "accept_to_delivered": self.dispatcher.accept_to_delivered.value(),
            **{f"accept_to_delivered_{lane}": histogram.value()
               for lane, histogram in self.dispatcher.accept_to_delivered_by_lane.items()},
        }
        self.ring.publish(counters, gauges, histograms, self.dispatcher.busiest(ring.TOP),
                          self.dispatcher.campaign_counts)

    def _reload(self) -> None:
        try:
            settings = config.pin_restart_keys(config.load(self.settings.source), self.settings)
            tls_context = server_tls_context(settings.tls)
            signer = Signer.from_identities(settings.dkim)
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
            return
        logging.getLogger().setLevel(settings.relay.log_level.upper())
        self.settings = settings
        self.signer = signer
        self.intake.apply(settings, tls_context)
        self.http.apply(settings)
        self.dispatcher.apply(settings)
        log.info("worker %d reloaded %s", self.index, settings.source)


def _log_tasks() -> None:
    """SIGUSR2: log where every task of this worker waits (a debugging aid)."""
    import io

    for task in asyncio.all_tasks():
        out = io.StringIO()
        task.print_stack(limit=8, file=out)
        log.warning("task %s:\n%s", task.get_name(), out.getvalue())


def _fatal_if_failed(task: asyncio.Task, before_exit: Callable[[], None] | None = None) -> None:
    """A background task that dies of a bug takes the worker with it: the
    supervisor restarts it, rather than it going on half alive."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s failed", task.get_name(), exc_info=task.exception())
        if before_exit is not None:
            before_exit()
        os._exit(70)


def quiet_gc() -> None:
    """Collect cycles less often, and never scan again what exists now (the
    modules and settings inherited from the supervisor, this module)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(settings: config.Settings, index: int, workers: int, parent_pid: int | None = None,
         clients: ClientTable | None = None) -> int:
    """Entry point in the forked child."""
    quiet_gc()
    worker = Worker(settings, index, workers, parent_pid, clients)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(worker.run())
    except (ConfigError, RelayError, OSError) as exc:
        log.error("worker %d cannot run: %s", index, exc)
        return 2
