"""A spool already holding many deferred messages, built without SMTP.

Input: a directory, the relay's worker count and a message count.  Output:
one SQLite spool per worker (``worker-N.db``, written by relay.spool.bulk
at the relay's own format version) in which every message has one
recipient in state DEFERRED, due 30 to 60 days from now, on domains owned
by that worker (shard slot % workers) — so nothing of it is delivered
during a benchmark, and the relay starts without re-homing anything.

Writing the rows in bulk (executemany) takes seconds where injecting a
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
from relay.spool.bulk import DeferredMessage, write_deferred
from relay.spool.format import RecipientState
from relay.spool.read import open_readers
from relay.spool.store import spool_path

BODY_SIZE = 1024  # bytes of each deferred message (small: the spool is still >1 GB at 1M)
DOMAINS = 1_000
CHUNK = 20_000  # messages per transaction
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
        mine = range(worker, count, workers)

        def batches(worker=worker, mine=mine):
            for start in range(0, len(mine), CHUNK):
                batch = []
                for n in mine[start:start + CHUNK]:
                    domain = owned[worker][n % len(owned[worker])]
                    batch.append(DeferredMessage(
                        f"{0xD000000000000 + n:013X}{worker:02X}{n & 0xFFF:03X}",
                        "app@sender.example", now - 3600, body, f"u{n}@{domain}", domain,
                        slot_of(domain), 1, now + DUE_FROM + rng.random() * DUE_SPREAD,
                        "451 4.3.0 Try later"))
                yield batch

        write_deferred(spool_path(directory, worker), workers, batches())


def copy(template: str, spool_dir: str) -> None:
    """A fresh copy of a built spool for one run."""
    os.makedirs(spool_dir, exist_ok=True)
    # The WAL was checkpointed into the .db at build time; -shm is rebuilt on open.
    for path in glob.glob(os.path.join(template, "worker-*.db")):
        shutil.copyfile(path, os.path.join(spool_dir, os.path.basename(path)))


def count(spool_dir: str) -> int:
    """Deferred recipients in a spool (for checks)."""
    total = 0
    for reader in open_readers(spool_dir):
        try:
            total += reader.counts()[RecipientState.DEFERRED]
        finally:
            reader.close()
    return total
