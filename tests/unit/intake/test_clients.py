"""The per-client-IP table in shared memory: what one worker writes, the
others read; windows, eviction and a restarted worker's clean region."""

from __future__ import annotations

from relay.intake.auth import FailureLockout
from relay.intake.clients import WINDOW, ClientTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_written_by_one_worker_are_read_by_the_others():
    table = ClientTable(3)
    views = [table.view(i, horizon=600) for i in range(3)]
    views[0].set_sessions("192.0.2.1", 2)
    views[1].set_sessions("192.0.2.1", 1)
    views[1].set_sessions("2001:db8::1", 4)
    assert views[2].other_sessions("192.0.2.1") == 3
    assert views[0].other_sessions("192.0.2.1") == 1  # its own are not "other"
    assert views[0].other_sessions("2001:db8::1") == 4
    assert views[0].other_sessions("192.0.2.2") == 0
    views[0].set_sessions("192.0.2.1", 0)
    assert views[2].other_sessions("192.0.2.1") == 1


def test_ipv4_and_its_mapped_ipv6_form_are_one_client():
    table = ClientTable(2)
    a, b = table.view(0, horizon=600), table.view(1, horizon=600)
    a.set_sessions("192.0.2.9", 1)
    assert b.other_sessions("::ffff:192.0.2.9") == 1


def test_a_restarted_worker_starts_from_a_clean_region():
    table = ClientTable(2)
    table.view(0, horizon=600).set_sessions("192.0.2.1", 5)
    table.view(0, horizon=600)  # the restarted worker 0: its predecessor's sessions died with it
    assert table.view(1, horizon=600).other_sessions("192.0.2.1") == 0


def test_full_window_counts_locally_then_reuses_expired_slots():
    clock = Clock()
    table = ClientTable(2, slots=WINDOW)  # one window for every address
    writer, reader = table.view(0, horizon=60, clock=clock), table.view(1, horizon=60, clock=clock)
    for i in range(WINDOW):
        writer.set_failures(f"192.0.2.{i}", 1, clock.now)
    writer.set_failures("198.51.100.1", 1, clock.now)  # no room: counted in its own worker only
    assert reader.other_failures("198.51.100.1", clock.now - 60) == 0
    clock.now += 61  # the first clients' failures have expired
    writer.set_failures("198.51.100.2", 1, clock.now)
    assert reader.other_failures("198.51.100.2", clock.now - 60) == 1


def test_freed_slot_does_not_hide_the_next_entry():
    table = ClientTable(2, slots=WINDOW)
    writer, reader = table.view(0, horizon=600), table.view(1, horizon=600)
    writer.set_sessions("192.0.2.1", 1)
    writer.set_sessions("192.0.2.2", 1)
    writer.set_sessions("192.0.2.1", 0)
    assert reader.other_sessions("192.0.2.2") == 1


def test_lockout_counts_failures_of_every_worker():
    clock = Clock()
    table = ClientTable(2)
    first = FailureLockout(3, 600, clock, shared=table.view(0, horizon=600, clock=clock))
    second = FailureLockout(3, 600, clock, shared=table.view(1, horizon=600, clock=clock))
    first.failed("192.0.2.5")
    first.failed("192.0.2.5")
    assert not second.is_locked("192.0.2.5")
    second.failed("192.0.2.5")
    assert first.is_locked("192.0.2.5") and second.is_locked("192.0.2.5")
    clock.now += 601  # expired everywhere
    assert not first.is_locked("192.0.2.5") and not second.is_locked("192.0.2.5")
