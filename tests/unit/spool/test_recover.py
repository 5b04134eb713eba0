"""relay.spool.recover: settle held parts and re-home slots when the worker count changes.

Spools are written directly with relay.spool.store.connect/insert_part, as a
previous run would have left them.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3

import pytest

from relay.model import Part
from relay.route.shard import key_owner, recipient
from relay.spool.format import MessageState
from relay.spool.recover import existing_spools, recover
from relay.spool.store import connect, insert_part, spool_path

DOMAINS = [f"d{i}.example" for i in range(40)]


def make_part(queue_id: str, domains: list[str], *, first_index: int = 0, coordinator=None) -> Part:
    return Part(
        queue_id=queue_id,
        sender=f"sender-{queue_id}@x.example",
        recipients=tuple(recipient(f"u{i}@{d}", first_index + i) for i, d in enumerate(domains)),
        body=f"Subject: {queue_id}\r\n\r\nbody of {queue_id}\r\n".encode(),
        received_at=1700000000.0,
        coordinator=coordinator,
    )


def write(spool_dir: str, worker: int, parts=(), decisions=()) -> None:
    conn = connect(spool_path(spool_dir, worker))
    conn.execute("BEGIN")
    for part in parts:
        insert_part(conn, part, 0.0)
    for queue_id in decisions:
        conn.execute("INSERT INTO txn VALUES (?, ?)", (queue_id, 1.0))
    conn.execute("COMMIT")
    conn.close()


def snapshot(spool_dir: str) -> dict[int, dict[str, list]]:
    """Everything in every spool, by worker."""
    out = {}
    for worker, path in sorted(existing_spools(spool_dir).items()):
        conn = sqlite3.connect(path)
        try:
            out[worker] = {
                "message": sorted(conn.execute("SELECT * FROM message").fetchall()),
                "body": sorted(conn.execute("SELECT * FROM body").fetchall()),
                "recipient": sorted(conn.execute("SELECT * FROM recipient").fetchall()),
                "txn": sorted(conn.execute("SELECT * FROM txn").fetchall()),
            }
        finally:
            conn.close()
    return out


def check_homed(spool_dir: str, workers: int, parts: list[Part]) -> dict[int, dict[str, list]]:
    """Each recipient exactly once, in the spool of slot % workers, with its message and body."""
    state = snapshot(spool_dir)
    assert sorted(state) == list(range(workers))
    by_id = {p.queue_id: p for p in parts}
    seen = []
    for worker, tables in state.items():
        message_ids = {row[0] for row in tables["message"]}
        body_ids = {row[0] for row in tables["body"]}
        rcpt_ids = {row[0] for row in tables["recipient"]}
        assert message_ids == body_ids == rcpt_ids, f"worker {worker}: orphans"
        for row in tables["recipient"]:
            message_id, idx, address, domain, slot = row[:5]
            assert slot % workers == worker, f"{address} (slot {slot}) is in worker {worker}"
            seen.append((message_id, idx, address, domain, slot))
        for message_id, data in tables["body"]:
            assert data == by_id[message_id].body
        for row in tables["message"]:
            assert row[1] == by_id[row[0]].sender
    expected = sorted(
        (p.queue_id, r.index, r.address, r.domain, r.slot) for p in parts for r in p.recipients
    )
    assert sorted(seen) == expected  # nothing lost, nothing duplicated
    return state


def active_parts(n: int) -> list[Part]:
    return [make_part(f"M{m:02}", DOMAINS[m % 7 :: 5][:4]) for m in range(n)]


def test_slots_are_spread_enough_for_these_tests():
    slots = {recipient(f"u@{d}", 0).slot for d in DOMAINS}
    assert {s % 3 for s in slots} == {0, 1, 2} and {s % 2 for s in slots} == {0, 1}


def test_rehome_one_worker_to_three(tmp_path):
    spool_dir = str(tmp_path)
    parts = active_parts(12)
    write(spool_dir, 0, parts)
    counts = recover(spool_dir, 3)
    state = check_homed(spool_dir, 3, parts)
    moved = sum(len(state[w]["recipient"]) for w in (1, 2))
    assert counts == {"released": 0, "dropped": 0, "moved": moved}
    assert moved > 0


def test_rehome_three_workers_to_two_removes_the_empty_spool(tmp_path):
    spool_dir = str(tmp_path)
    parts = active_parts(15)
    # As three workers would have held them: each recipient at slot % 3.
    for worker in range(3):
        for part in parts:
            mine = tuple(r for r in part.recipients if r.slot % 3 == worker)
            if mine:
                write(spool_dir, worker, [Part(part.queue_id, part.sender, mine, part.body, part.received_at)])
    recover(spool_dir, 2)
    check_homed(spool_dir, 2, parts)
    for suffix in ("", "-wal", "-shm"):
        assert not os.path.exists(spool_path(spool_dir, 2) + suffix)


def test_one_message_split_over_workers_is_merged_at_its_owner(tmp_path):
    spool_dir = str(tmp_path)
    whole = make_part("SPLIT", DOMAINS[:8])
    for worker in range(4):
        mine = tuple(r for r in whole.recipients if r.slot % 4 == worker)
        if mine:
            write(spool_dir, worker, [Part(whole.queue_id, whole.sender, mine, whole.body, whole.received_at)])
    recover(spool_dir, 1)
    state = check_homed(spool_dir, 1, [whole])
    assert len(state[0]["message"]) == 1 and len(state[0]["body"]) == 1


def test_copy_left_on_both_sides_by_a_crash_is_not_duplicated(tmp_path):
    spool_dir = str(tmp_path)
    parts = active_parts(6)
    write(spool_dir, 0, parts)
    # A crashed earlier re-homing to 2 workers had already copied worker 1's share.
    for part in parts:
        mine = tuple(r for r in part.recipients if r.slot % 2 == 1)
        if mine:
            write(spool_dir, 1, [Part(part.queue_id, part.sender, mine, part.body, part.received_at)])
    counts = recover(spool_dir, 2)
    check_homed(spool_dir, 2, parts)
    assert counts["moved"] == 0  # every copy was already there


def test_held_parts_are_settled(tmp_path):
    spool_dir = str(tmp_path)
    decided_here = make_part("DEC0", DOMAINS[:3], coordinator=0)
    decided_elsewhere = make_part("DEC1", DOMAINS[3:6], coordinator=1)
    undecided = make_part("UND", DOMAINS[6:9], coordinator=0)
    active = make_part("ACT", DOMAINS[9:12])
    write(spool_dir, 0, [decided_here, undecided, active], decisions=["DEC0"])
    write(spool_dir, 1, [decided_elsewhere], decisions=["DEC1"])
    counts = recover(spool_dir, 1)
    assert counts["released"] == 2 and counts["dropped"] == 1
    state = check_homed(spool_dir, 1, [decided_here, decided_elsewhere, active])
    states = {row[0]: row[5] for row in state[0]["message"]}
    assert states == {q: int(MessageState.ACTIVE) for q in ("DEC0", "DEC1", "ACT")}
    assert not os.path.exists(spool_path(spool_dir, 1))


def test_decision_in_a_removed_workers_spool_still_counts(tmp_path):
    spool_dir = str(tmp_path)
    held = make_part("H", DOMAINS[:2], coordinator=2)
    write(spool_dir, 0, [held])
    write(spool_dir, 2, decisions=["H"])
    counts = recover(spool_dir, 2)
    assert counts["released"] == 1 and counts["dropped"] == 0
    check_homed(spool_dir, 2, [held])


def test_held_part_without_decision_is_dropped_everywhere(tmp_path):
    spool_dir = str(tmp_path)
    held0 = make_part("H", DOMAINS[:2], coordinator=0)
    held1 = make_part("H", DOMAINS[2:4], first_index=2, coordinator=0)
    write(spool_dir, 0, [held0])
    write(spool_dir, 1, [held1])
    counts = recover(spool_dir, 2)
    assert counts == {"released": 0, "dropped": 2, "moved": 0}
    for tables in snapshot(spool_dir).values():
        assert tables["message"] == tables["body"] == tables["recipient"] == []


@pytest.mark.parametrize("before, after", [(1, 3), (3, 2), (2, 2), (4, 1)])
def test_running_twice_is_a_no_op(tmp_path, before, after):
    spool_dir = str(tmp_path)
    parts = active_parts(8)
    held = make_part("HELD", DOMAINS[20:23], coordinator=0)
    for worker in range(before):
        mine = [
            Part(p.queue_id, p.sender, tuple(r for r in p.recipients if r.slot % before == worker),
                 p.body, p.received_at, coordinator=p.coordinator)
            for p in parts + [held]
        ]
        write(spool_dir, worker, [p for p in mine if p.recipients], decisions=["HELD"] if worker == 0 else ())
    recover(spool_dir, after)
    first = snapshot(spool_dir)
    check_homed(spool_dir, after, parts + [held])
    assert recover(spool_dir, after) == {"released": 0, "dropped": 0, "moved": 0}
    assert snapshot(spool_dir) == first


def test_fresh_directory_gets_one_spool_per_worker(tmp_path):
    spool_dir = str(tmp_path / "new" / "spool")
    assert recover(spool_dir, 3) == {"released": 0, "dropped": 0, "moved": 0}
    assert sorted(existing_spools(spool_dir)) == [0, 1, 2]


def test_removed_workers_spool_that_still_holds_mail_is_kept(tmp_path):
    # If the move did not empty it (here: a message with no recipient rows at all),
    # the file must not be deleted.
    spool_dir = str(tmp_path)
    write(spool_dir, 0, [])
    write(spool_dir, 1, [make_part("NORCPT", [])])
    recover(spool_dir, 1)
    assert os.path.exists(spool_path(spool_dir, 1))


def test_existing_spools_ignores_other_files(tmp_path):
    for name in ("worker-0.db", "worker-12.db", "worker-x.db", "worker-1.db-wal", "other.db"):
        (tmp_path / name).write_bytes(b"")
    assert existing_spools(str(tmp_path)) == {
        0: str(tmp_path / "worker-0.db"),
        12: str(tmp_path / "worker-12.db"),
    }


def test_rehome_moves_the_daily_roll_up_by_domain_and_spreads_campaigns(tmp_path):
    from relay.model import Event
    from relay.route.shard import owner_of, slot_of
    from relay.spool.store import insert_events

    spool_dir = str(tmp_path)
    part = dataclasses.replace(make_part("B", DOMAINS[:6]), lane="bulk", campaign="spring")
    conn = connect(spool_path(spool_dir, 0))
    conn.execute("BEGIN")
    insert_part(conn, part, 0.0)
    insert_events(conn, [Event.local(1700000000.0, "B", r.address, r.domain, "ok", "delivered",
                                     None, "bulk", "spring") for r in part.recipients])
    conn.execute("INSERT INTO meta VALUES ('campaigns', '{\"spring\": \"paused\"}')")
    conn.execute("COMMIT")
    conn.close()
    recover(spool_dir, 3)
    daily, campaigns, states = {}, {}, {}
    for worker, path in existing_spools(spool_dir).items():
        conn = sqlite3.connect(path)
        daily[worker] = {row[0] for row in conn.execute("SELECT domain FROM daily")}
        campaigns[worker] = conn.execute("SELECT name, lane FROM campaign").fetchall()
        states[worker] = conn.execute("SELECT value FROM meta WHERE key = 'campaigns'").fetchone()
        conn.close()
    for worker, domains in daily.items():
        assert all(owner_of(slot_of(d), 3) == worker for d in domains)
    assert set().union(*daily.values()) == set(DOMAINS[:6])
    assert all(rows == [("spring", "bulk")] for rows in campaigns.values())
    assert all(state == ('{"spring":"paused"}',) for state in states.values())


def write_keys(spool_dir: str, worker: int, keys: list[str]) -> None:
    conn = connect(spool_path(spool_dir, worker))
    conn.executemany("INSERT INTO amqp_intake VALUES (?, ?, 1.0, 'q', x'7b7d', 1)",
                     [(f"Q{worker}-{key}", key) for key in keys])
    conn.close()


def keys_by_worker(spool_dir: str) -> dict[int, list[str]]:
    out = {}
    for worker, path in sorted(existing_spools(spool_dir).items()):
        conn = sqlite3.connect(path)
        try:
            out[worker] = sorted(row[0] for row in conn.execute("SELECT key FROM amqp_intake"))
        finally:
            conn.close()
    return out


@pytest.mark.parametrize("before, after", [(2, 2), (2, 3), (3, 1)])
def test_amqp_key_records_move_to_their_keys_owner(tmp_path, before, after):
    # Written by a relay that kept each key with the worker that consumed
    # it (before == after: an upgrade), or for another worker count.
    spool_dir = str(tmp_path)
    keys = [f"id:m{n}" for n in range(30)]
    for worker in range(before):
        write_keys(spool_dir, worker, keys[worker::before])
    write_keys(spool_dir, 0, ["id:m1"] if before > 1 else [])  # stored twice by the old race
    recover(spool_dir, after)
    placed = keys_by_worker(spool_dir)
    assert sorted(placed) == list(range(after))
    assert placed == {
        w: sorted(k for k in keys if key_owner(k, after) == w) for w in range(after)}
    recover(spool_dir, after)
    assert keys_by_worker(spool_dir) == placed  # placed once: nothing moves again


def suppressed_by_worker(spool_dir: str) -> dict[int, set[str]]:
    out = {}
    for worker, path in sorted(existing_spools(spool_dir).items()):
        conn = sqlite3.connect(path)
        out[worker] = {row[0] for row in conn.execute("SELECT address FROM suppression")}
        conn.close()
    return out


def recipients_by_worker(spool_dir: str) -> dict[int, set[tuple[str, int]]]:
    out = {}
    for worker, path in sorted(existing_spools(spool_dir).items()):
        conn = sqlite3.connect(path)
        out[worker] = set(conn.execute("SELECT address, slot FROM recipient").fetchall())
        conn.close()
    return out


def test_spreading_a_domain_moves_its_mail_and_suppressions_to_their_addresses_owners(tmp_path):
    from relay.route.shard import owner_of

    spool_dir = str(tmp_path)
    recover(spool_dir, 2)
    domain, other = DOMAINS[0], DOMAINS[1]
    addresses = [f"user{n}@{domain}" for n in range(40)]
    owner = owner_of(recipient(addresses[0], 0).slot, 2)
    queued = dataclasses.replace(make_part("Q", [domain] * 12 + [other]), recipients=tuple(
        recipient(a, i) for i, a in enumerate(addresses[:12] + [f"u@{other}"])))
    write(spool_dir, owner, [queued])
    conn = connect(spool_path(spool_dir, owner))
    conn.executemany("INSERT INTO suppression VALUES (?, 1.0, '550 no such user')",
                     [(address,) for address in addresses])
    conn.execute("""INSERT INTO meta VALUES ('suspended', '["%s"]')""" % domain)
    conn.close()

    spread = frozenset({domain})
    recover(spool_dir, 2, spread=spread)

    def home(address: str, spread=spread) -> int:
        return owner_of(recipient(address, 0, spread).slot, 2)

    placed = suppressed_by_worker(spool_dir)
    assert placed == {w: {a for a in addresses if home(a) == w} for w in range(2)}
    assert placed[0] and placed[1]  # both workers own some of the domain's addresses now
    # Queued mail moved with its addresses (each with the slot the list gives it);
    # the other domain's recipient stayed.
    rows = recipients_by_worker(spool_dir)
    assert {a for w in rows for a, slot in rows[w] if slot != recipient(a, 0, spread).slot} == set()
    assert {a: w for w in rows for a, _ in rows[w]} == {
        a: home(a) for a in addresses[:12] + [f"u@{other}"]}
    for worker, path in existing_spools(spool_dir).items():  # the suspension holds everywhere
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT value FROM meta WHERE key = 'suspended'").fetchone() == (
            f'["{domain}"]',)
        conn.close()
    recover(spool_dir, 2, spread=spread)
    assert suppressed_by_worker(spool_dir) == placed  # placed once
    recover(spool_dir, 2)  # and back to one owner when the list no longer names it
    assert suppressed_by_worker(spool_dir) == {owner: set(addresses), 1 - owner: set()}
    assert {a for w, found in recipients_by_worker(spool_dir).items() for a, _ in found
            if w == owner} >= set(addresses[:12])
