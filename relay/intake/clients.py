"""Per-client-IP figures for the whole relay: a table in shared memory.

Input: each worker's own counts for a client IP (open sessions, failed
AUTHs and the time of the last one).  Output: the same counts summed over
every worker, so ``max_connections_per_ip`` and ``max_auth_failures`` hold
for the relay, not per worker (the kernel's SO_REUSEPORT spreads one
client's connections over all workers).

Theory of operation.  The supervisor maps an anonymous shared segment
before it forks, so every worker (and every restarted worker) sees the same
memory.  Each worker owns one region and is its only writer; a restarted
worker zeroes its region, since its predecessor's sessions died with it.
An entry is (16-byte address, sessions, failures, last failure on the
monotonic clock, which is one clock for every process of the host).  A
client's entry lives in a window of ``WINDOW`` slots starting at the
CRC-32 of its address; readers look at the whole window of every other
region, so a freed slot never hides another entry.  There are no locks:
a reader may see a count one change old, so two workers accepting the same
client at the same instant can pass a limit by one each — the price of
never blocking an accept.  When a window is full the client is counted in
its own worker only.

Why not steer each client IP to one worker with a reuseport BPF program?
A smarthost's clients are a few application servers: with one client IP,
all intake would land on one core.
"""

from __future__ import annotations

import ipaddress
import mmap
import struct
import time
import zlib

ENTRY = struct.Struct("<16sIId")  # address, sessions, failures, last failure
SLOTS = 4096  # entries per worker region (128 KiB)
WINDOW = 8
_EMPTY = bytes(16)


def _key(ip: str) -> bytes:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return zlib.crc32(ip.encode()).to_bytes(16, "little")  # not an IP (a test's "?")
    if address.version == 4:
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address.packed


class ClientTable:
    """The shared segment: created by the supervisor before the first fork."""

    def __init__(self, workers: int, slots: int = SLOTS) -> None:
        self.workers = workers
        self.slots = slots
        self.region = slots * ENTRY.size
        self.memory = mmap.mmap(-1, workers * self.region)  # anonymous, MAP_SHARED

    def view(self, worker: int, horizon: float, clock=time.monotonic) -> "ClientView":
        return ClientView(self, worker, horizon, clock)


class ClientView:
    """One worker's side: writes its own counts, reads everyone else's."""

    def __init__(self, table: ClientTable, worker: int, horizon: float, clock=time.monotonic) -> None:
        self._table = table
        self._memory = table.memory
        self._worker = worker
        self.horizon = horizon  # failures older than this no longer count (auth_lockout)
        self._clock = clock
        self._own = worker * table.region
        self._memory[self._own:self._own + table.region] = bytes(table.region)
        self._local: dict[bytes, list] = {}  # key -> [sessions, failures, last, slot or None]
        self._slots: dict[int, bytes] = {}  # slot -> key, for this region

    def set_sessions(self, ip: str, sessions: int) -> None:
        entry = self._entry(_key(ip))
        entry[0] = sessions
        self._write(_key(ip), entry)

    def set_failures(self, ip: str, failures: int, last: float) -> None:
        entry = self._entry(_key(ip))
        entry[1], entry[2] = failures, last
        self._write(_key(ip), entry)

    def other_sessions(self, ip: str) -> int:
        return sum(sessions for sessions, _, _ in self._others(_key(ip)))

    def other_failures(self, ip: str, since: float) -> int:
        """Failures in other workers whose last one is no older than ``since``."""
        return sum(failures for _, failures, last in self._others(_key(ip)) if last >= since)

    # -- the table ------------------------------------------------------------

    def _entry(self, key: bytes) -> list:
        entry = self._local.get(key)
        if entry is None:
            entry = self._local[key] = [0, 0, 0.0, None]
        return entry

    def _write(self, key: bytes, entry: list) -> None:
        sessions, failures, last, slot = entry
        if sessions == 0 and failures == 0:
            self._release(key)
            return
        if slot is None:
            slot = entry[3] = self._free_slot(key)
            if slot is None:
                return  # the window is full: this client is counted here only
        ENTRY.pack_into(self._memory, self._offset(self._own, slot), key, sessions, failures, last)

    def _release(self, key: bytes) -> None:
        entry = self._local.pop(key)
        slot = entry[3]
        if slot is not None:
            del self._slots[slot]
            ENTRY.pack_into(self._memory, self._offset(self._own, slot), _EMPTY, 0, 0, 0.0)

    def _free_slot(self, key: bytes) -> int | None:
        start = zlib.crc32(key) % self._table.slots
        window = [(start + step) % self._table.slots for step in range(WINDOW)]
        for slot in window:
            if slot not in self._slots:
                self._slots[slot] = key
                return slot
        # Full: take back the slot of a client that has gone and whose
        # failures have expired (it never came back to clear them).
        expired = self._clock() - self.horizon
        for slot in window:
            old = self._local[self._slots[slot]]
            if old[0] == 0 and old[2] < expired:
                self._release(self._slots[slot])
                self._slots[slot] = key
                return slot
        return None

    def _offset(self, region: int, slot: int) -> int:
        return region + slot * ENTRY.size

    def _others(self, key: bytes):
        start = zlib.crc32(key) % self._table.slots
        for worker in range(self._table.workers):
            if worker == self._worker:
                continue
            region = worker * self._table.region
            for step in range(WINDOW):
                slot = (start + step) % self._table.slots
                found, sessions, failures, last = ENTRY.unpack_from(
                    self._memory, self._offset(region, slot))
                if found == key:
                    yield sessions, failures, last
