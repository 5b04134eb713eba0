"""The stats ring: every worker's figures in shared memory, read without locks.

Input: each worker's local counters, gauges and latency samples.  Output:
a fixed-layout file in /dev/shm (``ring_path``), one region per worker,
that ``relayctl stats`` and ``/metrics`` read and merge without asking any
worker.

Theory of operation.  The supervisor creates the file.  Each region has a
single writer, its worker, which counts in plain Python objects and
publishes every ~250 ms: it makes the region's sequence number odd,
writes the values, and makes it even again.  A reader copies the region
and accepts the copy only if the sequence number was even and unchanged
across the copy (a seqlock), so it never sees a torn write and never
blocks the writer.  A restarted worker starts from the totals its region
already holds, so totals survive a restart.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import time
from dataclasses import dataclass

MAGIC = b"RELAYST3"  # 2: lanes and campaigns; 3: claimed_at_intake
HEADER = struct.Struct("<8sII")  # magic, workers, region size
HEADER_SIZE = 64

COUNTERS = (
    "connections",
    "accepted_messages",
    "accepted_recipients",
    "accepted_bytes",
    "rejected_relay",
    "rejected_data",
    "rejected_spool",
    "rejected_low_disk",
    "rejected_connection_limit",
    "rejected_auth",
    "rejected_auth_lockout",
    "rejected_too_many_recipients",
    "rejected_slow_data",
    "rejected_memory",
    "delivered",
    "deferred",
    "bounced",
    "dropped",
    "requeued",
    "deferred_connection",
    "deferred_recipient",
    "deferred_technical",
    "deferred_unknown",
    "bounced_connection",
    "bounced_recipient",
    "bounced_technical",
    "bounced_unknown",
    "dsn_queued",
    "claimed_at_intake",  # recipients the dispatcher took as they were stored (no claim, no body read)
    "connections_out",
    "effects_throttle",
    "effects_suspend",
    "effects_bounce",
    "amqp_consumed",  # messages taken from AMQP queues
    "amqp_acked",  # ... and acked: spooled, or published to failure.technical
    "amqp_nacked",  # ... handed back to the broker (spool failure, owner down)
    "amqp_failed",  # bad input published to <queue>.failure.technical
    "amqp_duplicates",  # redeliveries of messages already spooled, acked
    "cluster_published",  # parts for other hosts confirmed in their shard queue
    "cluster_publish_failed",  # ... not confirmed (the transaction got 451 or a nack)
    "cluster_consumed",  # parts from this host's shard queue stored and acked
    "cluster_duplicates",  # redelivered parts already stored here, acked
    "cluster_nacked",  # parts handed back to the shard queue (a spool or owner failure)
    "cluster_bad",  # shard messages that did not decode, set aside in relay.shard.<i>.bad
    "feed_published",  # events the feeds published (confirmed by the broker)
    "feed_errors",  # failed publishes (retried: the cursor waits)
    # Per lane (the message's class): recipients accepted, and outcomes.
    "accepted_transactional",
    "accepted_bulk",
    "delivered_transactional",
    "delivered_bulk",
    "deferred_transactional",
    "deferred_bulk",
    "bounced_transactional",
    "bounced_bulk",
)
GAUGES = (
    "ready",  # recipients loaded for delivery
    "deferred_queue",  # recipients waiting for a retry (counted every few seconds)
    "held",  # parts of multi-owner transactions not yet released
    "inbound_connections",
    "outbound_connections",
    "rss_bytes",
    "cpu_user",
    "cpu_system",
    "open_fds",
    "uptime",
    "gc_seconds",
    "pid",
    "restarts",
    "feed_lag_events",  # events not yet confirmed by the [amqp.events] exchange
    "feed_lag_failures",  # events not yet through the PostmanQ failure feed
    "feed_lag_webhooks",  # events not yet accepted by every [[webhook]] (summed)
    "amqp_connected",  # [[amqp.consumer]] connections up (one per consumer and worker)
    "amqp_unacked",  # AMQP messages being taken (consumed, not yet settled)
    "cluster_connected",  # workers connected to the cluster's broker
    "cluster_queue_depth",  # messages in this host's shard queue (read every 5 s)
)
HISTOGRAMS = ("data_to_250", "accept_to_delivered", "accept_to_delivered_transactional",
              "accept_to_delivered_bulk")
# Upper bounds in seconds; the last bucket takes everything above.
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
           60.0, 300.0, 1800.0, 3600.0, float("inf"))
TOP = 5  # busiest destinations kept per worker
NAME_SIZE = 64
# Campaigns: the busiest per worker by name, the rest summed (bounded cardinality
# for /metrics).  Counted since the worker started.
CAMPAIGN_TOP = 8
CAMPAIGN_OUTCOMES = ("delivered", "deferred", "bounced", "dropped")

_SEQ = struct.Struct("<QQ")  # sequence, publish time in microseconds
_VALUES = struct.Struct(
    f"<{len(COUNTERS)}Q{len(GAUGES)}d{len(HISTOGRAMS) * (len(BUCKETS) + 1)}d"
    + f"{NAME_SIZE}sQ" * TOP
    + f"{NAME_SIZE}s{len(CAMPAIGN_OUTCOMES)}Q" * CAMPAIGN_TOP + f"{len(CAMPAIGN_OUTCOMES)}Q"
)
REGION_SIZE = 4096
assert _SEQ.size + _VALUES.size <= REGION_SIZE


def ring_path(run_dir: str) -> str:
    """Where the ring of the relay using ``run_dir`` lives (one per relay)."""
    key = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
    base = "/dev/shm" if os.path.isdir("/dev/shm") else run_dir
    return os.path.join(base, f"relay-stats-{key}")


@dataclass
class Snapshot:
    """One worker's published figures."""

    worker: int
    published: float
    counters: dict[str, int]
    gauges: dict[str, float]
    histograms: dict[str, tuple[list[int], float]]  # name -> (bucket counts, sum of seconds)
    top: list[tuple[str, int]]
    campaigns: list[tuple[str, dict]] = ()  # (name, {outcome: count}), busiest first
    campaigns_rest: dict | None = None  # the others, summed


