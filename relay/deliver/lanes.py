"""A site's waiting jobs by lane and campaign (pure): which job is next.

Input: jobs (``lane`` and ``campaign`` attributes; absent: transactional,
no campaign) pushed at the back, or at the front when they go again (next
MX, a dead pooled connection).  Output: the next job of a lane, counts, and
the jobs of a campaign taken out (paused or cancelled).

Theory of operation: each lane keeps one queue per campaign (mail without
one is the campaign "") and a turn: the campaigns with jobs, in the order
they are served.  Taking a job takes the first campaign's oldest job and
sends that campaign to the back of the turn, so a campaign of 1,000
recipients interleaves with one of 1,000,000 instead of waiting behind it.
A job pushed at the front puts its campaign first again: it was already
its turn.  The scheduler asks the transactional lane first.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterator

from relay.model import LANES, TRANSACTIONAL


def lane_of(job) -> str:
    return getattr(job, "lane", TRANSACTIONAL) or TRANSACTIONAL


def campaign_of(job) -> str:
    return getattr(job, "campaign", "") or ""


class CampaignRing:
    """One lane's jobs, round robin between campaigns."""

    def __init__(self) -> None:
        self.queues: dict[str, collections.deque] = {}
        self.turn: collections.deque[str] = collections.deque()
        self.count = 0

    def push(self, job, front: bool = False) -> None:
        campaign = campaign_of(job)
        queue = self.queues.get(campaign)
        if queue is None:
            queue = self.queues[campaign] = collections.deque()
            (self.turn.appendleft if front else self.turn.append)(campaign)
        elif front and self.turn[0] != campaign:
            self.turn.remove(campaign)  # few campaigns per site: a short walk
            self.turn.appendleft(campaign)
        (queue.appendleft if front else queue.append)(job)
        self.count += 1

    def peek(self):
        return self.queues[self.turn[0]][0] if self.turn else None

    def pop(self):
        campaign = self.turn.popleft()
        queue = self.queues[campaign]
        job = queue.popleft()
        if queue:
            self.turn.append(campaign)
        else:
            del self.queues[campaign]
        self.count -= 1
        return job

    def oldest(self) -> float | None:
        """When the longest-waiting job was queued (each queue is in order)."""
        return min((q[0].queued for q in self.queues.values()), default=None)

    def take(self, keep: Callable[[object], bool]) -> list:
        """Remove and return the jobs ``keep`` says no to."""
        taken = []
        for campaign in list(self.turn):
            queue = self.queues[campaign]
            gone = [job for job in queue if not keep(job)]
            if not gone:
                continue
            taken += gone
            rest = collections.deque(job for job in queue if keep(job))
            if rest:
                self.queues[campaign] = rest
            else:
                del self.queues[campaign]
                self.turn.remove(campaign)
        self.count -= len(taken)
        return taken

    def __iter__(self) -> Iterator:
        for campaign in self.turn:
            yield from self.queues[campaign]


class SiteQueue:
    """A site's waiting jobs: a ring per lane."""

    def __init__(self) -> None:
        self.lanes = {lane: CampaignRing() for lane in LANES}
        self._size = 0  # every ring's count: asked at each scheduler pass, for every site

    def push(self, job, front: bool = False) -> None:
        self.lanes[lane_of(job)].push(job, front)
        self._size += 1

    def count(self, lane: str) -> int:
        return self.lanes[lane].count

    def peek(self, lane: str):
        return self.lanes[lane].peek()

    def pop(self, lane: str):
        job = self.lanes[lane].pop()
        self._size -= 1
        return job

    def oldest(self, lanes: tuple = LANES) -> float | None:
        return min((t for t in (self.lanes[lane].oldest() for lane in lanes) if t is not None),
                   default=None)

    def take(self, keep: Callable[[object], bool]) -> list:
        taken = [job for lane in LANES for job in self.lanes[lane].take(keep)]
        self._size -= len(taken)
        return taken

    def clear(self) -> list:
        return self.take(lambda job: False)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator:
        for lane in LANES:
            yield from self.lanes[lane]

