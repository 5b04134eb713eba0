"""Offline spool recovery, run by the supervisor before any worker starts.

Input: the spool directory and the worker count of this start.  Output:
every spool database holding exactly the mail of its worker's slots.

1. Held parts (multi-owner transactions caught mid-way by a crash) are
   settled: if any spool holds the coordinator's decision the part is
   released, otherwise the client never got a 250 and the part is dropped.
2. A host of a cluster whose spool holds mail for slots another host owns
   now (``[cluster] hosts`` or ``index`` changed without draining first)
   refuses to start: that mail would never be sent (ClusterMismatch).
3. Mail whose slot now belongs to another worker (the worker count changed)
   moves to its new owner, with the suppression list entries, delivery
   events and daily roll-up rows of its domains (campaign rows are copied
   to every owner, and the campaign states the operator set are merged
   into every spool: they apply in every worker): copied and committed there first, then deleted
   at the source.  A crash in between leaves a copy on both sides, and the
   next run's INSERT OR IGNORE makes the copy a no-op before the delete.
   When ``[relay] spread_domains`` changed, the recipients of the domains
   that were or are spread first take the slot the list gives them now
   (route.shard.address_slot), so they move with their addresses'
   suppression entries and events.  The suspensions every spool recorded
   (relayctl suspend) are merged into every spool, as campaign states are.
4. The records of AMQP message keys (spool.seen) move to their key's owner
   (route.shard.key_owner) when the worker count changed since they were
   placed, or when a relay that kept them with the consuming worker wrote
   them: copied first, then deleted at the source, like mail.
5. Databases of workers that no longer exist are removed once empty.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any, Callable

import orjson

from relay.errors import SpoolError
from relay.intake.policy import BadDomain, routing_domain
from relay.route.shard import address_slot, key_owner
from relay.spool.format import MessageState, RecipientState
from relay.spool.schema import reporting
from relay.spool.store import connect, spool_path

log = logging.getLogger(__name__)

_NAME = re.compile(r"worker-(\d+)\.db$")


def existing_spools(spool_dir: str) -> dict[int, str]:
    found = {}
    for path in glob.glob(os.path.join(spool_dir, "worker-*.db")):
        match = _NAME.search(path)
        if match:
            found[int(match.group(1))] = path
    return found


# Recipients still to be sent (a final one may stay where it is).
UNSENT = tuple(int(s) for s in (RecipientState.QUEUED, RecipientState.DEFERRED,
                                RecipientState.SENDING, RecipientState.QUARANTINED,
                                RecipientState.HELD))


class ClusterMismatch(SpoolError):
    """The spool holds mail for slots this host no longer owns."""


def recover(spool_dir: str, workers: int, hosts: int = 1, index: int = 0,
            spread: frozenset[str] = frozenset()) -> dict[str, int]:
    """Settle held parts, check the cluster's slots and re-home slots
    between workers; returns counts for the log."""
    os.makedirs(spool_dir, exist_ok=True)
    paths = existing_spools(spool_dir)
    for worker in range(workers):
        paths.setdefault(worker, spool_path(spool_dir, worker))
    conns: dict = {}
    counts = {"released": 0, "dropped": 0, "moved": 0}
    try:
        for worker, path in sorted(paths.items()):
            conns[worker] = connect(path)  # a damaged or newer file: SpoolError naming it
            conns[worker].create_function(
                "address_slot", 1, lambda address: _address_slot(address, spread, hosts),
                deterministic=True)
            conns[worker].create_function("domain_slot", 1, _domain_slot, deterministic=True)
            conns[worker].create_function("key_owner", 2, key_owner, deterministic=True)
        _settle_held(conns, paths, counts)
        _check_cluster(conns, paths, hosts, index)
        # Re-homing reads every row: only when the worker count (or the
        # list of spread domains) changed.
        spread_text = ",".join(sorted(spread))
        recorded = {}
        for worker, conn in conns.items():
            with reporting(paths[worker]):
                recorded[worker] = (_recorded_workers(conn), _recorded_spread(conn))
        if any(recorded_as != (workers, spread_text) for recorded_as in recorded.values()):
            was_spread = {d for _, text in recorded.values() for d in text.split(",") if d}
            for worker, conn in conns.items():
                with reporting(paths[worker]):
                    _reslot(conn, was_spread | spread)
            for source, conn in conns.items():
                with reporting(paths[source]):  # targets were checked by connect() above
                    _rehome(source, conn, conns, workers, hosts, counts)
            _merge_meta(conns, "campaigns", _campaign_states)
            _merge_meta(conns, "suspended", _suspended)
            for conn in conns.values():
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('workers', ?)", (str(workers),))
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             (SPREAD_DOMAINS, spread_text))
        placed = {}
        for worker, conn in conns.items():
            with reporting(paths[worker]):
                placed[worker] = _recorded_workers(conn, KEYS_PLACED_FOR)
        if any(count != workers for count in placed.values()):
            for source, conn in conns.items():
                with reporting(paths[source]):
                    _rehome_keys(source, conn, conns, workers)
            for conn in conns.values():
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             (KEYS_PLACED_FOR, str(workers)))
    finally:
        for conn in conns.values():
            conn.close()
    for worker, path in paths.items():
        if worker >= workers:
            _remove_if_empty(path)
    if any(counts.values()):
        log.info(
            "spool recovery: %(released)d held parts released, %(dropped)d dropped,"
            " %(moved)d recipients re-homed",
            counts,
        )
    return counts


def _check_cluster(conns: dict, paths: dict[int, str], hosts: int, index: int) -> None:
    """Refuse a spool with unsent mail of other hosts' slots; record the
    cluster's shape (the scan runs only when it changed)."""
    shape = f"{hosts}:{index}"
    for worker, conn in conns.items():
        with reporting(paths[worker]):
            row = conn.execute("SELECT value FROM meta WHERE key = 'cluster'").fetchone()
            recorded = row[0] if row else "1:0"
            if recorded == shape:
                continue
            marks = ",".join("?" * len(UNSENT))
            stray = conn.execute(
                f"SELECT count(*) FROM recipient WHERE state IN ({marks}) AND slot % ? != ?",
                (*UNSENT, hosts, index)).fetchone()[0]
            if stray:
                raise ClusterMismatch(
                    f"spool file {paths[worker]} holds {stray} unsent recipient(s) of slots this host"
                    f" no longer owns (it was host {recorded.replace(':', ' of ')} counting from 0,"
                    f" now {index} of {hosts}): drain it with the old [cluster] settings first"
                    " (README: changing hosts)")
    for worker, conn in conns.items():
        with reporting(paths[worker]):
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('cluster', ?)", (shape,))