def busiest_campaigns(counts: dict[str, dict], n: int = CAMPAIGN_TOP) -> tuple[list, dict]:
    """The ``n`` campaigns with the most outcomes, and the rest summed."""
    ranked = sorted(counts.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    rest = dict.fromkeys(CAMPAIGN_OUTCOMES, 0)
    for _, outcomes in ranked[n:]:
        for outcome in CAMPAIGN_OUTCOMES:
            rest[outcome] += outcomes.get(outcome, 0)
    return ([(name, {o: outcomes.get(o, 0) for o in CAMPAIGN_OUTCOMES}) for name, outcomes in ranked[:n]],
            rest)


def create(run_dir: str, workers: int) -> str:
    """Supervisor: a zeroed ring for ``workers`` regions."""
    path = ring_path(run_dir)
    size = HEADER_SIZE + workers * REGION_SIZE
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "wb") as file:
        file.write(HEADER.pack(MAGIC, workers, REGION_SIZE).ljust(HEADER_SIZE, b"\0"))
        file.truncate(size)
    os.replace(tmp, path)
    return path


def remove(run_dir: str) -> None:
    try:
        os.unlink(ring_path(run_dir))
    except FileNotFoundError:
        pass


def _map(path: str, write: bool) -> mmap.mmap:
    with open(path, "r+b" if write else "rb") as file:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_READ)


