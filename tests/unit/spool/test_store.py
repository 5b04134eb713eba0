"""relay.spool.store: the SQLite spool with group commit (driven by asyncio.run)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

import pytest

from relay.errors import SpoolError, SpoolFull
from relay.model import Part, Recipient
from relay.route.shard import SLOT_COUNT
from relay.spool import store as store_mod
from relay.spool.format import FORMAT_VERSION, MessageState, RecipientState
from relay.spool.store import Spool, connect, spool_path


def part(queue_id: str, n: int = 2, *, coordinator=None, body: bytes = b"Subject: x\r\n\r\nhi\r\n",
         received_at: float | None = None, sender: str = "s@x.example") -> Part:
    return Part(
        queue_id=queue_id,
        sender=sender,
        recipients=tuple(
            Recipient(f"r{i}@d{i}.example", f"d{i}.example", (7 * i + 3) % SLOT_COUNT, i) for i in range(n)
        ),
        body=body,
        received_at=time.time() if received_at is None else received_at,
        smtputf8=False,
        coordinator=coordinator,
    )


def with_spool(tmp_path, body, worker: int = 0):
    """Run ``await body(spool)`` on an open spool, then close it."""

    async def main():
        spool = Spool(str(tmp_path), worker)
        await spool.open()
        try:
            return await body(spool)
        finally:
            await spool.close()

    return asyncio.run(main())


def rows(tmp_path, sql: str, params=(), worker: int = 0) -> list[tuple]:
    conn = sqlite3.connect(spool_path(str(tmp_path), worker))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def message_state(tmp_path, queue_id: str):
    found = rows(tmp_path, "SELECT state, coordinator FROM message WHERE id = ?", (queue_id,))
    return found[0] if found else None


# -- opening -------------------------------------------------------------------------


def test_open_creates_the_database_with_its_meta(tmp_path):
    async def body(spool):
        return await spool.read(
            lambda c: (
                c.execute("PRAGMA journal_mode").fetchone()[0],
                c.execute("PRAGMA synchronous").fetchone()[0],
            )
        )

    journal, synchronous = with_spool(tmp_path / "sub", body, worker=3)
    assert journal == "wal" and synchronous == 2  # FULL
    assert os.path.exists(tmp_path / "sub" / "worker-3.db")
    meta = dict(rows(tmp_path / "sub", "SELECT key, value FROM meta", worker=3))
    assert meta == {"version": str(FORMAT_VERSION), "slot_count": str(SLOT_COUNT)}


def test_a_spool_with_another_slot_count_is_refused(tmp_path):
    path = spool_path(str(tmp_path), 0)
    connect(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '512' WHERE key = 'slot_count'")
    conn.commit()
    conn.close()
    with pytest.raises(SpoolError):
        connect(path)


def test_store_before_open_is_a_spool_error(tmp_path):
    async def main():
        with pytest.raises(SpoolError):
            await Spool(str(tmp_path), 0).store(part("Q"))

    asyncio.run(main())


# -- storing ---------------------------------------------------------------------------


def test_single_part_is_stored_active(tmp_path):
    p = part("Q1", 3, received_at=1700000000.5)

    async def body(spool):
        await spool.store(p)

    with_spool(tmp_path, body)
    assert rows(tmp_path, "SELECT * FROM message") == [
        ("Q1", "s@x.example", 1700000000.5, 0, len(p.body), int(MessageState.ACTIVE), None, 0,
         "transactional", "", "")
    ]
    assert rows(tmp_path, "SELECT id, data FROM body") == [("Q1", p.body)]
    got = rows(tmp_path, "SELECT message_id, idx, address, domain, slot, state, attempts, last_reply FROM recipient ORDER BY idx")
    assert got == [
        ("Q1", r.index, r.address, r.domain, r.slot, int(RecipientState.QUEUED), 0, None) for r in p.recipients
    ]


def test_multi_owner_part_is_stored_held_with_its_coordinator(tmp_path):
    async def body(spool):
        await spool.store(part("Q2", coordinator=2))

    with_spool(tmp_path, body)
    assert message_state(tmp_path, "Q2") == (int(MessageState.HELD), 2)


def test_stored_data_survives_reopening(tmp_path):
    async def first(spool):
        await spool.store(part("Q3"))

    async def second(spool):
        return await spool.read(lambda c: c.execute("SELECT id FROM message").fetchall())

    with_spool(tmp_path, first)
    assert with_spool(tmp_path, second) == [("Q3",)]


def test_a_queue_id_stored_twice_is_refused(tmp_path):
    # A 250 must never stand for rows written by another transaction.
    p = part("Q4", 3, coordinator=1)

    async def body(spool):
        await spool.store(p)
        results = await asyncio.gather(spool.store(p), spool.store(p), return_exceptions=True)
        return results

    results = with_spool(tmp_path, body)
    assert all(isinstance(r, SpoolError) for r in results)
    assert rows(tmp_path, "SELECT COUNT(*) FROM message") == [(1,)]
    assert rows(tmp_path, "SELECT COUNT(*) FROM body") == [(1,)]
    assert rows(tmp_path, "SELECT COUNT(*) FROM recipient") == [(3,)]


def test_release(tmp_path):
    async def body(spool):
        await spool.store(part("H", coordinator=0))
        await spool.store(part("A"))
        await spool.release("H")
        await spool.release("A")  # already active: no-op
        await spool.release("missing")

    with_spool(tmp_path, body)
    assert message_state(tmp_path, "H") == (int(MessageState.ACTIVE), 0)
    assert message_state(tmp_path, "A") == (int(MessageState.ACTIVE), None)


def test_abort_removes_a_held_part_entirely(tmp_path):
    async def body(spool):
        await spool.store(part("H", 4, coordinator=1))
        await spool.store(part("K", 2, coordinator=1))
        await spool.abort("H")
        await spool.abort("missing")

    with_spool(tmp_path, body)
    assert rows(tmp_path, "SELECT id FROM message") == [("K",)]
    assert rows(tmp_path, "SELECT id FROM body") == [("K",)]
    assert rows(tmp_path, "SELECT DISTINCT message_id FROM recipient") == [("K",)]


def test_abort_leaves_an_active_part_alone(tmp_path):
    async def body(spool):
        await spool.store(part("A", 2))
        await spool.store(part("R", 2, coordinator=1))
        await spool.release("R")
        await spool.abort("A")
        await spool.abort("R")  # released: too late to withdraw

    with_spool(tmp_path, body)
    assert sorted(rows(tmp_path, "SELECT id FROM message")) == [("A",), ("R",)]
    assert rows(tmp_path, "SELECT COUNT(*) FROM recipient") == [(4,)]


def test_decide_and_is_decided(tmp_path):
    async def body(spool):
        before = await spool.is_decided("T1")
        await spool.decide("T1")
        await spool.decide("T1")  # idempotent
        return before, await spool.is_decided("T1"), await spool.is_decided("T2")

    assert with_spool(tmp_path, body) == (False, True, False)
    assert len(rows(tmp_path, "SELECT * FROM txn")) == 1


def test_prune_decisions(tmp_path):
    async def body(spool):
        await spool.decide("OLD")
        await spool.prune_decisions(time.time() - 3600)
        kept = await spool.is_decided("OLD")
        await spool.prune_decisions(time.time() + 1)
        return kept, await spool.is_decided("OLD")

    assert with_spool(tmp_path, body) == (True, False)


def test_held_parts(tmp_path):
    async def body(spool):
        await spool.store(part("OLD", coordinator=1, received_at=100.0))
        await spool.store(part("NEW", coordinator=2, received_at=200.0))
        await spool.store(part("ACT", received_at=50.0))
        return sorted(await spool.held_parts(150.0)), sorted(await spool.held_parts(1e12))

    older, every = with_spool(tmp_path, body)
    assert older == [("OLD", 1)]
    assert every == [("NEW", 2), ("OLD", 1)]


def test_store_matches_the_router_protocol():
    from relay.route.forward import Store

    for name in ("store", "decide", "release", "abort", "is_decided", "held_parts", "prune_decisions"):
        assert hasattr(Store, name) and asyncio.iscoroutinefunction(getattr(Spool, name))


# -- group commit ------------------------------------------------------------------------


def test_group_commit(tmp_path):
    async def body(spool):
        before = spool.commits
        await asyncio.gather(*(spool.store(part(f"G{i:03}", 2)) for i in range(200)))
        return spool.commits - before

    commits = with_spool(tmp_path, body)
    assert 1 <= commits <= 20, commits  # far fewer fsyncs than parts
    assert rows(tmp_path, "SELECT COUNT(*) FROM message") == [(200,)]
    assert rows(tmp_path, "SELECT COUNT(*) FROM recipient") == [(400,)]


def test_one_bad_operation_fails_alone(tmp_path):
    async def body(spool):
        results = await asyncio.gather(
            spool.store(part("OK1")),
            spool._submit(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)")),
            spool.store(part("OK2")),
            return_exceptions=True,
        )
        return results, spool.commits

    results, commits = with_spool(tmp_path, body)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], SpoolError)
    assert "no_such_table" not in str(results[1])  # no internals in the error
    assert commits == 1  # the others shared the commit
    assert sorted(rows(tmp_path, "SELECT id FROM message")) == [("OK1",), ("OK2",)]


def test_a_failed_operation_is_rolled_back_alone(tmp_path):
    def half_then_fail(conn):
        conn.execute("INSERT INTO txn VALUES ('HALF', 1.0)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    async def body(spool):
        results = await asyncio.gather(
            spool._submit(half_then_fail), spool.decide("WHOLE"), return_exceptions=True
        )
        return results

    results = with_spool(tmp_path, body)
    assert isinstance(results[0], SpoolError) and results[1] is None
    assert rows(tmp_path, "SELECT id FROM txn") == [("WHOLE",)]


def test_a_batch_runs_bare_and_only_a_failure_brings_savepoints(tmp_path):
    runs = []

    def counted(conn):
        runs.append(1)
        conn.execute("INSERT INTO txn VALUES (?, 1.0)", (f"T{len(runs)}",))

    async def body(spool):
        statements: list[str] = []
        spool._conn.set_trace_callback(statements.append)
        await asyncio.gather(spool.store(part("A1")), spool._submit(counted), spool.store(part("A2")))
        clean, statements[:] = list(statements), []
        results = await asyncio.gather(
            spool._submit(counted),
            spool._submit(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)")),
            return_exceptions=True,
        )
        spool._conn.set_trace_callback(None)
        return clean, statements, results

    clean, retried, results = with_spool(tmp_path, body)
    assert not any("SAVEPOINT" in s for s in clean) and clean.count("COMMIT") == 1
    assert sum("SAVEPOINT" in s for s in retried) == 2 and retried.count("ROLLBACK") == 1
    assert results[0] is None and isinstance(results[1], SpoolError)
    # The good operation ran again after the rollback, and counts once.
    assert len(runs) == 3 and rows(tmp_path, "SELECT id FROM txn ORDER BY id") == [("T1",), ("T3",)]


def test_an_invalid_part_is_refused_not_half_stored(tmp_path):
    async def body(spool):
        return await asyncio.gather(spool.store(part("BAD", sender=None)), return_exceptions=True)

    [result] = with_spool(tmp_path, body)
    leftovers = rows(tmp_path, "SELECT COUNT(*) FROM body") + rows(tmp_path, "SELECT COUNT(*) FROM recipient")
    assert isinstance(result, SpoolError)
    assert leftovers == [(0,), (0,)]


def test_batches_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "MAX_BATCH", 10)

    async def body(spool):
        await asyncio.gather(*(spool.store(part(f"B{i:03}", 1)) for i in range(55)))
        return spool.commits

    assert with_spool(tmp_path, body) >= 6
    assert rows(tmp_path, "SELECT COUNT(*) FROM message") == [(55,)]


# -- disk full ------------------------------------------------------------------------------


def _fill_until_failure(spool, headroom_pages: int = 40):
    async def run():
        pages = await spool.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await spool.read(lambda c: c.execute(f"PRAGMA max_page_count = {pages + headroom_pages}").fetchone())
        ok, failed = [], []
        for wave in range(200):
            batch = [part(f"F{wave:03}-{i}", 3, body=os.urandom(5000)) for i in range(4)]
            results = await asyncio.gather(*(spool.store(p) for p in batch), return_exceptions=True)
            for p, result in zip(batch, results):
                (failed if isinstance(result, BaseException) else ok).append((p, result))
            if failed:
                break
        return ok, failed

    return run()


def test_disk_full_leaves_only_complete_parts(tmp_path):
    async def body(spool):
        ok, failed = await _fill_until_failure(spool)
        # The spool still works once there is room again.
        await spool.read(lambda c: c.execute("PRAGMA max_page_count = 1000000").fetchone())
        await spool.store(part("AFTER", 2))
        return ok, failed

    ok, failed = with_spool(tmp_path, body)
    assert ok and failed
    for _, exc in failed:
        assert isinstance(exc, SpoolError)  # SpoolFull is a SpoolError
        assert str(tmp_path) not in str(exc)  # never leaks a path
    stored = {row[0] for row in rows(tmp_path, "SELECT id FROM message")}
    assert stored == {p.queue_id for p, _ in ok} | {"AFTER"}
    for p, _ in ok:
        assert rows(tmp_path, "SELECT data FROM body WHERE id = ?", (p.queue_id,)) == [(p.body,)]
        got = rows(tmp_path, "SELECT idx FROM recipient WHERE message_id = ? ORDER BY idx", (p.queue_id,))
        assert got == [(r.index,) for r in p.recipients]
    for p, _ in failed:
        assert rows(tmp_path, "SELECT COUNT(*) FROM message WHERE id = ?", (p.queue_id,)) == [(0,)]
    # No orphans in any direction.
    assert rows(tmp_path, "SELECT COUNT(*) FROM message WHERE id NOT IN (SELECT id FROM body)") == [(0,)]
    assert rows(tmp_path, "SELECT COUNT(*) FROM message WHERE id NOT IN (SELECT message_id FROM recipient)") == [(0,)]
    assert rows(tmp_path, "SELECT COUNT(*) FROM recipient WHERE message_id NOT IN (SELECT id FROM message)") == [(0,)]
    assert rows(tmp_path, "SELECT COUNT(*) FROM body WHERE id NOT IN (SELECT id FROM message)") == [(0,)]


def test_disk_full_is_reported_as_spool_full(tmp_path):
    async def body(spool):
        return await _fill_until_failure(spool)

    _, failed = with_spool(tmp_path, body)
    assert failed and all(isinstance(exc, SpoolFull) for _, exc in failed)


# -- close --------------------------------------------------------------------------------------


def _close_with_queued_stores(tmp_path, count: int = 20):
    """Queue stores, then close while their group commit is running (made slow so
    the timing is certain); returns (exceptions of the stores answered, how many hung)."""

    async def main():
        spool = Spool(str(tmp_path), 0)
        await spool.open()
        commit = spool._commit

        def slow_commit(batch):
            time.sleep(0.2)
            return commit(batch)

        spool._commit = slow_commit
        tasks = [asyncio.create_task(spool.store(part(f"C{i:02}"))) for i in range(count)]
        for _ in range(400):  # until the writer has taken the batch (it is then committing)
            await asyncio.sleep(0.005)
            if not spool._pending:
                break
        assert not spool._pending and not any(t.done() for t in tasks)
        await spool.close()
        done, pending = await asyncio.wait(tasks, timeout=0.2)  # close() ran after the commit
        for task in pending:
            task.cancel()
        return [t.exception() for t in done], len(pending)

    return asyncio.run(main())


def test_close_commits_what_is_queued(tmp_path):
    _close_with_queued_stores(tmp_path)
    assert rows(tmp_path, "SELECT COUNT(*) FROM message") == [(20,)]
    assert rows(tmp_path, "SELECT COUNT(*) FROM recipient") == [(40,)]


def test_close_answers_every_queued_store(tmp_path):
    errors, hung = _close_with_queued_stores(tmp_path)
    assert hung == 0
    assert errors == [None] * 20