# The worker count the AMQP key records of a spool were placed for.
KEYS_PLACED_FOR = "amqp_key_workers"


def _recorded_workers(conn, key: str = "workers") -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else None


SPREAD_DOMAINS = "spread_domains"  # meta: the list the rows were placed for, comma-separated


def _recorded_spread(conn) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (SPREAD_DOMAINS,)).fetchone()
    return row[0] if row else ""


def _settle_held(conns: dict, paths: dict[int, str], counts: dict[str, int]) -> None:
    decided = set()
    for worker, conn in conns.items():
        with reporting(paths[worker]):
            decided.update(row[0] for row in conn.execute("SELECT id FROM txn"))
    for worker, conn in conns.items():
        with reporting(paths[worker]):
            _settle_held_in(conn, decided, counts)


def _settle_held_in(conn, decided: set, counts: dict[str, int]) -> None:
    held = [
        row[0]
        # A literal 0 (MessageState.HELD), so the partial index is used.
        for row in conn.execute("SELECT id FROM message WHERE state = 0")
    ]
    if not held:
        return
    conn.execute("BEGIN IMMEDIATE")
    for queue_id in held:
        if queue_id in decided:
            conn.execute(
                "UPDATE message SET state = ? WHERE id = ?",
                (int(MessageState.ACTIVE), queue_id),
            )
            counts["released"] += 1
        else:
            for table, column in (("recipient", "message_id"), ("body", "id"), ("message", "id")):
                conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (queue_id,))
            counts["dropped"] += 1
    conn.execute("COMMIT")


def _address_slot(address: str, spread: frozenset[str] = frozenset(), hosts: int = 1) -> int:
    try:
        return address_slot(address, routing_domain(address.rpartition("@")[2]), spread, hosts)
    except BadDomain:
        return 0


def _domain_slot(domain: str) -> int:
    # The daily roll-up is by domain: a spread domain's rows, made by every
    # worker, are merged at its domain slot's owner (counts add up).
    return _address_slot("@" + domain)


def _merge_meta(conns: dict, key: str, combine: Callable[[list], Any]) -> None:
    """A JSON meta value, as every spool recorded it, combined into one and
    written to every spool: what the operator set applies in every worker,
    a worker new after a worker-count change included.  Campaign states
    (relayctl campaign pause|cancel) and suspensions (relayctl suspend: a
    domain's mail may have moved to a worker that never saw the command)."""
    values = []
    for conn in conns.values():
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row:
            values.append(orjson.loads(row[0]))
    merged = combine(values)
    if merged:
        for conn in conns.values():
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, orjson.dumps(merged).decode()))


def _campaign_states(values: list[dict]) -> dict:
    return {name: state for states in values for name, state in states.items()}


def _suspended(values: list[list]) -> list:
    return sorted({domain for domains in values for domain in domains})


def _reslot(conn, domains: set[str]) -> None:
    """Recipients of domains spread or no longer spread take the slot the
    list gives them now, so they move with their addresses' suppressions and
    events (re-homing follows the slot)."""
    if domains:
        marks = ", ".join("?" * len(domains))
        conn.execute(f"UPDATE recipient SET slot = address_slot(address) WHERE domain IN ({marks})",
                     sorted(domains))


