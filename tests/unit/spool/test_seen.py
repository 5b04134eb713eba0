"""relay.spool.seen: claims of AMQP message keys at their owner's spool
(real SQLite spools in a temporary directory, driven by asyncio.run)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time

from relay.model import Part, Recipient
from relay.spool import seen
from relay.spool.seen import COMMITTED, IN_FLIGHT, IntakeIndex
from relay.spool.store import Spool, spool_path

FIELDS = b'{"fields": {"envelope": "a@x.example"}}'


def part(queue_id: str, coordinator=None) -> Part:
    return Part(queue_id=queue_id, sender="s@x.example",
                recipients=(Recipient("r@d.example", "d.example", 3, 0),),
                body=b"Subject: x\r\n\r\nhi\r\n", received_at=time.time(), smtputf8=False,
                coordinator=coordinator)


def with_index(tmp_path, body, workers: int = 1):
    """Run ``await body(indexes)``: one IntakeIndex per worker, on its spool."""

    async def main():
        spools = [Spool(str(tmp_path), worker) for worker in range(workers)]
        for spool in spools:
            await spool.open()
        indexes = [IntakeIndex(str(tmp_path), spool) for spool in spools]
        try:
            return await body(indexes)
        finally:
            for index, spool in zip(indexes, spools):
                index.close()
                await spool.close()

    return asyncio.run(main())


def records(tmp_path, worker: int = 0) -> list[tuple]:
    conn = sqlite3.connect(spool_path(str(tmp_path), worker))
    try:
        return conn.execute("SELECT key, queue_id, pid FROM amqp_intake ORDER BY key").fetchall()
    finally:
        conn.close()


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_of_copies_claimed_at_once_exactly_one_gets_the_key(tmp_path):
    async def body(indexes):
        index = indexes[0]
        # Ten tries of one key in the same group commit, by two processes.
        return await asyncio.gather(*(
            index.claim("id:m1", f"Q{n}", "q", FIELDS, pid) for n, pid in
            enumerate([1, seen.os.getpid()] * 5)))

    results = with_index(tmp_path, body)
    winners = [n for n, result in enumerate(results) if result is None]
    assert len(winners) == 1
    assert all(result == (IN_FLIGHT, f"Q{winners[0]}") for result in results if result)
    assert [row[:2] for row in records(tmp_path)] == [("id:m1", f"Q{winners[0]}")]


def test_a_committed_try_makes_later_copies_duplicates(tmp_path):
    async def body(indexes):
        index = indexes[0]
        assert await index.claim("id:m1", "Q1", "q", FIELDS, seen.os.getpid()) is None
        assert await index.claim("id:m1", "Q2", "q", FIELDS, 1) == (IN_FLIGHT, "Q1")
        await index.spool.store(part("Q1"))  # one owner: stored active is committed
        assert await index.claim("id:m1", "Q3", "q", FIELDS, 1) == (COMMITTED, "Q1")
        # Split across owners: held parts, then the coordinator's decision.
        assert await index.claim("id:m2", "Q4", "q", FIELDS, seen.os.getpid()) is None
        await index.spool.store(part("Q4", coordinator=0))
        assert await index.claim("id:m2", "Q5", "q", FIELDS, 1) == (IN_FLIGHT, "Q4")
        await index.spool.decide("Q4")
        assert await index.claim("id:m2", "Q6", "q", FIELDS, 1) == (COMMITTED, "Q4")

    with_index(tmp_path, body)


def test_commitment_is_found_in_any_workers_spool(tmp_path):
    async def body(indexes):
        owner, coordinator = indexes
        assert await owner.claim("id:m1", "Q1", "q", FIELDS, seen.os.getpid()) is None
        await coordinator.spool.store(part("Q1", coordinator=1))
        await coordinator.spool.decide("Q1")
        return await owner.claim("id:m1", "Q2", "q", FIELDS, 1)

    assert with_index(tmp_path, body, workers=2) == (COMMITTED, "Q1")


def test_the_key_of_a_dead_workers_uncommitted_try_is_taken_over(tmp_path):
    gone = dead_pid()

    async def body(indexes):
        index = indexes[0]
        assert await index.claim("id:m1", "Q1", "q", FIELDS, gone) is None
        await index.spool.store(part("Q1", coordinator=0))  # held, never decided
        assert await index.claim("id:m1", "Q2", "q", FIELDS, seen.os.getpid()) is None
        return await index.claim("id:m1", "Q3", "q", FIELDS, 1)

    assert with_index(tmp_path, body) == (IN_FLIGHT, "Q2")
    assert records(tmp_path) == [("id:m1", "Q2", seen.os.getpid())]


def test_a_dead_workers_committed_try_is_still_a_duplicate(tmp_path):
    gone = dead_pid()

    async def body(indexes):
        index = indexes[0]
        assert await index.claim("id:m1", "Q1", "q", FIELDS, gone) is None
        await index.spool.store(part("Q1"))
        return await index.claim("id:m1", "Q2", "q", FIELDS, seen.os.getpid())

    assert with_index(tmp_path, body) == (COMMITTED, "Q1")


def test_a_record_older_than_any_try_is_taken_over(tmp_path, monkeypatch):
    async def body(indexes):
        index = indexes[0]
        assert await index.claim("id:m1", "Q1", "q", FIELDS, seen.os.getpid()) is None
        monkeypatch.setattr(seen, "IN_FLIGHT_LIMIT", -1.0)
        return await index.claim("id:m1", "Q2", "q", FIELDS, seen.os.getpid())

    assert with_index(tmp_path, body) is None
    assert [row[:2] for row in records(tmp_path)] == [("id:m1", "Q2")]


def test_a_forgotten_try_leaves_the_key_free(tmp_path):
    async def body(indexes):
        index = indexes[0]
        assert await index.claim("id:m1", "Q1", "q", FIELDS, seen.os.getpid()) is None
        await index.forget("Q1")
        assert records(tmp_path) == []
        assert await index.claim("id:m1", "Q2", "q", FIELDS, seen.os.getpid()) is None
        return await index.origin("Q2")

    assert with_index(tmp_path, body) == ("q", FIELDS)
