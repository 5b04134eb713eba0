"""A spool already holding many deferred messages, built without SMTP.

Input: a directory, the relay's worker count and a message count.  Output:
one SQLite spool per worker (``worker-N.db``, the relay's own schema via
relay.spool.store.connect) in which every message has one recipient in
state DEFERRED, due 30 to 60 days from now, on domains owned by that worker
(shard slot % workers) — so nothing of it is delivered during a benchmark,
and the relay starts without re-homing anything.

Writing the rows directly with executemany takes seconds where injecting a
million messages over SMTP would take the better part of an hour; the
durability settings are relaxed only for this offline build
(synchronous=OFF), never for the relay.  ``copy`` puts a fresh copy in a
run's spool directory, so every run starts from the same state.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import time

from relay.route.shard import slot_of
from relay.spool.format import MessageState, RecipientState
from relay.spool.store import connect, spool_path

BODY_SIZE = 1024  # bytes of each deferred message (small: the spool is still >1 GB at 1M)
DOMAINS = 1_000
CHUNK = 20_000  # rows per executemany
DUE_FROM = 30 * 86400.0
DUE_SPREAD = 30 * 86400.0


def _body(size: int) -> bytes:
    head = b"From: <app@sender.example>\r\nSubject: deferred\r\n\r\n"
    line = b"x" * 74 + b"\r\n"
    return (head + line * (size // len(line) + 1))[:size - 2] + b"\r\n"


def build(directory: str, workers: int, count: int, *, seed: int = 1) -> None:
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    body = _body(BODY_SIZE)
    owned: dict[int, list[str]] = {w: [] for w in range(workers)}
    for k in range(DOMAINS):
        domain = f"q{k:04d}.deferred.example"
        owned[slot_of(domain) % workers].append(domain)
    now = time.time()
    for worker in range(workers):
        conn = connect(spool_path(directory, worker))
        try:
            conn.execute("PRAGMA synchronous=OFF")
            # The worker count this spool is homed for: the relay's recovery
            # then skips the re-homing pass over every row.
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('workers', ?)", (str(workers),))
            mine = range(worker, count, workers)
            for start in range(0, len(mine), CHUNK):
                numbers = mine[start:start + CHUNK]
                ids = [f"{0xD000000000000 + n:013X}{worker:02X}{n & 0xFFF:03X}" for n in numbers]
                conn.execute("BEGIN")
                conn.executemany(
                    # Columns named: later ones (with defaults) may be added to the schema.
                    "INSERT INTO message (id, sender, received, smtputf8, size, state)"
                    " VALUES (?, ?, ?, 0, ?, ?)",
                    [(qid, "app@sender.example", now - 3600, len(body), int(MessageState.ACTIVE))
                     for qid in ids],
                )
                conn.executemany("INSERT INTO body (id, data) VALUES (?, ?)",
                                 [(qid, body) for qid in ids])
                rows = []
                for qid, n in zip(ids, numbers):
                    domain = owned[worker][n % len(owned[worker])]
                    rows.append((qid, 0, f"u{n}@{domain}", domain, slot_of(domain),
                                 int(RecipientState.DEFERRED), 1,
                                 now + DUE_FROM + rng.random() * DUE_SPREAD,
                                 "451 4.3.0 Try later"))
                conn.executemany(
                    "INSERT INTO recipient (message_id, idx, address, domain, slot, state,"
                    " attempts, next_attempt, last_reply) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()


def copy(template: str, spool_dir: str) -> None:
    """A fresh copy of a built spool for one run."""
    os.makedirs(spool_dir, exist_ok=True)
    # The WAL was checkpointed into the .db at build time; -shm is rebuilt on open.
    for path in glob.glob(os.path.join(template, "worker-*.db")):
        shutil.copyfile(path, os.path.join(spool_dir, os.path.basename(path)))


def count(spool_dir: str) -> int:
    """Deferred recipients in a spool (for checks)."""
    import sqlite3

    total = 0
    for path in glob.glob(os.path.join(spool_dir, "worker-*.db")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            total += conn.execute(
                "SELECT count(*) FROM recipient WHERE state = ?", (int(RecipientState.DEFERRED),)
            ).fetchone()[0]
        finally:
            conn.close()
    return total