def _rehome(source: int, conn, conns: dict, workers: int, hosts: int,
            counts: dict[str, int]) -> None:
    # "(slot / hosts) % workers" in SQL (integer division) is
    # route.shard.owner_of(slot, workers, hosts).
    targets = {
        row[0]
        for query in (
            "SELECT DISTINCT (slot / ?) % ? FROM recipient",
            "SELECT DISTINCT (address_slot(address) / ?) % ? FROM suppression",
            "SELECT DISTINCT (address_slot(recipient) / ?) % ? FROM event",
            "SELECT DISTINCT (domain_slot(domain) / ?) % ? FROM daily",
        )
        for row in conn.execute(query, (hosts, workers))
    }
    for target in targets:
        if target == source:
            continue
        dest = conns[target]
        dest.execute("ATTACH DATABASE ? AS src", (conn_path(conn),))
        try:
            dest.execute("BEGIN IMMEDIATE")
            moving = "SELECT message_id FROM src.recipient WHERE (slot / ?) % ? = ?"
            dest.execute(
                f"INSERT OR IGNORE INTO main.message SELECT * FROM src.message WHERE id IN ({moving})",
                (hosts, workers, target),
            )
            dest.execute(
                f"INSERT OR IGNORE INTO main.body SELECT * FROM src.body WHERE id IN ({moving})",
                (hosts, workers, target),
            )
            moved = dest.execute(
                "INSERT OR IGNORE INTO main.recipient SELECT * FROM src.recipient"
                " WHERE (slot / ?) % ? = ?",
                (hosts, workers, target),
            ).rowcount
            dest.execute(
                "INSERT OR IGNORE INTO main.suppression SELECT * FROM src.suppression"
                " WHERE (address_slot(address) / ?) % ? = ?",
                (hosts, workers, target),
            )
            dest.execute(
                "INSERT INTO main.event (time, queue_id, recipient, destination, mx, source_ip,"
                " tls, code, enhanced, text, outcome, class, latency, lane, campaign)"
                " SELECT time, queue_id, recipient, destination, mx, source_ip, tls, code,"
                " enhanced, text, outcome, class, latency, lane, campaign FROM src.event"
                " WHERE (address_slot(recipient) / ?) % ? = ?",
                (hosts, workers, target),
            )
            # Counts add up: unlike the rows above, a crash between this commit
            # and the source's delete would count these twice (a known gap).
            dest.execute(
                "INSERT INTO main.daily SELECT * FROM src.daily"
                " WHERE (domain_slot(domain) / ?) % ? = ?"
                " ON CONFLICT (day, lane, campaign, domain, outcome)"
                " DO UPDATE SET count = count + excluded.count",
                (hosts, workers, target),
            )
            dest.execute(
                "INSERT INTO main.campaign SELECT * FROM src.campaign WHERE true"
                " ON CONFLICT (name) DO UPDATE SET first = min(first, excluded.first),"
                " last = max(last, excluded.last)"
            )
            dest.execute("COMMIT")
        finally:
            dest.execute("DETACH DATABASE src")
        # Only now that the copy is durable at its owner does the source let go.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM recipient WHERE (slot / ?) % ? = ?", (hosts, workers, target))
        conn.execute("DELETE FROM suppression WHERE (address_slot(address) / ?) % ? = ?",
                     (hosts, workers, target))
        conn.execute("DELETE FROM event WHERE (address_slot(recipient) / ?) % ? = ?",
                     (hosts, workers, target))
        conn.execute("DELETE FROM daily WHERE (domain_slot(domain) / ?) % ? = ?",
                     (hosts, workers, target))
        conn.execute(
            "DELETE FROM body WHERE id NOT IN (SELECT message_id FROM recipient)"
        )
        conn.execute(
            "DELETE FROM message WHERE id NOT IN (SELECT message_id FROM recipient)"
        )
        conn.execute("COMMIT")
        counts["moved"] += max(moved, 0)
        log.info("spool: re-homed %d recipients from worker %d to %d", moved, source, target)


def _rehome_keys(source: int, conn, conns: dict, workers: int) -> None:
    targets = {row[0] for row in conn.execute(
        "SELECT DISTINCT key_owner(key, ?) FROM amqp_intake", (workers,))}
    for target in targets - {source}:
        dest = conns[target]
        dest.execute("ATTACH DATABASE ? AS src", (conn_path(conn),))
        try:
            dest.execute("BEGIN IMMEDIATE")
            # A key in both (two tries stored by a relay before keys had
            # owners): the owner's record stays.
            moved = dest.execute(
                "INSERT OR IGNORE INTO main.amqp_intake SELECT * FROM src.amqp_intake"
                " WHERE key_owner(key, ?) = ?", (workers, target)).rowcount
            dest.execute("COMMIT")
        finally:
            dest.execute("DETACH DATABASE src")
        conn.execute("DELETE FROM amqp_intake WHERE key_owner(key, ?) = ?", (workers, target))
        log.info("spool: moved %d AMQP key records from worker %d to %d", max(moved, 0),
                 source, target)


def conn_path(conn) -> str:
    return conn.execute("PRAGMA database_list").fetchone()[2]


def _remove_if_empty(path: str) -> None:
    conn = connect(path)
    try:
        left = sum(
            conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("message", "suppression", "event", "daily")
        )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    if left:
        log.error("spool %s still holds %d rows; kept", os.path.basename(path), left)
        return
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
