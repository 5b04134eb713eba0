"""A timeout timer that a connection moves on every command or read
without making a new one each time (intake's idle limit, delivery's reads).

Input: ``set(when)`` (loop time) as often as the limit moves, ``clear()``
when nothing is waiting, ``cancel()`` when the connection is gone.
Output: ``expired()`` called once the time last set has passed.

Theory of operation: asyncio.timeout and call_later make and cancel a
timer (and more) for every read or command: about 3 % of the relay's CPU
in the transactional profile.  Here one timer is kept: it is moved only
when it would fire too late; when it fires early (the limit moved on
meanwhile) it is set again for the new time, at least a millisecond on
(uvloop's clock is in milliseconds, and a shorter delay would only run it
again at once); with nothing set it lapses.  The time it was armed for is
kept here: uvloop hands back a plain Handle, without when(), for a delay
under half a millisecond.
"""

from __future__ import annotations

import asyncio
from typing import Callable


class LazyTimer:
    __slots__ = ("_expired", "_handle", "_armed_at", "_when")

    def __init__(self, expired: Callable[[], None]) -> None:
        self._expired = expired
        self._handle: asyncio.Handle | None = None
        self._armed_at = 0.0  # when the timer fires (loop time)
        self._when: float | None = None  # the limit set last

    def set(self, when: float) -> None:
        self._when = when
        if self._handle is None or self._armed_at > when:
            if self._handle is not None:
                self._handle.cancel()
            self._arm(when)

    def clear(self) -> None:
        """Nothing waits any more: the timer lapses when it fires."""
        self._when = None

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._when = None

    def _arm(self, at: float) -> None:
        self._armed_at = at
        self._handle = asyncio.get_running_loop().call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        when = self._when
        if when is None:
            return
        now = asyncio.get_running_loop().time()
        if now < when:
            self._arm(max(when, now + 0.001))
            return
        self._when = None
        self._expired()
