"""The delivery scheduler (pure core, clock injected): which job goes next,
on which connection, and when a connection may open.

Input: jobs routed to their site (``push``), and what the driver saw
happen (``on_opened``, ``on_open_failed``, ``on_sent``, ``on_lost``), each
with ``now``.  Output: actions for the driver to perform (``actions(now)``)
and the time it should look again (``next_wake``).  No sockets, no sleeps,
no clock reads: httpcore's connection pool and h11's state machine decide
without doing, and so does this.

Theory of operation
-------------------
A *site* is a destination (the MX set of a domain, with a TLS mode):
domains sharing MX hosts share its queue, its connections and its limits
(deliver.shaping).  Each site keeps its waiting jobs in order (a message's
recipients at several domains of one site are merged into one
transaction) and its connections, each opening, busy or idle.

``actions`` walks the sites:

* a ``bounce`` effect fails the queued jobs (``Fail``, bounced); a
  ``suspend`` effect holds them: idle connections are closed, and jobs are
  handed back to the spool until the effect ends (``Hold``: no attempt is
  used, and they leave memory);
* idle connections past ``idle_timeout`` are closed;
* while a job waits, an idle connection is free and a message token is due
  (``max_message_rate``), the job is sent (``Send``): a transactional job
  before a bulk one, and within a lane campaigns in turn (deliver.lanes);
* a connection opens (``Open``) when jobs wait that the connections in use
  will not carry soon — more jobs than they carry per connection, or more
  than they finish within ``DRAIN_HORIZON`` (or the time a connection
  takes to open, if longer) at the site's measured transaction time
  (Little's law: a fast receiver behind a busy worker needs few
  connections, a slow one many), or, before any transaction
  was timed, the oldest has waited ``spawn_after``, or a transactional job
  finds every connection busy with bulk mail — within the site's
  connection limit, its adaptive concurrency and ``max_connection_rate``.

Lanes.  ``transactional_share`` of the connections a site allows (at least
one) is kept for transactional mail while some of it waits or is in
flight: bulk mail then runs on the rest.  When the transactional lane is
empty bulk uses every connection (idle capacity is not wasted); the next
transactional job takes the first connection that frees, and from then on
bulk gives the share back as its transactions end.

Queueing receivers.  Each site's window (its adaptive concurrency) also
follows the transaction time against the site's baseline, the fastest
transaction lately, as TCP Vegas follows round trips: at QUEUEING_FACTOR
times the baseline the receiver is queueing what it is sent (more
connections carry no more mail, they only lengthen every message's wait,
a sign-up mail's included), and the window shrinks in proportion, at most
by half per window of transactions; between HOLD_ABOVE and that factor it
holds; below, it grows.  A connection beyond the window stays idle (no
job is sent while the window's worth are busy) and closes at its idle
timeout unless the window grows back.

What the driver reports moves the state: a connection that opened lets
the next job go; one that failed lowers concurrency, counts towards the
site's suspension and, when no other connection of the site is alive,
fails the site's jobs (``Fail``, deferred: the site cannot be reached).
After a transaction, a site-scope failure (a 421, a lost connection) from
a host that answered closes that connection, lowers concurrency, keeps
that host aside for a while, and sends the job in hand to the next MX
host (``RETRY``) once per host; every reply is matched against the rules.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from relay.deliver.lanes import SiteQueue, campaign_of
from relay.deliver.shaping import Concurrency, Effects, Gcra, SiteLimits, limits_for
from relay.model import BULK, TRANSACTIONAL, Reply, Stage

INITIAL_CONCURRENCY = 5  # a new site starts here and grows with successes (Postfix's slow start)
HOP_REST = 30.0  # a host that answered 421 gets no new connection for this long
MAX_RECIPIENTS_PER_TRANSACTION = 100  # RFC 5321 4.5.3.1.8: servers take at least 100
HOLD_IN_MEMORY = 60.0  # a suspension longer than this hands its jobs back to the spool
# Connections are opened so that a site's waiting jobs would be carried
# within about this many seconds at its measured transaction time (a target,
# not a bound), or within the time a connection takes to open if that is
# longer: a connection ready only after the busy ones have drained the queue
# carries nothing (perf/RESULTS.md: 1 s kept a busy site's mail waiting
# 0.3-0.7 s).
DRAIN_HORIZON = 0.1
TIMING_WEIGHT = 0.2  # of the newest transaction in the site's moving average
# A site whose transactions take QUEUEING_FACTOR times its baseline (the
# fastest one lately, never below BASELINE_FLOOR) is queueing them: more
# connections carry no more mail there, they only make every message wait
# longer, transactional ones too.  Its window then shrinks (see on_sent).
QUEUEING_FACTOR = 3.0
BASELINE_FLOOR = 0.05  # seconds: a transaction faster than this is never called slow
BASELINE_DOUBLING = 60.0  # seconds: an unrefreshed baseline doubles in this long
# Between HOLD_ABOVE and 1 of that slowdown the window neither grows nor
# shrinks (TCP Vegas's band): growth stops before the receiver queues.
HOLD_ABOVE = 0.5


# -- actions -----------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    conn: int
    site: tuple  # the site's key: (destination key, TLS mode)
    hops: tuple  # in the order to try (hosts resting after a 421 last)


@dataclass(frozen=True)
class Send:
    conn: int
    job: object
    chunking: bool = False  # the site's [shaping] chunking now (a reload or a rule may change it)


@dataclass(frozen=True)
class Close:
    conn: int


@dataclass(frozen=True)
class Fail:
    """Record these jobs' recipients as failed with this reply (deferred on
    the retry schedule, or bounced when ``bounce``)."""

    jobs: tuple
    reply: Reply
    stage: Stage
    bounce: bool = False


@dataclass(frozen=True)
class Hold:
    """Give these jobs back to the spool, due at ``until``, attempts unchanged."""

    jobs: tuple
    until: float
    reason: str
    site: str = ""
    domains: tuple = ()


# Verdicts of on_sent
RECORD = "record"  # the replies are the jobs' outcome
RETRY = "retry"  # the job went back to the queue for the next MX host
BOUNCE = "bounce"  # a rule says bounce: record the job as bounced


@dataclass
class Connection:
    id: int
    site: "Site"
    state: str = "opening"  # opening | busy | idle | closing (counted until on_closed)
    since: float = 0.0  # when it entered its state
    deliveries: int = 0
    hop: object = None  # the host it reached
    lane: str | None = None  # the lane of the job it carries (busy)


def _moving_average(average: float | None, sample: float) -> float:
    """TIMING_WEIGHT of the newest sample; the first sample alone."""
    return sample if average is None else (1 - TIMING_WEIGHT) * average + TIMING_WEIGHT * sample


@dataclass
class Site:
    key: tuple
    name: str
    destination: object  # deliver.resolve.Destination: its hops
    domains: set = field(default_factory=set)
    limits: SiteLimits | None = None  # None: to be computed (domains or settings changed)
    limits_overrides: dict | None = None  # the effects' overrides the limits were computed with
    concurrency: Concurrency | None = None
    jobs: SiteQueue = field(default_factory=SiteQueue)
    waiting: dict = field(default_factory=dict)  # queue id -> job not started (to merge into)
    connections: dict = field(default_factory=dict)  # id -> Connection
    messages: Gcra = field(default_factory=lambda: Gcra(None))
    opens: Gcra = field(default_factory=lambda: Gcra(None))
    failures: int = 0  # failed opens in a row
    # Transactions per connection the receiver was seen to allow (it said 421
    # at MAIL on a connection after that many): connections close there.
    learned_deliveries: int | None = None
    resting: dict = field(default_factory=dict)  # host -> until (after a 421)
    transaction_time: float | None = None  # seconds per transaction, moving average
    open_time: float | None = None  # seconds from Open to a ready connection, moving average
    fastest: float | None = None  # the fastest transaction lately, and when
    fastest_at: float = 0.0

    def count(self, state: str) -> int:
        return sum(1 for c in self.connections.values() if c.state == state)

    def busy_with(self, lane: str) -> int:
        return sum(1 for c in self.connections.values() if c.state == "busy" and c.lane == lane)

    def time_open(self, took: float) -> None:
        self.open_time = _moving_average(self.open_time, took)

    def time_transaction(self, took: float, now: float) -> None:
        self.transaction_time = _moving_average(self.transaction_time, took)
        baseline = self.baseline(now)
        if baseline is None or took <= baseline:
            self.fastest, self.fastest_at = took, now

    def baseline(self, now: float) -> float | None:
        """The fastest transaction lately: it ages (doubles per
        BASELINE_DOUBLING) so a receiver that became slower for good is
        measured against its new pace within minutes."""
        if self.fastest is None:
            return None
        return self.fastest * 2 ** (max(now - self.fastest_at, 0.0) / BASELINE_DOUBLING)

    def slowdown(self, now: float) -> float:
        """How many times slower than it should be the site's transactions
        are (above 1: queueing; 0 before any is timed)."""
        baseline = self.baseline(now)
        if baseline is None or self.transaction_time is None:
            return 0.0
        return self.transaction_time / (QUEUEING_FACTOR * max(baseline, BASELINE_FLOOR))

    def allowed(self) -> int:
        """Connections the site may have now (its limit, its concurrency)."""
        return min(self.limits.connection_limit, self.concurrency.allowed)

    def bulk_allowed(self) -> int:
        """Connections bulk mail may have now: all of them unless
        transactional mail waits or is in flight (see the top)."""
        allowed = self.allowed()
        share = self.limits.transactional_share
        if not share or not (self.jobs.count(TRANSACTIONAL) or self.busy_with(TRANSACTIONAL)):
            return allowed
        return max(0, allowed - max(1, round(share * allowed)))

    def status(self, now: float) -> dict:
        limits = self.limits
        return {
            "site": self.name, "domains": sorted(self.domains),
            "connection_limit": limits.connection_limit,
            "concurrency": self.concurrency.allowed,
            "max_message_rate": _rate_text(limits.max_message_rate),
            "max_connection_rate": _rate_text(limits.max_connection_rate),
            "max_deliveries_per_connection": limits.max_deliveries_per_connection,
            "learned_deliveries_per_connection": self.learned_deliveries,
            "connections": len(self.connections), "queued": sum(len(j.recipients) for j in self.jobs),
            "transactional_share": limits.transactional_share,
            "chunking": limits.chunking,
            "queued_bulk": sum(len(j.recipients) for j in self.jobs.lanes[BULK]),
            "busy_bulk": self.busy_with(BULK),
        }


def _rate_text(interval: float | None) -> str:
    if interval is None:
        return ""
    per_second = 1 / interval
    return f"{per_second:g}/s" if per_second >= 1 else f"{per_second * 60:g}/min"


class Scheduler:
    def __init__(self, shaping, workers: int, effects: Effects, *, idle_timeout: float,
                 spawn_after: float, max_sessions: int = 1000,
                 max_bytes_in_flight: int = 256 * 1024**2,
                 spread: frozenset[str] = frozenset(), host_workers: int = 1) -> None:
        self.shaping = shaping  # config.ShapingSettings
        self.workers = workers
        self.spread = spread  # [relay] spread_domains, sent by each of host_workers
        self.host_workers = host_workers
        self.effects = effects
        self.idle_timeout = idle_timeout
        self.spawn_after = spawn_after
        self.sites: dict[tuple, Site] = {}
        self._by_name: dict[str, Site] = {}
        self._conns: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._wake: float | None = None
        self._pending_close: list[int] = []  # connections done with: closed by the next actions()
        # Per worker, whatever the sites allow: outbound sessions, and body
        # bytes of transactions in flight (one message is always let through).
        self.max_sessions = max_sessions
        self.max_bytes_in_flight = max_bytes_in_flight
        self.bytes_in_flight = 0
        self._in_flight: dict[int, int] = {}  # connection -> bytes of its job

    # -- configuration ----------------------------------------------------------

    def apply(self, shaping, idle_timeout: float, spawn_after: float, now: float,
              max_sessions: int | None = None, max_bytes_in_flight: int | None = None) -> None:
        """Reloaded settings: every site's limits are computed again."""
        self.shaping, self.idle_timeout, self.spawn_after = shaping, idle_timeout, spawn_after
        self.max_sessions = max_sessions or self.max_sessions
        self.max_bytes_in_flight = max_bytes_in_flight or self.max_bytes_in_flight
        for site in self.sites.values():
            site.limits = None
            self._refresh(site, now)

    def _refresh(self, site: Site, now: float) -> None:
        overrides = self.effects.overrides(site.name, now)
        if site.limits is not None and overrides == site.limits_overrides:
            return  # the usual case, on every actions() call: nothing changed
        site.limits_overrides = overrides
        mx_hosts = [host.split(":")[0] for host in site.destination.key]
        limits = limits_for(self.shaping, site.domains, mx_hosts, self.workers, overrides,
                            spread=self.spread, host_workers=self.host_workers)
        if limits == site.limits:
            return
        site.limits = limits
        if site.concurrency is None:
            site.concurrency = Concurrency(limits.connection_limit)
            site.concurrency.value = float(min(limits.connection_limit, INITIAL_CONCURRENCY))
        else:
            site.concurrency.set_limit(limits.connection_limit)
        site.messages.interval = limits.max_message_rate
        site.opens.interval = limits.max_connection_rate

    # -- input ----------------------------------------------------------------

    def push(self, key: tuple, destination, domain: str, job, now: float, front: bool = False) -> Site:
        """A job (one message's recipients at one domain) for a site."""
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = Site(key, destination.name, destination)
            self._by_name[site.name] = site
        site.destination = destination  # the freshest answer
        if domain not in site.domains:
            site.domains.add(domain)
            site.limits = None
        if site.limits is None:
            self._refresh(site, now)
        job.queued = job.queued or now
        same = site.waiting.get(job.queue_id)
        if (same is not None and not front
                and len(same.recipients) + len(job.recipients) <= MAX_RECIPIENTS_PER_TRANSACTION):
            same.recipients.extend(job.recipients)
            same.trace = same.trace or job.trace
            return site
        site.jobs.push(job, front)
        site.waiting.setdefault(job.queue_id, job)
        return site

    def on_opened(self, conn_id: int, hop, now: float) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        conn.site.time_open(max(now - conn.since, 0.0))
        conn.state, conn.since, conn.hop = "idle", now, hop
        conn.site.failures = 0
        self.effects.on_connected(conn.site.name)

    def on_open_failed(self, conn_id: int, reply: Reply, stage: Stage, now: float) -> list:
        """No host of the site took a connection; returns actions (Fail)."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return []
        site = conn.site
        del site.connections[conn_id]
        site.concurrency.decrease()
        self.effects.on_reply(site.name, reply, now)
        # A site whose other connections work is busy, not failing: only
        # failures with nothing else open count towards its suspension.
        if not any(c.state in ("busy", "idle") for c in site.connections.values()):
            site.failures += 1
            self.effects.on_connection_failures(site.name, site.failures,
                                                site.limits.consecutive_connection_failures,
                                                str(reply), now)
        if site.connections or self.effects.held_until(site.name, now) is not None:
            return []  # other connections carry the jobs, or a suspension holds them
        jobs = self._take_jobs(site)
        return [Fail(tuple(jobs), reply, stage)] if jobs else []

    def on_sent(self, conn_id: int, job, now: float, replies: list[Reply],
                delivered: bool, site_failure: Reply | None) -> str:
        """A transaction ended; returns RECORD, RETRY or BOUNCE (see top)."""
        self._release_bytes(conn_id)
        conn = self._conns.get(conn_id)
        site = conn.site if conn is not None else None
        if conn is None:
            return RECORD
        fired = None
        for reply in replies:
            fired = self.effects.on_reply(site.name, reply, now) or fired
        conn.deliveries += 1
        if site_failure is None and conn.state == "busy":
            site.time_transaction(max(now - conn.since, 0.0), now)
        if site_failure is not None:
            self._drop(conn)
            site.concurrency.decrease()
            host = conn.hop.host if conn.hop is not None else None
            if site_failure.code != 0 and host is not None:
                site.resting[host] = now + HOP_REST
            tried = getattr(job, "hosts_tried", None)
            if tried is None:
                tried = job.hosts_tried = set()
            if host is not None:
                tried.add(host)
            others = {hop.host for hop in site.destination.hops} - tried
            if others and (fired is None or fired.kind != "bounce"):
                self.push(site.key, site.destination, job.domain, job, now, front=True)
                return RETRY
        else:
            if delivered:
                slowdown = site.slowdown(now)
                if slowdown > 1.0:
                    site.concurrency.ease(slowdown)
                elif slowdown < HOLD_ABOVE:
                    site.concurrency.increase()
                site.failures = 0
            if conn.deliveries >= self.deliveries_per_connection(site):
                conn.state = "closing"
                self._pending_close.append(conn.id)
            else:
                conn.state, conn.since = "idle", now
        conn.lane = None
        if fired is not None and fired.kind == "bounce":
            return BOUNCE
        return RECORD

    def deliveries_per_connection(self, site: Site) -> int:
        learned = site.learned_deliveries
        configured = site.limits.max_deliveries_per_connection
        return configured if learned is None else min(configured, learned)

    def on_connection_full(self, conn_id: int, job, now: float) -> None:
        """The receiver closed a connection with a 421 at MAIL after it had
        taken messages on it: its limit per connection, not trouble.  The
        job was not tried and goes first again on a fresh connection; later
        connections of the site close before that limit (no 421 again)."""
        conn = self._conns.get(conn_id)
        self._release_bytes(conn_id)
        if conn is not None:
            site = conn.site
            taken = max(conn.deliveries, 1)
            if site.learned_deliveries is None or taken < site.learned_deliveries:
                site.learned_deliveries = taken
            self._drop(conn)
        self.push(job.site_key, job.destination, job.domain, job, now, front=True)

    def on_not_sent(self, conn_id: int, job, now: float) -> None:
        """A Send found its connection dead before anything was sent: the
        job goes first again, on another connection."""
        self._release_bytes(conn_id)
        self.on_lost(conn_id)
        self.push(job.site_key, job.destination, job.domain, job, now, front=True)

    def _release_bytes(self, conn_id: int) -> None:
        self.bytes_in_flight -= self._in_flight.pop(conn_id, 0)

    def on_closed(self, conn_id: int) -> None:
        """A Close is done: the receiver no longer sees the connection."""
        self.on_lost(conn_id)

    def on_lost(self, conn_id: int) -> None:
        """A connection the server closed (or one the driver dropped)."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        self._conns.pop(conn.id, None)
        conn.site.connections.pop(conn.id, None)

    # -- decisions --------------------------------------------------------------

    def actions(self, now: float) -> list:
        out: list = [Close(conn) for conn in self._pending_close]
        self._pending_close = []
        # Expired effects end here even for sites that have left (no jobs, no
        # connections): otherwise their past expiry would be the next wake.
        self.effects.all(now)
        wake = [self.effects.next_expiry()]
        for site in list(self.sites.values()):
            self._refresh(site, now)
            wake.append(self._site_actions(site, now, out))
            if not site.jobs and not site.connections:
                del self.sites[site.key]
                self._by_name.pop(site.name, None)
        self._wake = min((w for w in wake if w is not None), default=None)
        return out

    def _site_actions(self, site: Site, now: float, out: list) -> float | None:
        wake = []
        bounce = self.effects.bouncing(site.name, now)
        if bounce is not None and site.jobs:
            out.append(Fail(tuple(self._take_jobs(site)),
                            Reply(550, "5.7.1", f"bounced by shaping: {bounce.reason}"[:400], None),
                            Stage.LOCAL, bounce=True))
        held = self.effects.held_until(site.name, now)
        for conn in list(site.connections.values()):
            if conn.state != "idle":
                continue
            if held is not None or now - conn.since >= self.idle_timeout:
                # Still counted until the driver says it is closed: a QUIT
                # in flight is a connection the receiver still sees.
                conn.state = "closing"
                out.append(Close(conn.id))
            else:
                wake.append(conn.since + self.idle_timeout)
        if held is not None:
            if site.jobs and held - now > HOLD_IN_MEMORY:
                out.append(Hold(tuple(self._take_jobs(site)), held,
                                "; ".join(e.reason for e in self.effects.active(site.name, now)
                                          if e.kind == "suspend"),
                                site.name, tuple(sorted(site.domains))))
            wake.append(held)
            return min(wake)
        if not site.jobs:
            return min(wake) if wake else None
        # Send on idle connections while message tokens are due.
        idle = sorted((c for c in site.connections.values() if c.state == "idle"),
                      key=lambda c: -c.since)  # the most recently used first: keeps it warm
        busy = site.count("busy")
        while site.jobs and idle and busy < site.allowed():
            lane = self._next_lane(site)
            if lane is None:
                break  # only bulk waits, and it has its connections: these are kept
            due = site.messages.due(now)
            if due > now:
                wake.append(due)
                break
            size = getattr(site.jobs.peek(lane), "size", 0)
            if self.bytes_in_flight and self.bytes_in_flight + size > self.max_bytes_in_flight:
                break  # a transaction that ends frees room (on_sent)
            conn = idle.pop(0)
            job = site.jobs.pop(lane)
            conn.lane = lane
            self.bytes_in_flight += size
            self._in_flight[conn.id] = size
            if site.waiting.get(job.queue_id) is job:
                del site.waiting[job.queue_id]
            site.messages.take(now)
            conn.state, conn.since = "busy", now
            busy += 1
            out.append(Send(conn.id, job, site.limits.chunking))
        # Open more connections for work the others will not carry soon.
        while site.jobs and self._wants_connection(site, now, wake):
            due = site.opens.due(now)
            if due > now:
                wake.append(due)
                break
            site.opens.take(now)
            conn = Connection(next(self._ids), site, "opening", now)
            self._conns[conn.id] = conn
            site.connections[conn.id] = conn
            out.append(Open(conn.id, site.key, self._hop_order(site, now)))
        return min(wake) if wake else None

    def _next_lane(self, site: Site) -> str | None:
        """The lane a free connection serves: transactional first; bulk
        within its connections (Site.bulk_allowed)."""
        if site.jobs.count(TRANSACTIONAL):
            return TRANSACTIONAL
        if site.jobs.count(BULK) and site.busy_with(BULK) < site.bulk_allowed():
            return BULK
        return None

    def _wants_connection(self, site: Site, now: float, wake: list) -> bool:
        if len(self._conns) >= self.max_sessions:
            return False
        if len(site.connections) >= site.allowed():
            return False
        if any(c.state == "idle" for c in site.connections.values()):
            return False  # waiting for a message token (or kept for transactional mail)
        opening = site.count("opening")
        transactional = site.jobs.count(TRANSACTIONAL)
        if transactional > opening and site.busy_with(TRANSACTIONAL) < site.count("busy"):
            return True  # bulk holds the connections: a sign-up mail does not wait for them
        lanes = (TRANSACTIONAL, BULK)
        if not transactional:
            if site.busy_with(BULK) + opening >= site.bulk_allowed():
                return False  # the rest is kept for transactional mail
            lanes = (BULK,)
        waiting = sum(site.jobs.count(lane) for lane in lanes)
        working = site.count("busy") + opening
        if working == 0:
            return True
        # Jobs beyond what the running connections carry, or a slow receiver:
        # the oldest job has waited spawn_after (at most one opening per job).
        if working * site.limits.max_deliveries_per_connection < waiting:
            return True
        if opening >= waiting:
            return False
        if site.transaction_time is not None:
            horizon = max(DRAIN_HORIZON, site.open_time or 0.0)
            return working < math.ceil(waiting * site.transaction_time / horizon)
        ready_at = site.jobs.oldest(lanes) + self.spawn_after
        if now >= ready_at:
            return True
        wake.append(ready_at)
        return False

    def _hop_order(self, site: Site, now: float) -> tuple:
        hops = site.destination.hops
        resting = {host for host, until in site.resting.items() if until > now}
        site.resting = {h: u for h, u in site.resting.items() if u > now}
        return tuple(h for h in hops if h.host not in resting) + tuple(h for h in hops if h.host in resting)

    def _take_jobs(self, site: Site) -> list:
        jobs = site.jobs.clear()
        site.waiting.clear()
        return jobs

    def take_campaign(self, campaign: str) -> list:
        """Every job of a campaign not started (it is paused or cancelled)."""
        taken = []
        for site in self.sites.values():
            jobs = site.jobs.take(lambda job: campaign_of(job) != campaign)
            for job in jobs:
                if site.waiting.get(job.queue_id) is job:
                    del site.waiting[job.queue_id]
            taken += jobs
        return taken

    def next_wake(self) -> float | None:
        """When ``actions`` has something to do with no new input."""
        return self._wake

    # -- the driver's questions ---------------------------------------------------

    def take_domain(self, domain: str) -> list:
        """Every job not started at the sites that serve ``domain`` (the
        operator suspends it; jobs of the sites' other domains are pushed
        back)."""
        return [job for site in self.sites.values() if domain in site.domains
                for job in self._take_jobs(site)]

    def take_all(self) -> list:
        """Every job not started (the worker stops)."""
        return [job for site in self.sites.values() for job in self._take_jobs(site)]

    def connection_count(self) -> int:
        return len(self._conns)

    def busiest(self, count: int) -> list[tuple[str, int]]:
        load = [(site.name, len(site.jobs) + site.count("busy")) for site in self.sites.values()]
        return sorted((item for item in load if item[1]), key=lambda item: -item[1])[:count]

    def site_status(self, now: float) -> list[dict]:
        return [site.status(now) for site in self.sites.values()]

    def pending_jobs(self) -> int:
        return sum(len(site.jobs) for site in self.sites.values())

