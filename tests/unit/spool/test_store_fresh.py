"""Spool.store handing fresh mail straight to the dispatcher (Spool.fresh):
claimed in the transaction that stores it, or stored the old way when the
taker has no room, and the room given back when the store fails."""

from __future__ import annotations

import asyncio

import pytest

from relay.errors import SpoolError
from relay.spool.format import RecipientState
from test_store import part, rows, with_spool


class Taker:
    def __init__(self, room: bool) -> None:
        self.room = room
        self.taken, self.failed, self.stored = [], [], []

    def take_fresh(self, part) -> bool:
        self.taken.append(part.queue_id)
        return self.room

    def fresh_failed(self, part) -> None:
        self.failed.append(part.queue_id)

    def fresh_stored(self, due, body) -> None:
        self.stored.append((due, body))


def test_fresh_mail_is_claimed_as_it_is_stored_with_its_suppressions(tmp_path):
    taker, woken = Taker(room=True), []

    async def body(spool):
        await spool._submit(lambda conn: conn.execute(
            "INSERT INTO suppression VALUES (?, ?, ?)", ("r1@d1.example", 0.0, "550 5.1.1 gone")))
        spool.fresh, spool.on_ready = taker, lambda: woken.append(1)
        await spool.store(part("Q1", n=2))
        return await spool.claim_due(1e12, 100)

    assert with_spool(tmp_path, body) == []  # already claimed: no claim finds it
    [(due, stored_body)] = taker.stored
    assert [(d.queue_id, d.index, d.address, d.attempts) for d in due] == [
        ("Q1", 0, "r0@d0.example", 0), ("Q1", 1, "r1@d1.example", 0)]
    assert [d.suppressed for d in due] == [None, "550 5.1.1 gone"]
    assert stored_body == part("Q1").body and not woken  # nothing to claim: the loop sleeps on
    assert rows(tmp_path, "SELECT state FROM recipient") == [(int(RecipientState.SENDING),)] * 2


def test_without_room_mail_is_stored_for_the_claim(tmp_path):
    taker, woken = Taker(room=False), []

    async def body(spool):
        spool.fresh, spool.on_ready = taker, lambda: woken.append(1)
        await spool.store(part("Q1", n=1))
        await spool.store(part("Q2", n=1, coordinator=1))
        await spool.release("Q2")
        return [d.queue_id for d in await spool.claim_due(1e12, 100)]

    assert with_spool(tmp_path, body) == ["Q1", "Q2"]
    assert taker.taken == ["Q1", "Q2"] and not taker.stored and woken


def test_a_held_part_is_handed_over_at_its_release_once(tmp_path):
    taker = Taker(room=True)

    async def body(spool):
        spool.fresh = taker
        await spool.store(part("Q1", n=1, coordinator=1))  # waits for its coordinator's decision
        assert not taker.taken
        await spool.release("Q1")
        await spool.release("Q1")  # the held-part check may release it again: nothing more
        await spool.store(part("Q2", n=1, coordinator=1))
        await spool.abort("Q2")
        await spool.release("Q2")  # aborted: gone, nothing to hand over
        return await spool.claim_due(1e12, 100)

    assert with_spool(tmp_path, body) == []
    assert [[d.queue_id for d in due] for due, _ in taker.stored] == [["Q1"]]
    assert rows(tmp_path, "SELECT message_id, state FROM recipient") == [
        ("Q1", int(RecipientState.SENDING))]


def test_a_failed_store_gives_the_room_back(tmp_path):
    taker = Taker(room=True)

    async def body(spool):
        await spool.store(part("Q1", n=1))
        spool.fresh = taker
        with pytest.raises(SpoolError):
            await spool.store(part("Q1", n=1))  # the same queue id twice is refused

    with_spool(tmp_path, body)
    assert taker.failed == ["Q1"] and not taker.stored


def test_a_store_into_a_closing_spool_gives_the_room_back(tmp_path):
    taker = Taker(room=True)

    async def body(spool):
        spool.fresh = taker
        spool._closing = True  # as Spool.close sets it before the writer drains
        try:
            with pytest.raises(SpoolError):
                await spool.store(part("Q1", n=1))
        finally:
            spool._closing = False

    with_spool(tmp_path, body)
    assert taker.taken == ["Q1"] and taker.failed == ["Q1"] and not taker.stored


def test_a_store_whose_caller_is_cancelled_still_hands_its_commit_over(tmp_path):
    """The client went away while its part was being committed: the commit
    happens anyway, so its claimed recipients must reach the taker (or
    nobody would deliver them before the next start)."""
    taker = Taker(room=True)

    async def body(spool):
        spool.fresh = taker
        storing = asyncio.ensure_future(spool.store(part("Q1", n=1)))
        await asyncio.sleep(0)  # queued for the writer
        storing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await storing
        await spool.store(part("Q2", n=1))  # committed after Q1's batch

    with_spool(tmp_path, body)
    assert [due[0].queue_id for due, _ in taker.stored] == ["Q1", "Q2"] and not taker.failed
