"""Traffic shaping (pure, clock injected): what each site may take, and how
it reacts to what a receiver says.

Input: the ``[shaping]`` settings (config.ShapingSettings), a site (its
name, the domains it serves and its MX host names), the worker count, and
the times and replies the scheduler reports.  Output: a ``SiteLimits`` per
site, rate buckets, the effects in force (throttle, suspend, bounce; each a
value with an id, a reason and an expiry) and the rules that fire.  No
clock is read here: every call takes ``now`` (wall-clock seconds, the same
clock the spool's retry times use, so effects survive a restart).

Theory of operation
-------------------
Limits: ``[shaping.default]`` for every site, then each ``[shaping."mx:
SUFFIX"]`` whose suffix ends one of the site's MX hosts, then
``[shaping."DOMAIN"]`` for the site's domains (KumoMTA's shaping.toml,
merged key by key, most specific last).  A limit is for the whole relay.
A domain lives in exactly one worker, so limits set for a domain are that
worker's to enforce whole, except a domain in ``[relay] spread_domains``:
every worker of its host sends its mail, so its own limits are split
between them as a site's are.  Limits from the default or an MX suffix belong
to the site, which domains of every worker may share: each worker takes
1/N of it (rounded down, at least 1 connection), so the sum never exceeds
it with no coordination (DESIGN.md, Traffic shaping).

Rates are GCRA token buckets with no burst: a site limited to 20/s gets
a message every 50 ms, and the scheduler sleeps until the next token is
due instead of polling.

Effects change a site for a while: ``throttle`` overrides limits, ``suspend``
holds its mail (not an attempt: the mail goes when the effect ends),
``bounce`` fails its queued mail.  They come from rules, from repeated
connection failures, or from an operator, and can all be cancelled.

Adaptive concurrency: a new site starts at a few connections and gains one
per delivered transaction (slow start) up to its limit; a refused or
timed-out connection, or a 421 before a transaction, halves it (not below
1), and from then on it grows by one connection per ten windows of
successes, so a receiver is rarely probed past what it refused.  ``consecutive_connection_failures`` failed opens in a row suspend
the site for a hold that doubles on repeat (1 min, 2 min, ... 1 h).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from dataclasses import dataclass, field

from relay.model import Reply

FAILURE_HOLD_FIRST = 60.0
FAILURE_HOLD_MAX = 3600.0
PROBE_AFTER = 10  # see Concurrency.increase
ID_STEP = 256  # effect ids: n * 256 + worker (workers <= 256)


@dataclass(frozen=True)
class SiteLimits:
    connection_limit: int
    max_message_rate: float | None  # seconds between messages; None = unlimited
    max_connection_rate: float | None  # seconds between new connections
    max_deliveries_per_connection: int
    consecutive_connection_failures: int
    transactional_share: float = 0.0  # of the connections, kept for transactional mail
    chunking: bool = False  # BDAT where offered (deliver.session)


def rate_interval(value) -> float | None:
    """Seconds per token from a parsed rate (count, period) or None."""
    if value is None:
        return None
    count, period = value
    return period / count


def limits_for(settings, site_domains, mx_hosts, workers: int, overrides: dict | None = None,
               *, spread: frozenset[str] = frozenset(), host_workers: int = 1) -> SiteLimits:
    """The limits this worker enforces for a site (see the module docstring).

    ``settings``: config.ShapingSettings; ``overrides``: keys an effect sets;
    ``workers``: every worker that may send to the site; ``host_workers``:
    this host's, which share a spread domain's own limits."""
    shared = dict(settings.default)
    for suffix, values in settings.mx_suffixes:
        if any(host == suffix.lstrip(".") or host.endswith(suffix if suffix.startswith(".") else "." + suffix)
               for host in mx_hosts):
            shared.update(values)
    own = {}
    for domain in site_domains:
        own.update(settings.domains.get(domain, {}))
    merged = {**shared, **own, **(overrides or {})}
    # What an effect on this worker's site sets is this worker's whole; what
    # the domain sets is shared by the workers that send its mail (one, or
    # a spread domain's host's); the rest is the site's, split between all.
    # A site serving a spread domain splits all its domains' own limits (their
    # tables are merged: which domain set a key is not kept).
    own_share = host_workers if any(domain in spread for domain in site_domains) else 1
    share = {key: 1 if key in (overrides or {}) else own_share if key in own else workers
             for key in merged}
    connections = max(1, merged["connection_limit"] // share["connection_limit"])
    message_rate = rate_interval(merged["max_message_rate"])
    if message_rate is not None:
        message_rate *= share["max_message_rate"]
    connection_rate = rate_interval(merged["max_connection_rate"])
    if connection_rate is not None:
        connection_rate *= share["max_connection_rate"]
    return SiteLimits(connections, message_rate, connection_rate,
                      merged["max_deliveries_per_connection"],
                      merged["consecutive_connection_failures"],
                      merged.get("transactional_share", 0.0), merged.get("chunking", False))


class Gcra:
    """A token bucket with no burst (GCRA): one token every ``interval`` s."""

    def __init__(self, interval: float | None) -> None:
        self.interval = interval
        self.tat = 0.0  # theoretical arrival time of the next token

    def due(self, now: float) -> float:
        """When the next token is available (``now`` or later)."""
        return now if self.interval is None else max(self.tat, now)

    def take(self, now: float) -> None:
        if self.interval is not None:
            self.tat = max(self.tat, now) + self.interval


@dataclass
class Effect:
    """A change to one site for a while: listed by `relayctl shaping`,
    ended by its expiry or by `relayctl shaping cancel ID`."""

    id: int
    site: str
    kind: str  # throttle | suspend | bounce
    overrides: dict  # shaping keys a throttle sets (parsed values)
    reason: str  # the reply and the rule, or the operator's words
    source: str  # rule:N | connection-failures | operator
    since: float
    expires: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Effect":
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in data["overrides"].items()}
        return cls(**{**data, "overrides": overrides})


@dataclass
class _Trigger:
    count: int
    window: float
    seen: collections.deque = field(default_factory=collections.deque)

    def fire(self, now: float) -> bool:
        self.seen.append(now)
        while self.seen and self.seen[0] < now - self.window:
            self.seen.popleft()
        if len(self.seen) >= self.count:
            self.seen.clear()
            return True
        return False


class Effects:
    """The effects in force, per site, and the rules that start them."""

    def __init__(self, rules=(), worker: int = 0) -> None:
        self.rules = tuple(rules)  # config.ShapingRule
        self.by_site: dict[str, list[Effect]] = {}
        # Ids are unique across the relay: the low byte is the worker, so
        # `relayctl shaping cancel ID` knows whom to ask.
        self.worker = worker
        self._ids = itertools.count(ID_STEP + worker, ID_STEP)
        self._triggers: dict[tuple[int, str], _Trigger] = {}
        self._failure_holds: dict[str, float] = {}  # site -> last hold, doubled on repeat
        self.started: list[Effect] = []  # since the last drain_changes(): for events
        self.ended: list[Effect] = []

    # -- what is in force ---------------------------------------------------

    def active(self, site: str, now: float) -> list[Effect]:
        effects = self.by_site.get(site)
        if not effects:
            return []
        live = [e for e in effects if e.expires > now]
        if len(live) != len(effects):
            self.ended += [e for e in effects if e.expires <= now]
            if live:
                self.by_site[site] = live
            else:
                del self.by_site[site]
        return live

    def overrides(self, site: str, now: float) -> dict:
        merged: dict = {}
        for effect in self.active(site, now):
            if effect.kind == "throttle":
                merged.update(effect.overrides)
        return merged

    def held_until(self, site: str, now: float) -> float | None:
        """The end of the latest suspension in force, or None."""
        ends = [e.expires for e in self.active(site, now) if e.kind == "suspend"]
        return max(ends) if ends else None

    def bouncing(self, site: str, now: float) -> Effect | None:
        return next((e for e in self.active(site, now) if e.kind == "bounce"), None)

    def next_expiry(self) -> float | None:
        ends = [e.expires for effects in self.by_site.values() for e in effects]
        return min(ends) if ends else None

    def all(self, now: float) -> list[Effect]:
        for site in list(self.by_site):
            self.active(site, now)
        return sorted((e for effects in self.by_site.values() for e in effects), key=lambda e: e.id)

    # -- starting and ending ----------------------------------------------------

    def start(self, site: str, kind: str, overrides: dict, reason: str, source: str,
              now: float, duration: float) -> Effect:
        # The same cause firing again extends its effect rather than stacking.
        for effect in self.active(site, now):
            if effect.source == source and effect.kind == kind:
                effect.expires = max(effect.expires, now + duration)
                effect.reason = reason
                return effect
        effect = Effect(next(self._ids), site, kind, dict(overrides), reason, source, now, now + duration)
        self.by_site.setdefault(site, []).append(effect)
        self.started.append(effect)
        return effect

    def cancel(self, effect_id: int, now: float) -> Effect | None:
        for site, effects in self.by_site.items():
            for effect in effects:
                if effect.id == effect_id:
                    effects.remove(effect)
                    if not effects:
                        del self.by_site[site]
                    effect.expires = min(effect.expires, now)
                    self.ended.append(effect)
                    return effect
        return None

    def restore(self, effects: list[Effect], now: float) -> None:
        """Effects persisted by a previous run (the spool's meta table)."""
        for effect in effects:
            if effect.expires > now:
                self.by_site.setdefault(effect.site, []).append(effect)
        top = max((e.id for e in effects), default=0)
        following = next(self._ids)
        while following <= top:
            following += ID_STEP
        self._ids = itertools.count(following, ID_STEP)

    def drain_changes(self) -> tuple[list[Effect], list[Effect]]:
        started, ended, self.started, self.ended = self.started, self.ended, [], []
        return started, ended

    # -- reactions ------------------------------------------------------------

    def on_reply(self, site: str, reply: Reply, now: float) -> Effect | None:
        """Match a receiver's reply against the rules; the effect a rule
        started, if one fired.  The relay's own made-up replies (code 0)
        never match: a suspension must not feed itself."""
        if reply.code == 0:
            return None
        line = f"{reply.code} {reply.enhanced + ' ' if reply.enhanced else ''}{reply.text}"
        fired = None
        for number, rule in enumerate(self.rules):
            if not rule.regex.search(line):
                continue
            if rule.trigger is not None:
                trigger = self._triggers.get((number, site))
                if trigger is None:
                    trigger = self._triggers[(number, site)] = _Trigger(*rule.trigger)
                if not trigger.fire(now):
                    continue
            fired = self.start(site, rule.action, rule.overrides,
                               f"{line[:200]} (rule {number + 1}: {rule.regex.pattern})",
                               f"rule:{number + 1}", now, rule.duration)
        return fired

    def on_connection_failures(self, site: str, failures: int, threshold: int, reason: str,
                               now: float) -> Effect | None:
        """``failures`` failed opens in a row: at the threshold, suspend the
        site for a hold that doubles each time (the push service's ban)."""
        if failures < threshold:
            return None
        hold = self._failure_holds.get(site)
        hold = FAILURE_HOLD_FIRST if hold is None else min(hold * 2, FAILURE_HOLD_MAX)
        self._failure_holds[site] = hold
        return self.start(site, "suspend", {}, f"{failures} connection failures in a row: {reason}",
                          "connection-failures", now, hold)

    def on_connected(self, site: str) -> None:
        self._failure_holds.pop(site, None)


class Concurrency:
    """Adaptive concurrency of one site, as TCP's congestion window: slow
    start (one more connection per success) until the receiver first
    pushes back, then halving on trouble and a careful probe upwards (one
    more per PROBE_AFTER windows of successes), between 1 and the limit.
    A receiver that queues (deliver.scheduler: transactions slower than its
    baseline) eases it down in proportion (``ease``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.value = float(limit)
        self.threshold: float | None = None  # set by the first push-back

    @property
    def allowed(self) -> int:
        return max(1, min(self.limit, int(self.value)))

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.value = min(self.value, float(limit))

    def decrease(self) -> None:
        self.value = max(1.0, self.value / 2)
        self.threshold = self.value

    def ease(self, slowdown: float) -> None:
        """The receiver queues transactions: they take ``slowdown`` (> 1)
        times what it should.  Over one window (``value`` transactions) the
        window shrinks in that proportion, at most by half, so in-flight
        work falls back to what the receiver carries at its pace; growth
        beyond the new level is a careful probe again."""
        per_window = max(0.5, 1.0 / slowdown)
        self.value = max(1.0, self.value * per_window ** (1.0 / max(self.value, 1.0)))
        self.threshold = self.value

    def increase(self) -> None:
        if self.threshold is None or self.value < self.threshold:
            step = 1.0  # nothing refused yet (or below the last good level): grow fast
        else:
            # Past where the receiver pushed back: one more connection per
            # PROBE_AFTER windows, so each probe beyond its limit is rare.
            step = 1.0 / (PROBE_AFTER * max(self.value, 1.0))
        self.value = min(float(self.limit), self.value + step)

