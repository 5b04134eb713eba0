"""The delivery log's file: one write per loop turn, at once without a loop,
nothing left behind at a reopen, a close or a crash, and a full disk that
costs lines, never a delivery."""

from __future__ import annotations

import asyncio
import errno
import json
import logging

from relay.model import Event
from relay.outcome.events import EventLog


def event(n: int) -> Event:
    return Event.local(1_700_000_000.0 + n, f"Q{n}", f"r{n}@example.net", "example.net",
                       "delivered", "delivered")


def lines(path) -> list[str]:
    return [json.loads(line)["queue_id"] for line in path.read_bytes().splitlines()]


class Recording:
    """The log's file, with every write it is asked for kept."""

    def __init__(self, file, fail: OSError | None = None) -> None:
        self.file, self.fail, self.writes = file, fail, []
        self.name = file.name

    def write(self, data) -> int:
        self.writes.append(bytes(data))
        if self.fail is not None:
            raise self.fail
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


def test_without_a_running_loop_a_line_is_in_the_file_at_once(tmp_path):
    log = EventLog(str(tmp_path), 3)
    log.write([event(1)])
    assert lines(tmp_path / "delivery-3.jsonl") == ["Q1"]
    log.close()


def test_the_lines_of_one_loop_turn_reach_the_file_in_one_write_next_turn(tmp_path):
    path = tmp_path / "delivery-0.jsonl"
    log = EventLog(str(tmp_path), 0)
    log._file = recording = Recording(log._file)

    async def turn():
        for n in range(3):
            log.write([event(n)])
        before = lines(path)
        await asyncio.sleep(0)  # the next turn
        return before

    assert asyncio.run(turn()) == []
    assert lines(path) == ["Q0", "Q1", "Q2"]
    assert len(recording.writes) == 1
    log.close()


def test_a_flush_due_on_a_loop_that_stopped_does_not_hold_later_lines(tmp_path):
    path = tmp_path / "delivery-0.jsonl"
    log = EventLog(str(tmp_path), 0)
    loop = asyncio.new_event_loop()

    async def write_then_stop():
        log.write([event(1)])
        loop.stop()  # the flush it scheduled never runs

    loop.create_task(write_then_stop())
    loop.run_forever()
    loop.close()
    log.write([event(2)])  # no loop now: at once, with what was pending
    assert lines(path) == ["Q1", "Q2"]

    async def again():
        log.write([event(3)])
        await asyncio.sleep(0)

    asyncio.run(again())  # a new loop gets a flush of its own
    assert lines(path) == ["Q1", "Q2", "Q3"]
    log.close()


def test_flush_writes_the_pending_lines_at_once(tmp_path):
    """What a worker dying of a bug calls before os._exit."""
    path = tmp_path / "delivery-0.jsonl"
    log = EventLog(str(tmp_path), 0)

    async def crash_path():
        log.write([event(1)])
        log.flush()
        return lines(path)

    assert asyncio.run(crash_path()) == ["Q1"]
    log.close()


def test_a_reopen_and_a_close_leave_no_line_behind(tmp_path):
    async def run():
        log = EventLog(str(tmp_path / "a"), 0)
        log.write([event(1)])
        log.reopen(str(tmp_path / "b"))  # a reload that moves the log
        log.write([event(2)])
        log.close()
        await asyncio.sleep(0)  # the flush due finds nothing to write

    asyncio.run(run())
    assert lines(tmp_path / "a" / "delivery-0.jsonl") == ["Q1"]
    assert lines(tmp_path / "b" / "delivery-0.jsonl") == ["Q2"]


def test_a_full_disk_costs_the_lines_and_an_error_not_the_caller(tmp_path, caplog):
    log = EventLog(str(tmp_path), 0)
    log._file = Recording(log._file, fail=OSError(errno.ENOSPC, "No space left on device"))
    with caplog.at_level(logging.ERROR, logger="relay.deliver"):
        log.write([event(1)])  # no raise
    assert "events not written: [Errno 28] No space left on device" in caplog.text
    log._file = log._file.file
    log.write([event(2)])  # the disk has room again
    assert lines(tmp_path / "delivery-0.jsonl") == ["Q2"]
    log.close()
