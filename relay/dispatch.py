"""The delivery loop of one worker: due mail from its spool, out to the MX
servers, and each recipient's outcome back into the spool.

Input: the worker's spool (only its own slots' mail), the resolver, and a
``submit`` callable that queues new messages (DSNs) the way intake does.
Output: one SMTP transaction per (message, domain) over pooled sessions,
and per recipient an update plus an event, committed together; the events
also go to ``event_log_dir/delivery-N.jsonl`` as JSON lines.

Theory of operation.  Only mail that is due is loaded: ``claim_due`` takes
up to ``deliver.max_loaded`` recipients (metadata only; a body is read when
its transaction starts) and marks them as being sent.  Claimed recipients
become jobs in their destination's queue (deliver.queue).  A sender task
takes a pooled connection or opens one from the next of this worker's
source IPs (round robin), then sends job after job until the queue is
empty or the connection has carried ``max_messages_per_connection``.
Each reply is classified (outcome.classify): delivered, deferred to the
next step of the retry schedule, or bounced — with a DSN to the sender:
one per message for the recipients it claimed together (its round), as
Postfix sends one per message, not one per recipient or domain.  A
bounced recipient is committed only with its DSN queued, so its outcome
waits in memory (``_bounces``) until the last of its message's claimed
recipients has its outcome; a crash meanwhile leaves it claimed, to be
tried again after the restart.
The loop sleeps until the earliest deferred recipient is due or the spool
says new mail was committed.
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
from relay.deliver.queue import DestinationQueue, Job, jobs_from
from relay.deliver.resolve import Destination, Resolver
from relay.deliver.schedule import RetrySchedule
from relay.deliver.session import SmtpSession, Timeouts, TransactionResult
from relay.errors import DeliveryError, RelayError, TlsUnavailable
from relay.model import QueueIds, Reply, Stage, Transaction
from relay.outcome.bounce import FailedRecipient, build_dsn, should_bounce
from relay.outcome.classify import Action, FailureClass, Outcome, classify
from relay.spool.format import RecipientState
from relay.stats.ring import Histogram
from relay.spool.store import EVENT_COLUMNS, DueRecipient, RecipientUpdate, Spool

log = logging.getLogger("relay.deliver")
trace_log = logging.getLogger("relay.trace")

TLS_FALLBACK_MEMORY = 3600.0  # remember a host whose STARTTLS failed this long
IDLE_CHECK_INTERVAL = 1.0
PUMP_INTERVAL = 0.1
MAX_WAIT = 5.0  # the loop looks at the spool at least this often
COMPLETE_RETRIES = (1, 2, 4, 8, None)  # seconds between tries to record an outcome
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


@dataclasses.dataclass
class _HeldBounces:
    """A message's bounced recipients waiting for its round's one DSN."""

    failed: list = dataclasses.field(default_factory=list)  # of FailedRecipient
    updates: list = dataclasses.field(default_factory=list)  # of RecipientUpdate
    events: list = dataclasses.field(default_factory=list)
    suppress: list = dataclasses.field(default_factory=list)

    def defer(self, retry: float) -> None:
        """No DSN went out: the recipients are deferred, not bounced."""
        self.updates = [dataclasses.replace(u, state=RecipientState.DEFERRED, next_attempt=retry)
                        for u in self.updates]
        self.events = [e[:10] + ("deferred",) + e[11:] for e in self.events]
        self.suppress = []


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
        self.queues: dict[tuple, DestinationQueue] = {}
        self.loaded = 0
        # Per message: claimed recipients still without an outcome, and the
        # bounces waiting for the last of them (one DSN per round).
        self._round: collections.Counter[str] = collections.Counter()
        self._bounces: dict[str, _HeldBounces] = {}
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._tls_broken: dict[str, float] = {}
        self._verify_context = self._make_verify_context(deliver.ca_file)
        self._queue_ids = queue_ids  # the worker's one generator: no id twice
        self._event_log = None
        self.reopen_log()
        self.stopping = False
        self.suspended: frozenset[str] = frozenset()  # domains relayctl suspended
        self.traced: frozenset[str] = frozenset()  # addresses relayctl traces
        self.counters: collections.Counter[str] = collections.Counter()  # names of stats.ring
        self.accept_to_delivered = Histogram()

    def reopen_log(self) -> None:
        """(Re)open delivery-N.jsonl: at start, after a reload that moves it,
        and on SIGUSR1 once logrotate has renamed the old file."""
        directory = self.settings.deliver.event_log_dir
        os.makedirs(directory, exist_ok=True)
        new = open(os.path.join(directory, f"delivery-{self.worker}.jsonl"), "ab")
        old, self._event_log = self._event_log, new
        if old is not None:
            old.close()

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

    async def run(self) -> None:
        step, backoff = self._start, 0.0
        while not self.stopping:
            try:
                await step()
                if step == self._start:
                    self.spool.on_ready = self.wake
                    self._spawn(self._close_idle_connections())
                    self._spawn(self._prune_events())
                    step = self._once
                backoff = 0.0
            except RelayError as exc:
                # The spool failed (disk full, I/O error): keep trying, slower.
                backoff = min(max(backoff * 2, 0.5), 30.0)
                log.error("delivery loop: %s; again in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)

    async def _once(self) -> None:
        """Claim what is due, route it, then sleep until more may be due."""
        limit = self.settings.deliver.max_loaded
        self._wakeup.clear()
        room = limit - self.loaded
        claimed = (await self.spool.claim_due(time.time(), room, self.suspended)
                   if room > 0 else [])
        if self.stopping:
            return  # claimed just now: queued again at the next start
        if claimed:
            self.loaded += len(claimed)
            for job in jobs_from(claimed, self.traced):
                self._round[job.queue_id] += len(job.recipients)
                if job.trace:
                    self._trace(job, "claimed %d recipient(s), attempt %d: %s", len(job.recipients),
                                job.recipients[0].attempts + 1,
                                ", ".join(r.address for r in job.recipients))
                self._spawn(self._route(job))
            if len(claimed) == room:
                await asyncio.sleep(0)  # more may be due: look again soon
                return
        due = await self.spool.next_due(self.suspended)
        wait = MAX_WAIT if due is None else min(max(due - time.time(), 0.01), MAX_WAIT)
        if self.loaded >= limit:
            wait = MAX_WAIT
        try:
            await asyncio.wait_for(self._wakeup.wait(), wait)
        except asyncio.TimeoutError:
            pass

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug: let it kill the worker; the supervisor restarts it and
            # the claimed recipients are queued again.
            log.error("delivery task failed", exc_info=task.exception())
            os._exit(70)

    async def stop(self, timeout: float) -> None:
        """Drain: claim nothing more, drop the jobs not started (they stay
        claimed and go out after the restart), let transactions in flight
        finish and record their outcome, within ``timeout``."""
        self.stopping = True
        self._wakeup.set()
        for queue in self.queues.values():
            for job in queue.take_all():
                self.loaded -= len(job.recipients)
                self._round_done(job.queue_id, len(job.recipients))  # tried after the restart
        deadline = time.monotonic() + timeout
        while any(q.senders for q in self.queues.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for queue in self.queues.values():
            for session in queue.idle:
                session.close()
        self._event_log.close()

    # -- routing a job to its destination -------------------------------------

    def apply(self, settings: Settings) -> None:
        """Take reloaded settings (SIGHUP): later attempts use them."""
        deliver = settings.deliver
        moved = deliver.event_log_dir != self.settings.deliver.event_log_dir
        self.settings = settings
        if moved:
            self.reopen_log()
        self.hostname = settings.hostname
        self.resolver = Resolver(
            nameservers=settings.dns.nameservers, routes=settings.routes, mx_port=deliver.mx_port
        )
        self.schedule = RetrySchedule(deliver.retry_schedule, deliver.max_lifetime, rng=random.Random())
        self.timeouts = Timeouts(deliver.connect_timeout, deliver.command_timeout, deliver.data_timeout)
        self._verify_context = self._make_verify_context(deliver.ca_file)
        for queue in self.queues.values():
            queue.max_connections = deliver.max_connections_per_destination
            queue.messages_per_connection = deliver.max_messages_per_connection
            queue.spawn_after = deliver.spawn_after

    def outbound_connections(self) -> int:
        return sum(queue.connections for queue in self.queues.values())

    def busiest(self, count: int) -> list[tuple[str, int]]:
        """The destinations with the most work waiting or in flight."""
        load = [(queue.destination.name, len(queue.jobs) + queue.senders)
                for queue in self.queues.values()]
        return sorted((item for item in load if item[1]), key=lambda item: -item[1])[:count]

    def tls_mode(self, domain: str) -> str:
        return self.settings.tls_policy.get(domain, self.settings.deliver.tls)

    async def _route(self, job: Job) -> None:
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
            self.loaded -= len(job.recipients)
            self._round_done(job.queue_id, len(job.recipients))
            return
        mode = self.tls_mode(job.domain)
        key = (destination.key, mode)
        queue = self.queues.get(key)
        if queue is None:
            deliver = self.settings.deliver
            queue = self.queues[key] = DestinationQueue(
                destination, mode, deliver.max_connections_per_destination,
                deliver.max_messages_per_connection, deliver.spawn_after,
            )
        queue.destination = destination  # the freshest answer
        queue.push(job)
        self._pump(queue)

    def _pump(self, queue: DestinationQueue) -> None:
        now = time.monotonic()
        while not self.stopping and queue.wants_sender(now):
            queue.senders += 1
            self._spawn(self._sender(queue))

    # -- senders ------------------------------------------------------------

    async def _sender(self, queue: DestinationQueue) -> None:
        session = queue.take_idle()
        while session is not None and not session.alive:
            session.close()
            session = queue.take_idle()
        try:
            while queue.jobs:
                if session is None:
                    try:
                        session = await self._connect(queue.destination, queue.tls_mode)
                    except DeliveryError as exc:
                        # The whole site failed: every queued job waits for
                        # the next attempt, rather than each failing alone.
                        await self._fail_queue(queue, exc)
                        break
                job = queue.next_job()
                if job is None:
                    break
                if job.trace:
                    self._trace(job, "session %s[%s] from %s, tls=%s, message %d on it",
                                session.hop.host, session.hop.ip, session.source_ip or "any",
                                session.tls, session.messages_sent + 1)
                if not await self._deliver(job, session, queue.destination):
                    # A pooled connection the server had closed: the job was
                    # not tried; it goes again on a fresh connection.
                    queue.push(job, front=True)
                    session = None
                    continue
                limit = self.settings.deliver.max_messages_per_connection
                if not session.usable or session.messages_sent >= limit:
                    await session.quit()
                    session = None
        finally:
            queue.senders -= 1
        if session is not None:
            if session.usable:
                queue.idle.append(session)
            else:
                session.close()
        self._pump(queue)

    async def _connect(self, destination: Destination, tls_mode: str) -> SmtpSession:
        """Open a session to the first hop that takes one (RFC 5321 5.1)."""
        source_ip = self.source_ips[next(self._next_source) % len(self.source_ips)]
        last: DeliveryError | None = None
        for hop in destination.hops:
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

    async def _fail_queue(self, queue: DestinationQueue, exc: DeliveryError) -> None:
        jobs = queue.take_all()
        for job in jobs:
            await self._record(job, [(r, exc.reply, exc.stage) for r in job.recipients],
                               queue.destination, None)

    async def _deliver(self, job: Job, session: SmtpSession, destination: Destination) -> bool:
        """One transaction; False when a reused connection turned out dead
        before the server said anything about this job (try it again)."""
        try:
            body = await self.spool.body(job.queue_id)
        except RelayError as exc:
            log.error("%s: body unreadable: %s", job.queue_id, exc)
            body = None
        if body is None:  # removed meanwhile (relayctl delete, say)
            self.loaded -= len(job.recipients)
            self._round_done(job.queue_id, len(job.recipients))
            return True
        started = time.monotonic()
        reused = session.messages_sent > 0
        try:
            result = await session.send(
                job.sender, [r.address for r in job.recipients], strip_internal_headers(body),
                job.smtputf8,
            )
        except DeliveryError as exc:
            session.close()
            if reused and exc.stage is Stage.MAIL and exc.reply.code == 0 and not job.retried:
                job.retried = True
                return False
            outcomes = [(r, exc.reply, exc.stage) for r in job.recipients]
            if job.trace:
                self._trace(job, "connection failed at %s: %s", exc.stage.value, exc.reply)
        else:
            outcomes = self._per_recipient(job, result)
            if job.trace:
                self._trace(job, "MAIL %s | RCPT %s | DATA %s | end %s", result.mail,
                            " ; ".join(map(str, result.rcpt)), result.data, result.dot)
        await self._record(job, outcomes, destination, session, time.monotonic() - started, body)
        return True

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
        if result.data is None or result.data.code != 354:
            reply = result.data or Reply(0, "4.4.2", "no reply to DATA", None)
            return outcomes + [(r, reply, Stage.DATA) for r in accepted]
        return outcomes + [(r, result.dot, Stage.DOT) for r in accepted]

    # -- outcomes -------------------------------------------------------------

    async def _record(self, job: Job, outcomes: list, destination: Destination | None,
                      session: SmtpSession | None, latency: float = 0.0,
                      body: bytes | None = None, dropped: bool = False) -> None:
        """Commit each recipient's new state with its event; DSN for bounces.

        ``dropped``: final without a DSN (domain exclusion list)."""
        now = time.time()
        updates, events, bounced, suppress = [], [], [], []
        some_accepted = any(reply.code in (250, 251) for _, reply, _ in outcomes)
        for rcpt, reply, stage in outcomes:
            outcome = classify(reply, stage)
            state, next_attempt, attempts, label = self._next_state(
                rcpt, reply, outcome, now, some_accepted
            )
            if dropped:
                state, label = RecipientState.BOUNCED, "dropped"
            elif label == "bounced":
                # A reply that would only defer bounces when the message expired.
                expired = outcome.action is not Action.BOUNCED
                bounced.append(FailedRecipient(rcpt.address, reply, "failed", now, expired))
                if (outcome.hard and outcome.failure_class is FailureClass.RECIPIENT
                        and not rcpt.suppressed):
                    suppress.append((rcpt.address, str(reply)))
            updates.append(RecipientUpdate(rcpt.queue_id, rcpt.index, state, attempts,
                                           next_attempt, str(reply)))
            events.append((
                now, job.queue_id, rcpt.address,
                destination.name if destination else job.domain,
                reply.mx, session.source_ip if session else None,
                int(bool(session and session.tls)), reply.code, reply.enhanced, reply.text,
                label, outcome.failure_class.value if outcome.failure_class else None,
                round(latency, 4),
            ))
        if bounced and should_bounce(job.sender):
            # Held back until the message's round is complete: one DSN for all.
            held = self._bounces.setdefault(job.queue_id, _HeldBounces())
            held.failed += bounced
            held.updates += [u for u, e in zip(updates, events) if e[10] == "bounced"]
            held.events += [e for e in events if e[10] == "bounced"]
            held.suppress += suppress
            updates = [u for u, e in zip(updates, events) if e[10] != "bounced"]
            events = [e for e in events if e[10] != "bounced"]
            suppress = []
        held = self._round_done(job.queue_id, len(job.recipients))
        if held is not None:
            if not await self._send_dsn(job, held.failed, body):
                # No DSN could be queued: not final yet.  The recipients wait
                # for the next attempt rather than bounce without telling the
                # sender.
                held.defer(now + self.schedule.delay(1))
            updates += held.updates
            events += held.events
            suppress += held.suppress
        if not updates:
            self.loaded -= len(job.recipients)
            return
        try:
            for delay in COMPLETE_RETRIES:
                try:
                    await self.spool.complete(updates, events, suppress)
                    break
                except RelayError as exc:
                    if delay is None:
                        # Not recorded: the recipients stay claimed until the
                        # next start, then go out again (at-least-once).
                        log.error("%s: outcome not recorded: %s", job.queue_id, exc)
                        return
                    log.warning("%s: outcome not recorded yet (%s); again in %ss",
                                job.queue_id, exc, delay)
                    await asyncio.sleep(delay)
        finally:
            self.loaded -= len(job.recipients)
        if job.trace:
            for update, event in zip(updates, events):
                self._trace(job, "%s -> %s (%s)%s", event[2], event[10], event[9],
                            f", next attempt in {update.next_attempt - now:.0f}s"
                            if event[10] == "deferred" else "")
        for event in events:
            label, failure_class = event[10], event[11]
            self.counters[label] += 1
            if failure_class and label in ("deferred", "bounced"):
                self.counters[f"{label}_{failure_class}"] += 1
            if label == "delivered":
                self.accept_to_delivered.observe(now - job.received)
        self._write_events(events)

    def _round_done(self, queue_id: str, count: int) -> _HeldBounces | None:
        """``count`` recipients of a message have their outcome (or left
        memory); the bounces held for it once none of its round is left."""
        left = self._round[queue_id] - count
        if left > 0:
            self._round[queue_id] = left
            return None
        self._round.pop(queue_id, None)
        return self._bounces.pop(queue_id, None)

    def _next_state(self, rcpt: DueRecipient, reply: Reply, outcome: Outcome, now: float,
                    some_accepted: bool):
        if outcome.action is Action.DELIVERED:
            return RecipientState.DELIVERED, now, rcpt.attempts + 1, "delivered"
        if outcome.action is Action.BOUNCED:
            return RecipientState.BOUNCED, now, rcpt.attempts + 1, "bounced"
        if reply.code == 452 and reply.enhanced in (None, "4.5.3") and some_accepted:
            # Too many recipients for one transaction (RFC 5321 4.5.3.1.10):
            # the rest go in the next transaction, not after a retry delay.
            # Only when others were taken: a server that refuses every
            # recipient so is deferred like any 4xx, or it would loop.
            return RecipientState.QUEUED, now, rcpt.attempts, "requeued"
        attempts = rcpt.attempts + 1
        next_attempt = self.schedule.next_attempt(attempts, rcpt.received, now)
        if next_attempt is None:
            return RecipientState.BOUNCED, now, attempts, "bounced"
        return RecipientState.DEFERRED, next_attempt, attempts, "deferred"

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

    def _write_events(self, events: list[tuple]) -> None:
        lines = b"".join(
            orjson.dumps(dict(zip(EVENT_COLUMNS, event))) + b"\n" for event in events
        )
        self._event_log.write(lines)
        self._event_log.flush()
        for event in events:
            log.info("%s: to=<%s> relay=%s code=%s %s", event[1], event[2], event[4], event[7], event[10])

    # -- housekeeping ---------------------------------------------------------

    async def _close_idle_connections(self) -> None:
        """Close pooled connections idle too long; give queues whose jobs
        wait behind busy connections another one (deliver.spawn_after)."""
        ticks = 0
        while True:
            await asyncio.sleep(PUMP_INTERVAL)
            for queue in self.queues.values():
                if queue.jobs:
                    self._pump(queue)
            ticks += 1
            if ticks * PUMP_INTERVAL < IDLE_CHECK_INTERVAL:
                continue
            ticks = 0
            timeout = self.settings.deliver.connection_idle_timeout
            now = time.monotonic()
            for queue in self.queues.values():
                keep = []
                for session in queue.idle:
                    if now - session.idle_since > timeout:
                        self._spawn(session.quit())
                    else:
                        keep.append(session)
                queue.idle = keep

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

    async def delete(self, queue_ids: list[str]) -> list[str]:
        """Remove messages from the queue; their ``deleted`` events go to the
        event log like any outcome.  Returns the ids this worker had."""
        found = await self.spool.delete(queue_ids, time.time())
        for queue_id, events in found.items():
            log.info("%s: deleted by the operator, %d recipient(s) not delivered",
                     queue_id, len(events))
            self._write_events(events)
        return sorted(found)

    async def suspend(self, domain: str, suspended: bool) -> None:
        """Hold (or release) a domain's mail in the queue; kept across restarts."""
        domains = set(self.suspended)
        (domains.add if suspended else domains.discard)(domain)
        await self.spool.set_meta("suspended", orjson.dumps(sorted(domains)).decode())
        self.suspended = frozenset(domains)
        self.wake()