class Writer:
    """A worker's view of its own region."""

    def __init__(self, path: str, worker: int) -> None:
        self._map = _map(path, write=True)
        magic, workers, region = HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or worker >= workers or region != REGION_SIZE:
            raise ValueError(f"{path} is not a stats ring for worker {worker}")
        self._offset = HEADER_SIZE + worker * REGION_SIZE
        # The predecessor is dead: take its last values whatever the sequence
        # number says (it may have died half way through a publication, and
        # then the counters are at worst one publication old).
        previous = _unpack(self._map, self._offset, worker)
        self._seq = _SEQ.unpack_from(self._map, self._offset)[0] & ~1
        # A restarted worker goes on from what its predecessor published.
        self.base = previous.counters if previous else dict.fromkeys(COUNTERS, 0)
        self.base_histograms = previous.histograms if previous else {}
        self.restarts = int(previous.gauges.get("restarts", 0)) + 1 if previous and previous.published else 0

    def publish(self, counters: dict[str, int], gauges: dict[str, float],
                histograms: dict[str, tuple[list[int], float]], top: list[tuple[str, int]],
                campaigns: dict[str, dict] | None = None) -> None:
        gauges = {**gauges, "restarts": self.restarts}
        values = [self.base.get(name, 0) + counters.get(name, 0) for name in COUNTERS]
        values += [float(gauges.get(name, 0.0)) for name in GAUGES]
        for name in HISTOGRAMS:
            buckets, total = histograms.get(name, ([0] * len(BUCKETS), 0.0))
            base_buckets, base_total = self.base_histograms.get(name, ([0] * len(BUCKETS), 0.0))
            values += [float(a + b) for a, b in zip(buckets, base_buckets)] + [total + base_total]
        padded = (top + [("", 0)] * TOP)[:TOP]
        for name, count in padded:
            values += [name.encode()[:NAME_SIZE], count]
        busiest, rest = busiest_campaigns(campaigns or {})
        empty = ("", dict.fromkeys(CAMPAIGN_OUTCOMES, 0))
        for name, outcomes in (busiest + [empty] * CAMPAIGN_TOP)[:CAMPAIGN_TOP]:
            values += [name.encode()[:NAME_SIZE], *(outcomes[o] for o in CAMPAIGN_OUTCOMES)]
        values += [rest[o] for o in CAMPAIGN_OUTCOMES]
        self._seq += 1  # odd: a write is under way
        _SEQ.pack_into(self._map, self._offset, self._seq, 0)
        _VALUES.pack_into(self._map, self._offset + _SEQ.size, *values)
        self._seq += 1  # even again: the region is whole
        _SEQ.pack_into(self._map, self._offset, self._seq, int(time.time() * 1e6))

    def close(self) -> None:
        self._map.close()


def _read_region(buffer, offset: int, worker: int, tries: int = 50) -> Snapshot | None:
    """A consistent copy of a region; None if it never published, or if
    no consistent copy could be had (a writer that died mid-publication)."""
    for attempt in range(tries):
        seq, published = _SEQ.unpack_from(buffer, offset)
        if not seq & 1:
            raw = bytes(buffer[offset + _SEQ.size: offset + _SEQ.size + _VALUES.size])
            if _SEQ.unpack_from(buffer, offset)[0] == seq:  # not torn
                return None if seq == 0 else _snapshot(worker, published, raw)
        time.sleep(0.0002 * (attempt + 1))  # let the writer finish (it may be descheduled)
    return None


def _unpack(buffer, offset: int, worker: int) -> Snapshot | None:
    seq, published = _SEQ.unpack_from(buffer, offset)
    if seq == 0:
        return None
    return _snapshot(worker, published, bytes(buffer[offset + _SEQ.size: offset + _SEQ.size + _VALUES.size]))


def _snapshot(worker: int, published: int, raw: bytes) -> Snapshot:
    values = _VALUES.unpack(raw)
    n, g = len(COUNTERS), len(GAUGES)
    counters = dict(zip(COUNTERS, values[:n]))
    gauges = dict(zip(GAUGES, values[n:n + g]))
    histograms, at = {}, n + g
    for name in HISTOGRAMS:
        buckets = [int(v) for v in values[at:at + len(BUCKETS)]]
        histograms[name] = (buckets, values[at + len(BUCKETS)])
        at += len(BUCKETS) + 1
    top = []
    for _ in range(TOP):
        name, count = values[at].rstrip(b"\0").decode(errors="replace"), values[at + 1]
        if name:
            top.append((name, count))
        at += 2
    width = len(CAMPAIGN_OUTCOMES)
    campaigns = []
    for _ in range(CAMPAIGN_TOP):
        name = values[at].rstrip(b"\0").decode(errors="replace")
        if name:
            campaigns.append((name, dict(zip(CAMPAIGN_OUTCOMES, values[at + 1:at + 1 + width]))))
        at += 1 + width
    rest = dict(zip(CAMPAIGN_OUTCOMES, values[at:at + width]))
    return Snapshot(worker, published / 1e6, counters, gauges, histograms, top, campaigns, rest)


