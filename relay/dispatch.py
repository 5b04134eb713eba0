"""The delivery loop of one worker: due mail from its spool, out to the MX
servers, and each recipient's outcome back into the spool.

Input: the worker's spool (only its own slots' mail), the resolver, and a
``submit`` callable that queues new messages (DSNs) the way intake does.
Output: one SMTP transaction per (message, domain) over pooled sessions,
and per recipient an update plus an event, committed together; the events
also go to ``event_log_dir/delivery-N.jsonl`` as JSON lines.

Theory of operation.  Only mail that is due is loaded: ``claim_due`` takes
up to ``deliver.max_loaded`` recipients (metadata only; a body is read when
its transaction starts), transactional ones first and bulk ones within
``bulk_loaded_share`` of it, and marks them as being sent.  Claimed
recipients become jobs in their destination's queue (deliver.queue,
deliver.lanes); a paused campaign's (or a suspended domain's) are held
instead, a cancelled campaign's end with a ``cancelled`` event.  A sender task
takes a pooled connection or opens one from the next of this worker's
source IPs (round robin), then sends job after job until the queue is
empty or the connection has carried ``max_messages_per_connection``.
What each recipient becomes — delivered, deferred to the next step of
the retry schedule, or bounced with one DSN per message and round — is
decided by outcome.transition (pure); this module commits it and writes
the events (outcome.events).
The loop sleeps until the earliest deferred recipient is due or the spool
says new mail was committed.

A bug (any other exception) raised while one job is routed or sent is
charged to that job's message before it kills the worker: the crash and
its error are committed for the job's recipients still being sent, and at
the ``deliver.quarantine_after``-th crash they are quarantined, so the
restarted worker does not claim them first again and loop.  A bug outside
a job's delivery still just kills the worker.  ``RELAY_TEST_CRASH_ON``
(tests only) makes the delivery of any job with a recipient containing
that text raise, right before its transaction is sent.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import random
import re
import ssl
import time
from typing import Awaitable, Callable

import orjson

from relay.config import Settings
from relay.deliver.fresh import FreshBodies
from relay.deliver.queue import Job, jobs_from
from relay.deliver.resolve import Destination, Resolver
from relay.deliver.scheduler import BOUNCE, RETRY, Close, Fail, Hold, Open, Scheduler, Send
from relay.deliver.shaping import Effect, Effects
from relay.deliver.schedule import RetrySchedule
from relay.deliver.session import SmtpSession, Timeouts, TransactionResult
from relay.errors import DeliveryError, RelayError, TlsUnavailable
from relay.model import BULK, LANES, TRANSACTIONAL, Event, Part, QueueIds, Reply, Stage, Transaction
from relay.outcome import transition
from relay.outcome.bounce import FailedRecipient, build_dsn, should_bounce
from relay.outcome.events import EventLog
from relay.outcome.transition import Attempt, Rounds, Verdict
from relay.spool.format import RecipientState
from relay.stats.ring import Histogram
from relay.spool.store import (CANCELLED_TEXT, DROPPED_OUTCOMES, HELD_PREFIX, DueRecipient,
                               RecipientUpdate, Spool)

log = logging.getLogger("relay.deliver")
trace_log = logging.getLogger("relay.trace")

TLS_FALLBACK_MEMORY = 3600.0  # remember a host whose STARTTLS failed this long
MAX_WAIT = 5.0  # the loops look again at least this often, whatever they were told
# Seconds between tries to record an outcome (the last repeats): the spool
# may be full for long, and the outcome is known, so it is kept trying
# until it is recorded or the worker stops.
COMPLETE_RETRIES = (1, 2, 4, 8)
CRASH_RECORD_TIMEOUT = 10.0  # a crash not committed by then is not counted
MAX_ERROR = 500  # characters of an exception's text kept in the spool
TEST_CRASH_ON = "RELAY_TEST_CRASH_ON"  # the test hook's environment variable
SUSPENDED_TEXT = "suspended by the operator (relayctl suspend)"
PAUSED_TEXT = "campaign paused by the operator (relayctl campaign pause)"
PAUSED, CANCELLED = "paused", "cancelled"  # a campaign's state; absent = active
LANE_OUTCOMES = ("delivered", "deferred", "bounced")  # counted per lane in the stats ring
INTERNAL_HEADER = re.compile(rb"^X-Relay-[A-Za-z0-9-]*:", re.IGNORECASE)

Submit = Callable[[Transaction], Awaitable[None]]


def strip_internal_headers(body: bytes) -> bytes:
    """Drop ``X-Relay-*`` header fields (with their folded lines)."""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[: end + 2]
    if b"X-Relay-" not in head and b"x-relay-" not in head.lower():
        return body
    kept, dropping = [], False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = bool(INTERNAL_HEADER.match(line))
        if not dropping:
            kept.append(line)
    rest = b"" if end < 0 else body[end + 2:]
    return b"\r\n".join(kept) + b"\r\n" + rest


def worker_source_ips(source_ips: tuple[str, ...], worker: int, workers: int) -> list:
    """Address i belongs to worker i % workers; a worker left without one
    shares (kernel's choice when none is configured: [None])."""
    if not source_ips:
        return [None]
    own = [ip for i, ip in enumerate(source_ips) if i % workers == worker]
    return own or [source_ips[worker % len(source_ips)]]


class Dispatcher:
    def __init__(self, settings: Settings, worker: int, workers: int, spool: Spool,
                 submit: Submit, queue_ids: QueueIds, resolver: Resolver | None = None) -> None:
        deliver = settings.deliver
        self.settings = settings
        self.worker = worker
        self.spool = spool
        self.submit = submit
        self.hostname = settings.hostname
        self.resolver = resolver or Resolver(
            nameservers=settings.dns.nameservers, routes=settings.routes, mx_port=deliver.mx_port
        )
        self.schedule = RetrySchedule(deliver.retry_schedule, deliver.max_lifetime, rng=random.Random())
        self.timeouts = Timeouts(deliver.connect_timeout, deliver.command_timeout, deliver.data_timeout)
        self.source_ips = worker_source_ips(settings.relay.source_ips, worker, workers)
        self._next_source = itertools.count()
        self.effects = Effects(settings.shaping.rules, worker)
        # A site's shared limits are split between every worker of every
        # host that may send to it (a cluster's hosts each own some domains).
        self.scheduler = Scheduler(settings.shaping, workers * settings.cluster.hosts, self.effects,
                                   idle_timeout=deliver.connection_idle_timeout,
                                   spawn_after=deliver.spawn_after,
                                   max_sessions=deliver.max_sessions,
                                   max_bytes_in_flight=deliver.max_bytes_in_flight,
                                   spread=settings.relay.spread_domains, host_workers=workers)
        self.sessions: dict[int, SmtpSession] = {}  # the scheduler's connection id -> session
        self._poke = asyncio.Event()  # the scheduler has news: look at its actions again
        self._sending = 0  # transactions in flight
        self._held_domains: dict[str, set] = {}  # site -> domains whose mail a suspension handed back
        self.loaded = 0  # recipients claimed and not yet done with
        self.loaded_bulk = 0  # of which bulk
        self._full = False  # the last claim found no room (see _once)
        self.rounds = Rounds()  # one DSN per message per round (outcome.transition)
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._tls_broken: dict[str, float] = {}
        self._verify_context = self._make_verify_context(deliver.ca_file)
        self._queue_ids = queue_ids  # the worker's one generator: no id twice
        self.event_log = EventLog(settings.deliver.event_log_dir, worker)
        self.stopping = False
        self.suspended: frozenset[str] = frozenset()  # domains relayctl suspended
        self.traced: frozenset[str] = frozenset()  # addresses relayctl traces
        self.counters: collections.Counter[str] = collections.Counter()  # names of stats.ring
        self.accept_to_delivered = Histogram()
        self.accept_to_delivered_by_lane = {lane: Histogram() for lane in LANES}
        # Campaigns the operator paused or cancelled (name -> state), kept in the spool.
        self.campaigns: dict[str, str] = {}
        # Per campaign: outcomes since the worker started (the busiest go to /metrics).
        self.campaign_counts: dict[str, collections.Counter] = {}
        self._crash_on = os.environ.get(TEST_CRASH_ON) or None  # test hook, see the docstring
        self.fresh_bodies = FreshBodies()

    def reopen_log(self) -> None:
        """SIGUSR1: logrotate has renamed delivery-N.jsonl."""
        self.event_log.reopen()

    @staticmethod
    def _make_verify_context(ca_file: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=ca_file or None)
        context.check_hostname = True
        return context

    def wake(self) -> None:
        self._wakeup.set()

    # -- the loop -----------------------------------------------------------

    async def _start(self) -> None:
        returned = await self.spool.unclaim_all()
        if returned:
            log.info("%d recipients claimed before a restart are queued again", returned)
        suspended = await self.spool.get_meta("suspended")
        self.suspended = frozenset(orjson.loads(suspended)) if suspended else frozenset()
        traced = await self.spool.get_meta("traced")
        self.traced = frozenset(orjson.loads(traced)) if traced else frozenset()
        campaigns = await self.spool.get_meta("campaigns")  # relayctl campaign pause|cancel
        self.campaigns = orjson.loads(campaigns) if campaigns else {}
        effects = await self.spool.get_meta("effects")  # throttles and suspensions outlive a restart
        if effects:
            self.effects.restore([Effect.from_json(e) for e in orjson.loads(effects)], time.time())

    async def run(self) -> None:
        step, backoff = self._start, 0.0
        while not self.stopping:
            try:
                await step()
                if step == self._start:
                    self.spool.on_ready = self.wake
                    self.spool.fresh = self
                    self._spawn(self._drive())
                    self._spawn(self._prune_events())
                    step = self._once
                backoff = 0.0
            except RelayError as exc:
                # The spool failed (disk full, I/O error): keep trying, slower.
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.error("delivery loop: %s; again in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)

    async def _once(self) -> None:
        """Claim what is due, route it, then sleep until more may be due.

        Claims reserve room per lane: bulk mail holds at most
        ``bulk_loaded_share`` of ``max_loaded``, so a bulk backlog never
        keeps transactional mail from being loaded."""
        deliver = self.settings.deliver
        limit = deliver.max_loaded
        self._wakeup.clear()
        room = limit - self.loaded
        bulk_room = max(0, self._bulk_limit() - self.loaded_bulk)
        claimed = await self.spool.claim_due(time.time(), room, bulk_room) if room > 0 else []
        if self.stopping:
            return  # claimed just now: queued again at the next start
        bulk = sum(1 for r in claimed if r.lane == BULK)
        self.loaded += len(claimed)
        self.loaded_bulk += bulk
        bulk_full = self.loaded_bulk >= self._bulk_limit()
        # Full: _unload wakes the loop once a tenth of the room is free again
        # (finished deliveries commit nothing that would wake it).
        self._full = bulk_full or self.loaded >= limit
        if claimed:
            by_message: dict[str, list[Job]] = {}
            for job in jobs_from(claimed, self.traced):
                by_message.setdefault(job.queue_id, []).append(job)
            for jobs in by_message.values():
                self._load(jobs, "claimed")
            if len(claimed) == room or (bulk and bulk == bulk_room):
                await asyncio.sleep(0)  # more may be due: look again soon
                return
        lanes = (TRANSACTIONAL,) if bulk_full else LANES
        due = await self.spool.next_due(lanes)
        wait = MAX_WAIT if due is None else min(max(due - time.time(), 0.01), MAX_WAIT)
        if self.loaded >= limit:
            wait = MAX_WAIT
        try:
            await asyncio.wait_for(self._wakeup.wait(), wait)
        except asyncio.TimeoutError:
            pass

    def _bulk_limit(self) -> int:
        """Recipients bulk mail may have loaded (``bulk_loaded_share``)."""
        return int(self.settings.deliver.max_loaded * self.settings.deliver.bulk_loaded_share)

    def _load(self, jobs: list[Job], how: str) -> None:
        """One message's claimed jobs, on their way to their sites."""
        for job in jobs:
            self.rounds.claimed(job.queue_id, len(job.recipients))
            if job.trace:
                self._trace(job, "%s %d recipient(s), attempt %d: %s", how, len(job.recipients),
                            job.recipients[0].attempts + 1,
                            ", ".join(r.address for r in job.recipients))
        self._spawn(self._route_message(jobs))

    # -- fresh mail: claimed as the spool stores it (spool.store.FreshMail) ------

    def take_fresh(self, part: Part) -> bool:
        deliver = self.settings.deliver
        count, bulk = len(part.recipients), part.lane == BULK
        if self.loaded + count > deliver.max_loaded:  # (stop() unhooks this from the spool)
            return False
        if bulk and self.loaded_bulk + count > self._bulk_limit():
            return False
        if not self.fresh_bodies.reserve(len(part.body)):
            return False
        self.loaded += count
        self.loaded_bulk += count if bulk else 0
        return True

    def fresh_failed(self, part: Part) -> None:
        self.fresh_bodies.unreserve(len(part.body))
        self.loaded -= len(part.recipients)
        self.loaded_bulk -= len(part.recipients) if part.lane == BULK else 0

    def fresh_stored(self, due: list[DueRecipient], body: bytes) -> None:
        holder = self.fresh_bodies.keep(due[0].queue_id, body)
        jobs = jobs_from(due, self.traced)
        for job in jobs:
            job.body = holder
        self.counters["claimed_at_intake"] += len(due)
        self._load(jobs, "claimed at intake:")

    def _unload(self, recipients) -> None:
        """Claimed recipients done with (an outcome, held, or dropped): room
        for the next claims of their lane."""
        self.loaded -= len(recipients)
        self.loaded_bulk -= sum(1 for r in recipients if r.lane == BULK)
        if self._full:
            limit = self.settings.deliver.max_loaded
            if (self.loaded <= 0.9 * limit
                    and self.loaded_bulk <= 0.9 * limit * self.settings.deliver.bulk_loaded_share):
                self._full = False
                self.wake()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug: let it kill the worker; the supervisor restarts it and
            # the claimed recipients are queued again (a job's own bug was
            # charged to its message first: _charged).
            log.error("delivery task failed", exc_info=task.exception())
            self.event_log.flush()  # this turn's committed outcomes
            os._exit(70)

    async def stop(self, timeout: float) -> None:
        """Drain: claim nothing more, drop the jobs not started (they stay
        claimed and go out after the restart), let transactions in flight
        finish and record their outcome, within ``timeout``."""
        self.stopping = True
        self.spool.fresh = None
        self._wakeup.set()
        for job in self.scheduler.take_all():
            self._unload(job.recipients)
            self.rounds.done(job.queue_id, len(job.recipients))  # tried after the restart
        deadline = time.monotonic() + timeout
        while self._sending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for session in self.sessions.values():
            session.close()
        self.event_log.close()

    # -- routing a job to its destination -------------------------------------

    def apply(self, settings: Settings) -> None:
        """Take reloaded settings (SIGHUP): later attempts use them."""
        deliver = settings.deliver
        moved = deliver.event_log_dir != self.settings.deliver.event_log_dir
        self.settings = settings
        if moved:
            self.event_log.reopen(deliver.event_log_dir)
        self.hostname = settings.hostname
        self.resolver = Resolver(
            nameservers=settings.dns.nameservers, routes=settings.routes, mx_port=deliver.mx_port
        )
        self.schedule = RetrySchedule(deliver.retry_schedule, deliver.max_lifetime, rng=random.Random())
        self.timeouts = Timeouts(deliver.connect_timeout, deliver.command_timeout, deliver.data_timeout)
        self._verify_context = self._make_verify_context(deliver.ca_file)
        self.effects.rules = settings.shaping.rules
        self.scheduler.apply(settings.shaping, deliver.connection_idle_timeout, deliver.spawn_after,
                             time.time(), deliver.max_sessions, deliver.max_bytes_in_flight)
        self._poke.set()

    def outbound_connections(self) -> int:
        return self.scheduler.connection_count()

    def busiest(self, count: int) -> list[tuple[str, int]]:
        """The sites with the most work waiting or in flight."""
        return self.scheduler.busiest(count)

    def tls_mode(self, domain: str) -> str:
        return self.settings.tls_policy.get(domain, self.settings.deliver.tls)

    async def _route_message(self, jobs: list[Job]) -> None:
        """Route one message's jobs (one per domain) together: their domains
        are resolved first, all at once, so the jobs reach their sites in
        one go, and domains sharing MX hosts share one transaction instead
        of the first being sent before the second is resolved."""
        if len(jobs) > 1:
            await asyncio.gather(*(self.resolver.resolve(job.domain) for job in jobs),
                                 return_exceptions=True)  # answers and failures are cached
        for job in jobs:
            await self._charged(job, self._route(job))

    async def _route(self, job: Job) -> None:
        campaign = self.campaigns.get(job.campaign) if job.campaign else None
        if campaign == PAUSED:  # claimed before the pause, or due since
            await self._hold([job], None, PAUSED_TEXT)
            return
        if campaign == CANCELLED:  # its mail that came after the cancel
            await self._cancel_jobs([job])
            return
        if job.domain in self.suspended:  # claimed before, or due since the suspension
            await self._hold([job], None, SUSPENDED_TEXT)
            return
        if job.domain in self.settings.deliver.exclude_domains:
            reply = Reply(550, "5.7.1", "recipient domain is excluded from delivery", None)
            await self._record(job, [(r, reply, Stage.LOCAL) for r in job.recipients], None, None,
                               dropped=True)
            return
        suppressed = [r for r in job.recipients if r.suppressed]
        if suppressed:
            await self._record(
                Job(**{**job.__dict__, "recipients": suppressed}),
                [(r, Reply(550, "5.1.1", f"suppressed after a hard bounce: {r.suppressed}", None),
                  Stage.LOCAL) for r in suppressed],
                None, None,
            )
            job.recipients = [r for r in job.recipients if not r.suppressed]
            if not job.recipients:
                return
        try:
            destination = await self.resolver.resolve(job.domain)
        except DeliveryError as exc:
            if job.trace:
                self._trace(job, "resolving %s failed: %s", job.domain, exc.reply)
            await self._record(job, [(r, exc.reply, exc.stage) for r in job.recipients], None, None)
            return
        if job.trace:
            self._trace(job, "%s -> %s", job.domain,
                        ", ".join(f"{h.host}[{h.ip}]:{h.port}" for h in destination.hops))
        if self.stopping:
            self._unload(job.recipients)
            self.rounds.done(job.queue_id, len(job.recipients))
            return
        if job.campaign and job.campaign in self.campaigns:
            # Paused or cancelled while its MX was looked up: not in the
            # scheduler yet, so take_campaign did not see it.
            await (self._hold([job], None, PAUSED_TEXT) if self.campaigns[job.campaign] == PAUSED
                   else self._cancel_jobs([job]))
            return
        job.destination = destination
        job.site_key = (destination.key, self.tls_mode(job.domain))
        self.scheduler.push(job.site_key, destination, job.domain, job, time.time())
        self._poke.set()

    # -- the driver: performing what the scheduler decides -------------------------

    async def _drive(self) -> None:
        """Perform the scheduler's actions, then sleep until it wants to look
        again (a rate token, an expiry, an idle timeout) or news arrives."""
        while True:
            self._poke.clear()
            if not self.stopping:
                for action in self.scheduler.actions(time.time()):
                    self._perform(action)
            await self._publish_effects()
            wake = self.scheduler.next_wake()
            timeout = MAX_WAIT if wake is None else min(max(wake - time.time(), 0.001), MAX_WAIT)
            try:
                async with asyncio.timeout(timeout):  # no task per wait, unlike wait_for
                    await self._poke.wait()
            except TimeoutError:
                pass
            self._forget_tls_failures()

    def _perform(self, action) -> None:
        if isinstance(action, Send):
            self._sending += 1
            self._spawn(self._charged(action.job, self._send(action.conn, action.job, action.chunking)))
        elif isinstance(action, Open):
            self._spawn(self._open(action))
        elif isinstance(action, Close):
            self._spawn(self._close(action.conn))
        elif isinstance(action, Fail):
            for job in action.jobs:
                self._spawn(self._record(job, [(r, action.reply, action.stage) for r in job.recipients],
                                         job.destination, None))
        elif isinstance(action, Hold):
            self._held_domains.setdefault(action.site, set()).update(action.domains)
            self._spawn(self._hold(list(action.jobs), action.until, action.reason))

    async def _open(self, action: Open) -> None:
        try:
            session = await self._connect(action.hops, action.site[1])
        except DeliveryError as exc:
            for then in self.scheduler.on_open_failed(action.conn, exc.reply, exc.stage, time.time()):
                self._perform(then)
        else:
            self.sessions[action.conn] = session
            self.scheduler.on_opened(action.conn, session.hop, time.time())
        self._poke.set()

    async def _send(self, conn: int, job: Job, chunking: bool = False) -> None:
        """One transaction on one pooled connection, reported back to the
        scheduler; its outcome recorded unless the job goes to the next MX.
        ``chunking``: the site's setting at this send, not at the open."""
        try:
            session = self.sessions.get(conn)
            if session is None or not session.alive:
                # The server closed it while it was idle: the job was not
                # tried, and goes again on a fresh connection.
                session = self.sessions.pop(conn, None)
                if session is not None:
                    session.close()
                self.scheduler.on_not_sent(conn, job, time.time())
                return
            if job.trace:
                self._trace(job, "session %s[%s] from %s, tls=%s, message %d on it",
                            session.hop.host, session.hop.ip, session.source_ip or "any",
                            session.tls, session.messages_sent + 1)
            session.chunking = chunking
            done = await self._transact(job, session)
            if done == "full":  # 421 at MAIL after messages on this connection: its limit
                self.sessions.pop(conn, None)
                self.scheduler.on_connection_full(conn, job, time.time())
                if job.trace:
                    self._trace(job, "421 at MAIL after %d messages: a fresh connection",
                                session.messages_sent)
                return
            if done is None:  # nothing delivered: a body gone, or a dead pooled connection
                self.scheduler.on_sent(conn, job, time.time(), [], False, None)
                if not session.usable:
                    self._lost(conn)
                    if job.retried == "again":
                        job.retried = True
                        self.scheduler.push(job.site_key, job.destination, job.domain, job,
                                            time.time(), front=True)
                return
            outcomes, site_failure, latency, body = done
            replies = [reply for _, reply, _ in outcomes if reply is not None]
            delivered = any(reply.code in (250, 251) for reply in replies)
            verdict = self.scheduler.on_sent(conn, job, time.time(), replies, delivered, site_failure)
            if site_failure is not None or not session.usable:
                self._lost(conn)
            if verdict == RETRY:
                if job.trace:
                    self._trace(job, "%s from %s: trying the next MX host", site_failure,
                                session.hop.host)
                return
            if verdict == BOUNCE:
                outcomes = [(r, reply if reply.code in (250, 251) else
                             Reply(554, "5.7.1", f"bounced by a shaping rule: {reply}"[:400], reply.mx),
                             stage if reply.code in (250, 251) else Stage.LOCAL)
                            for r, reply, stage in outcomes]
            await self._record(job, outcomes, job.destination, session, latency, body)
        finally:
            self._sending -= 1
            self._poke.set()

    async def _close(self, conn: int) -> None:
        session = self.sessions.pop(conn, None)
        try:
            if session is not None:
                await session.quit()
        finally:
            self.scheduler.on_closed(conn)
            self._poke.set()

    def _lost(self, conn: int) -> None:
        session = self.sessions.pop(conn, None)
        if session is not None:
            session.close()
        self.scheduler.on_lost(conn)

    async def _connect(self, hops, tls_mode: str) -> SmtpSession:
        """Open a session to the first hop that takes one (RFC 5321 5.1)."""
        source_ip = self.source_ips[next(self._next_source) % len(self.source_ips)]
        last: DeliveryError | None = None
        for hop in hops:
            mode = tls_mode
            if mode == "opportunistic" and self._tls_broken.get(hop.ip, 0) > time.monotonic():
                mode = "none"
            for attempt_mode in (mode, "none"):
                session = SmtpSession(hop, helo_name=self.hostname, source_ip=source_ip,
                                      timeouts=self.timeouts)
                try:
                    self.counters["connections_out"] += 1
                    await session.open(attempt_mode, self._verify_context if attempt_mode == "verify" else None)
                    return session
                except TlsUnavailable as exc:
                    session.close()
                    last = exc
                    if attempt_mode == "opportunistic" and exc.stage == Stage.STARTTLS:
                        log.info("STARTTLS to %s [%s] failed (%s): plaintext", hop.host, hop.ip, exc)
                        self._tls_broken[hop.ip] = time.monotonic() + TLS_FALLBACK_MEMORY
                        continue
                    break
                except DeliveryError as exc:
                    session.close()
                    last = exc
                    break
        raise last or DeliveryError(Reply(0, "4.4.4", "no host to connect to", None), Stage.CONNECT)

    def _forget_tls_failures(self) -> None:
        if len(self._tls_broken) > 64:
            now = time.monotonic()
            self._tls_broken = {ip: until for ip, until in self._tls_broken.items() if until > now}

    async def _hold(self, jobs: list[Job], until: float | None, reason: str) -> None:
        """Jobs of a suspended site back to the spool, due when the suspension
        ends, their attempts unchanged (KumoMTA issue 322 is what this avoids);
        ``until`` None: held until the operator resumes their domain."""
        state = RecipientState.HELD if until is None else RecipientState.DEFERRED
        updates = [RecipientUpdate(r.queue_id, r.index, state, r.attempts, until or time.time(),
                                   f"{HELD_PREFIX}{reason}"[:500])
                   for job in jobs for r in job.recipients]
        await self._commit_leaving(jobs, updates, [])
        log.info("%d recipient(s) held until %s: %s", len(updates),
                 "resumed" if until is None else time.strftime("%H:%M:%S", time.localtime(until)),
                 reason)

    async def _commit_leaving(self, jobs: list[Job], updates, events) -> bool:
        """Commit the new state of jobs that leave memory undelivered (held or
        cancelled), then settle their rounds: bounces a sibling job of the
        same message held for them get their DSN now.  Returns whether the
        commit went through (see _complete)."""
        try:
            done = await self._complete(updates, events, [], jobs[0].queue_id)
        finally:
            self._unload([r for job in jobs for r in job.recipients])
        for job in jobs:
            held = self.rounds.done(job.queue_id, len(job.recipients))
            if held is not None:  # a sibling job's bounces waited for this one
                await self._settle_bounces(job, held)
        return done

    async def _transact(self, job: Job, session: SmtpSession):
        """One transaction: (outcomes, site failure or None, latency, body),
        or None when nothing was delivered (the message is gone, or a reused
        connection turned out dead before the server said anything about
        this job: then job.retried is "again" and it should be tried anew;
        with BDAT the body may have gone out, but a server that took it
        says so before it closes, and a timeout then counts at the dot)."""
        # Fresh mail's first transaction sends the body kept from intake;
        # any later one (next MX, a retry) reads it back from the spool.
        fresh, job.body = job.body, None
        body = fresh.body if fresh is not None else None
        if body is None:
            try:
                body = await self.spool.body(job.queue_id)
            except RelayError as exc:
                log.error("%s: body unreadable: %s", job.queue_id, exc)
                body = None
        if body is None:  # removed meanwhile (relayctl delete, say)
            self._unload(job.recipients)
            self.rounds.done(job.queue_id, len(job.recipients))
            return None
        started = time.monotonic()
        reused = session.messages_sent > 0
        if self._crash_on is not None and any(self._crash_on in r.address for r in job.recipients):
            raise RuntimeError(f"{TEST_CRASH_ON}: delivery of {job.queue_id} crashes")
        try:
            result = await session.send(
                job.sender, [r.address for r in job.recipients], strip_internal_headers(body),
                job.smtputf8,
            )
        except DeliveryError as exc:
            session.close()
            if reused and exc.stage is Stage.MAIL and exc.reply.code == 0 and not job.retried:
                job.retried = "again"
                return None
            if reused and exc.stage is Stage.MAIL and exc.reply.code == 421 and not job.retried:
                job.retried = True  # once: a receiver that 421s every MAIL is trouble
                return "full"
            if job.trace:
                self._trace(job, "connection failed at %s: %s", exc.stage.value, exc.reply)
            return ([(r, exc.reply, exc.stage) for r in job.recipients], exc.reply,
                    time.monotonic() - started, body)
        outcomes = self._per_recipient(job, result)
        if job.trace:
            self._trace(job, "MAIL %s | RCPT %s | %s | end %s", result.mail,
                        " ; ".join(map(str, result.rcpt)),
                        "BDAT" if result.chunked else f"DATA {result.data}", result.dot)
        return outcomes, None, time.monotonic() - started, body

    @staticmethod
    def _per_recipient(job: Job, result: TransactionResult) -> list:
        """Each recipient's deciding reply and the stage it came at."""
        if result.mail is None or result.mail.code != 250:
            return [(r, result.mail, Stage.MAIL) for r in job.recipients]
        outcomes, accepted = [], []
        for rcpt, reply in zip(job.recipients, result.rcpt):
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                outcomes.append((rcpt, reply, Stage.RCPT))
        if not accepted:
            return outcomes
        if result.chunked:
            return outcomes + [(r, result.dot, Stage.DOT) for r in accepted]
        if result.data is None or result.data.code != 354:
            reply = result.data or Reply(0, "4.4.2", "no reply to DATA", None)
            return outcomes + [(r, reply, Stage.DATA) for r in accepted]
        return outcomes + [(r, result.dot, Stage.DOT) for r in accepted]

    # -- crashes ----------------------------------------------------------------

    async def _charged(self, job: Job, step: Awaitable):
        """Run one job's step; a bug it raises is charged to the job's
        message (relay.spool.store.Spool.record_crash) and raised again."""
        try:
            return await step
        except Exception as exc:
            await self._record_crash(job, exc)
            raise

    async def _record_crash(self, job: Job, exc: Exception) -> None:
        error = " ".join(f"{type(exc).__name__}: {exc}".split())[:MAX_ERROR]
        after = self.settings.deliver.quarantine_after
        try:
            events = await asyncio.wait_for(
                self.spool.record_crash(job.queue_id, [r.index for r in job.recipients], error,
                                        job.domain, after),
                CRASH_RECORD_TIMEOUT,
            )
        except (RelayError, asyncio.TimeoutError) as failure:
            log.error("%s: crash not recorded: %s", job.queue_id, str(failure) or "timed out")
            return
        self.event_log.write(events)
        quarantined = [event.recipient for event in events if event.outcome == "quarantined"]
        if quarantined:
            log.error("%s: quarantined after %d crashed deliveries (%s): %s", job.queue_id, after,
                      error, ", ".join(quarantined))

    # -- outcomes -------------------------------------------------------------

    async def _record(self, job: Job, outcomes: list, destination: Destination | None,
                      session: SmtpSession | None, latency: float = 0.0,
                      body: bytes | None = None, dropped: bool = False) -> None:
        """Commit each recipient's new state with its event; DSN for bounces.

        ``dropped``: final without a DSN (domain exclusion list)."""
        now = time.time()
        attempt = Attempt(destination.name if destination else job.domain,
                          session.source_ip if session else None,
                          bool(session and session.tls), latency)
        verdict = transition.decide(job.queue_id, outcomes, attempt, now, self.schedule, dropped)
        if verdict.bounced and should_bounce(job.sender):
            self.rounds.hold(job.queue_id, verdict.take_bounces())
        held = self.rounds.done(job.queue_id, len(job.recipients))
        if held is not None:
            if not await self._send_dsn(job, held.bounced, body):
                held.defer(now + self.schedule.delay(1))
            verdict.add(held)
        if not verdict.updates:
            self._unload(job.recipients)
            return
        try:
            if not await self._complete(verdict.updates, verdict.events, verdict.suppress,
                                        job.queue_id):
                return
        finally:
            self._unload(job.recipients)
        if job.trace:
            for update, event in zip(verdict.updates, verdict.events):
                self._trace(job, "%s -> %s (%s)%s", event.recipient, event.outcome, event.text,
                            f", next attempt in {update.next_attempt - now:.0f}s"
                            if event.outcome == "deferred" else "")
        self._count(verdict.events, job.received, now)
        self.event_log.write(verdict.events)

    def _count(self, events: list[Event], received: float | None, now: float) -> None:
        for event in events:
            self.counters[event.outcome] += 1
            if event.failure_class and event.outcome in ("deferred", "bounced"):
                self.counters[f"{event.outcome}_{event.failure_class}"] += 1
            if event.outcome in LANE_OUTCOMES:
                self.counters[f"{event.outcome}_{event.lane}"] += 1
            if event.campaign:
                self.campaign_counts.setdefault(event.campaign, collections.Counter())[
                    "dropped" if event.outcome in DROPPED_OUTCOMES else event.outcome] += 1
            if event.outcome == "delivered" and received is not None:
                self.accept_to_delivered.observe(now - received)
                self.accept_to_delivered_by_lane[event.lane].observe(now - received)

    async def _complete(self, updates, events, suppress, queue_id: str) -> bool:
        """Commit an outcome, trying again while the spool fails (it may be
        full for long, and the outcome is known); False only when the
        worker stops first: the recipients stay claimed until the next
        start, then go out again (at-least-once)."""
        for attempt in itertools.count():
            try:
                await self.spool.complete(updates, events, suppress)
                return True
            except RelayError as exc:
                if self.stopping:
                    log.error("%s: outcome not recorded: %s", queue_id, exc)
                    return False
                delay = COMPLETE_RETRIES[min(attempt, len(COMPLETE_RETRIES) - 1)]
                log.warning("%s: outcome not recorded yet (%s); again in %ss", queue_id, exc, delay)
                await asyncio.sleep(delay)

    async def _settle_bounces(self, job: Job, held: Verdict) -> None:
        """Commit bounces held for a round that ended without an outcome of
        its own (its last job was held by a suspension)."""
        if not await self._send_dsn(job, held.bounced, None):
            held.defer(time.time() + self.schedule.delay(1))
        if await self._complete(held.updates, held.events, held.suppress, job.queue_id):
            self._count(held.events, None, time.time())
            self.event_log.write(held.events)

    async def _send_dsn(self, job: Job, bounced: list[FailedRecipient], body: bytes | None) -> bool:
        """Queue the DSN like any message; False when that failed."""
        if body is None:
            try:
                body = await self.spool.body(job.queue_id) or b""
            except RelayError:
                body = b""
        now = time.time()
        dsn = build_dsn(
            reporting_mta=self.hostname, queue_id=job.queue_id, sender=job.sender,
            arrival=job.received, recipients=bounced, original=body, now=now,
        )
        transaction = Transaction(self._queue_ids.next(), "", (job.sender,), dsn, now, not job.sender.isascii())
        try:
            await self.submit(transaction)
            self.counters["dsn_queued"] += 1
            log.info("%s: DSN %s queued for <%s>", job.queue_id, transaction.queue_id, job.sender)
            return True
        except RelayError as exc:
            log.error("%s: DSN to <%s> could not be queued (retried later): %s",
                      job.queue_id, job.sender, exc)
            return False

    def _trace(self, job: Job, message: str, *args) -> None:
        elapsed = (time.monotonic() - job.claimed) * 1000
        trace_log.info("%s: +%.1fms " + message, job.queue_id, elapsed, *args)

    # -- housekeeping ---------------------------------------------------------

    async def _publish_effects(self) -> None:
        """Effects that started or ended: a record in the delivery log, a
        count in the stats ring, and the ones in force kept in the spool."""
        started, ended = self.effects.drain_changes()
        if not started and not ended:
            return
        now = time.time()
        for effect in started:
            self.counters[f"effects_{effect.kind}"] += 1
        self.event_log.write_effects([(e, "started") for e in started] + [(e, "ended") for e in ended],
                                     now)
        for effect in ended:
            domains = self._held_domains.pop(effect.site, None)
            if domains and effect.kind == "suspend":
                try:  # cancelled early (expired ones are due now anyway)
                    await self.spool.release_held(sorted(domains), now)
                except RelayError as exc:
                    log.warning("held mail of %s not released (due at the old expiry): %s",
                                effect.site, exc)
        try:
            await self.spool.set_meta(
                "effects", orjson.dumps([e.to_json() for e in self.effects.all(now)]).decode())
        except RelayError as exc:  # kept in memory; saved with the next change
            log.warning("shaping effects not saved: %s", exc)

    async def _prune_events(self) -> None:
        while True:
            await asyncio.sleep(3600)
            deliver = self.settings.deliver
            try:
                await self.spool.prune_events(time.time() - deliver.event_retention)
                await self.spool.prune_bounced(time.time() - deliver.keep_bounced)
            except RelayError as exc:
                log.warning("pruning postponed: %s", exc)

    # -- operator commands (relayctl, through the supervisor) -----------------

    async def set_traced(self, addresses: frozenset[str]) -> None:
        """The addresses whose delivery is traced; kept across restarts."""
        await self.spool.set_meta("traced", orjson.dumps(sorted(addresses)).decode())
        self.traced = addresses

    def shaping(self) -> dict:
        """`relayctl shaping`: the effects in force and each site's limits."""
        now = time.time()
        return {"effects": [{**e.to_json(), "worker": self.worker} for e in self.effects.all(now)],
                "sites": [{**site, "worker": self.worker} for site in self.scheduler.site_status(now)]}

    def cancel_effect(self, effect_id: int) -> dict | None:
        effect = self.effects.cancel(effect_id, time.time())
        self._poke.set()
        return None if effect is None else {**effect.to_json(), "worker": self.worker}

    async def delete(self, queue_ids: list[str]) -> list[str]:
        """Remove messages from the queue; their ``deleted`` events go to the
        event log like any outcome.  Returns the ids this worker had."""
        for queue_id in queue_ids:
            self.fresh_bodies.forget(queue_id)
        found = await self.spool.delete(queue_ids, time.time())
        for queue_id, events in found.items():
            log.info("%s: deleted by the operator, %d recipient(s) not delivered",
                     queue_id, len(events))
            self.event_log.write(events)
        return sorted(found)

    async def suspend(self, domain: str, suspended: bool) -> None:
        """Hold (or release) a domain's mail; kept across restarts.

        Claims do not look at suspensions: a suspended domain's mail is put
        in the held state when it is claimed (``_route``), jobs waiting in
        memory at once, and resuming makes the held recipients due — so a
        suspended backlog costs nothing while it waits."""
        domains = set(self.suspended)
        (domains.add if suspended else domains.discard)(domain)
        await self.spool.set_meta("suspended", orjson.dumps(sorted(domains)).decode())
        self.suspended = frozenset(domains)
        if suspended:
            now, held = time.time(), []
            for job in self.scheduler.take_domain(domain):  # whole sites: put the others back
                mine = [r for r in job.recipients if r.domain == domain]
                job.recipients = [r for r in job.recipients if r.domain != domain]
                if mine:
                    held.append(dataclasses.replace(job, recipients=mine))
                if job.recipients:
                    self.scheduler.push(job.site_key, job.destination, job.domain, job, now)
            if held:
                await self._hold(held, None, SUSPENDED_TEXT)
        else:
            released = await self.spool.release_suspended(domain, time.time())
            log.info("%s resumed: %d held recipient(s) due now", domain, released)
        self.wake()
        self._poke.set()

    # -- campaigns (relayctl campaign) ------------------------------------------

    async def campaign(self, action: str, name: str | None) -> dict:
        """``list``/``show`` this worker's figures; ``pause``, ``resume`` and
        ``cancel`` change the campaign's state here (kept across restarts;
        every worker is told) and return ``count``: recipients held,
        released or cancelled.

        A pause takes the campaign's jobs out of the scheduler and holds its
        claimed mail (held state, attempts unchanged); later claims of it
        are held as they come (``_route``).  A cancel ends every waiting
        recipient with a ``cancelled`` event and no DSN; mail of the
        campaign that comes later is cancelled too, until ``resume``.
        Transactions already in flight finish."""
        now = time.time()
        count = 0
        if action in ("pause", "cancel", "resume"):
            states = dict(self.campaigns)
            if action == "resume":
                states.pop(name, None)
            else:
                states[name] = PAUSED if action == "pause" else CANCELLED
            await self.spool.set_meta("campaigns", orjson.dumps(states).decode())
            self.campaigns = states
            jobs = self.scheduler.take_campaign(name) if action != "resume" else []
            if action == "pause":
                count = sum(len(job.recipients) for job in jobs)
                if jobs:
                    await self._hold(jobs, None, PAUSED_TEXT)
            elif action == "cancel":
                count = await self._cancel_jobs(jobs)
                events = await self.spool.cancel_campaign(name, now)
                self._count(events, None, now)
                self.event_log.write(events)
                count += len(events)
            else:
                count = await self.spool.release_campaign(name, now)
            log.info("campaign %s: %s (%d recipient(s))", name, action, count)
            self.wake()
            self._poke.set()
        figures = await self.spool.campaign_figures(name if action != "list" else None)
        for figure in figures:
            figure["state"] = self.campaigns.get(figure["name"], "active")
        return {"count": count, "campaigns": figures,
                "states": ({name: self.campaigns[name]} if name in self.campaigns else {})
                if name else dict(self.campaigns)}

    async def _cancel_jobs(self, jobs: list[Job]) -> int:
        """Claimed jobs of a cancelled campaign end: bounced state, a
        ``cancelled`` event each, no DSN."""
        if not jobs:
            return 0
        now = time.time()
        updates, events = [], []
        for job in jobs:
            for r in job.recipients:
                updates.append(RecipientUpdate(r.queue_id, r.index, RecipientState.BOUNCED,
                                               r.attempts, now, CANCELLED_TEXT))
                events.append(Event.local(now, r.queue_id, r.address, job.domain, CANCELLED_TEXT,
                                          "cancelled", None, r.lane, r.campaign))
        done = await self._commit_leaving(jobs, updates, events)
        if done:
            self._count(events, None, now)
            self.event_log.write(events)
        return len(events)
