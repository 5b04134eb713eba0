"""Retry schedule (pure, clock injected): when a deferred recipient is tried next.

Input: how many attempts have been made, when the message arrived, and the
current time (all passed in: no clock is read here).  Output: the time of
the next attempt, or None when the message has been queued longer than the
maximum lifetime and must be bounced (outcome.bounce).

Theory of operation
-------------------
The delays come from ``[deliver] retry_schedule`` (default, close to
PostmanQ's: 1m 5m 10m 20m 30m 40m 50m 1h 6h).  After attempt ``n`` fails,
the recipient waits ``delays[n - 1]``; past the end of the list the last
delay repeats, so a long outage is retried every 6 hours rather than
ever more slowly.

Each wait is stretched or shrunk by a random factor in ``[-jitter, +jitter]``
(10% by default).  Without it, the thousands of messages deferred by one
destination outage in the same second would all come back in the same
second, again and again: a retry storm against a server that has just
recovered.  The random source is injected (a ``random.Random``); passing
none turns jitter off, which tests use to get exact times.

Lifetime: a message is given up ``max_lifetime`` seconds after it arrived
(``[deliver] max_lifetime``, 5 days by default; Postfix's
maximal_queue_lifetime).  A wait that would end after that deadline is cut
to end at the deadline, so the last attempt happens on time and the bounce
is not held back by up to a whole 6-hour step; once ``now`` is at or past
the deadline, ``next_attempt`` returns None.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetrySchedule:
    delays: tuple[float, ...]  # seconds to wait after attempt 1, 2, ...; the last repeats
    max_lifetime: float  # seconds from arrival; then give up
    # None: no jitter (exact times, for tests).  The worker passes its own
    # random.Random() so runs do not share a sequence.
    rng: random.Random | None = field(default=None, compare=False, repr=False)
    jitter: float = 0.1  # fraction of each delay, either way

    def __post_init__(self) -> None:
        delays = tuple(float(d) for d in self.delays)
        if not delays or any(not math.isfinite(d) or d <= 0 for d in delays):
            raise ValueError(f"retry delays must be positive seconds, not {self.delays!r}")
        if not math.isfinite(self.max_lifetime) or self.max_lifetime < 0:
            raise ValueError(f"max_lifetime must be >= 0 seconds, not {self.max_lifetime!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {self.jitter!r}")
        object.__setattr__(self, "delays", delays)

    def delay(self, attempts: int) -> float:
        """The wait after ``attempts`` failed attempts, before jitter."""
        if attempts < 1:
            raise ValueError(f"attempts counts attempts made, so it is >= 1, not {attempts}")
        return self.delays[min(attempts, len(self.delays)) - 1]

    def next_attempt(self, attempts: int, received_at: float, now: float) -> float | None:
        """When to try again after the ``attempts``-th failed attempt, or
        None when the message, received at ``received_at``, has outlived
        ``max_lifetime`` (all times in seconds on the same clock)."""
        wait = self.delay(attempts)
        deadline = received_at + self.max_lifetime
        if now >= deadline:
            return None
        if self.rng is not None and self.jitter:
            wait *= 1 + self.rng.uniform(-self.jitter, self.jitter)
        return min(now + wait, deadline)