class Reader:
    """Reads a ring again and again through one mapping (a dashboard polling
    it many times a second pays for the open and mmap once)."""

    def __init__(self, path: str) -> None:
        self._map = _map(path, write=False)
        magic, self.workers, region = HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or region != REGION_SIZE:
            self._map.close()
            raise ValueError(f"{path} is not a stats ring")

    def read(self) -> list[Snapshot]:
        """Every worker's latest snapshot (workers that never published are left out)."""
        snapshots = [_read_region(self._map, HEADER_SIZE + i * REGION_SIZE, i)
                     for i in range(self.workers)]
        return [s for s in snapshots if s is not None]

    def close(self) -> None:
        self._map.close()


def read(path: str) -> list[Snapshot]:
    """Every worker's latest snapshot, in one go."""
    reader = Reader(path)
    try:
        return reader.read()
    finally:
        reader.close()


def merge(snapshots: list[Snapshot]) -> dict:
    """Totals over workers: counters and gauges summed (uptime: the oldest),
    histograms added bucket by bucket, busiest destinations combined."""
    counters = dict.fromkeys(COUNTERS, 0)
    gauges = dict.fromkeys(GAUGES, 0.0)
    histograms = {name: ([0] * len(BUCKETS), 0.0) for name in HISTOGRAMS}
    top: dict[str, int] = {}
    campaigns: dict[str, dict] = {}
    rest = dict.fromkeys(CAMPAIGN_OUTCOMES, 0)
    for snap in snapshots:
        for name, outcomes in snap.campaigns:
            into = campaigns.setdefault(name, dict.fromkeys(CAMPAIGN_OUTCOMES, 0))
            for outcome, count in outcomes.items():
                into[outcome] += count
        for outcome, count in (snap.campaigns_rest or {}).items():
            rest[outcome] += count
        for name, value in snap.counters.items():
            counters[name] += value
        for name, value in snap.gauges.items():
            gauges[name] = max(gauges[name], value) if name == "uptime" else gauges[name] + value
        for name, (buckets, total) in snap.histograms.items():
            merged, merged_total = histograms[name]
            histograms[name] = ([a + b for a, b in zip(merged, buckets)], merged_total + total)
        for name, count in snap.top:
            top[name] = top.get(name, 0) + count
    gauges.pop("pid", None)
    busiest, others = busiest_campaigns(campaigns)
    return {
        "workers": len(snapshots),
        "counters": counters,
        "gauges": gauges,
        "histograms": {
            name: {"buckets": list(BUCKETS), "counts": buckets, "sum": total,
                   "p50": quantile(buckets, 0.5), "p99": quantile(buckets, 0.99)}
            for name, (buckets, total) in histograms.items()
        },
        "top_destinations": sorted(top.items(), key=lambda item: -item[1])[:TOP],
        "campaigns": [{"name": name, **outcomes} for name, outcomes in busiest],
        "campaigns_other": {o: rest[o] + others[o] for o in CAMPAIGN_OUTCOMES},
    }


def quantile(buckets: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None: no samples)."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for bound, count in zip(BUCKETS, buckets):
        seen += count
        if seen >= rank:
            return bound
    return BUCKETS[-1]


class Histogram:
    """A worker-local latency histogram (seconds)."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                return

    def value(self) -> tuple[list[int], float]:
        return list(self.buckets), self.total
