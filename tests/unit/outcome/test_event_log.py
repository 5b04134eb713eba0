"""The delivery log's file: one write per loop turn, at once without a loop,
nothing left behind at a reopen or a close."""

from __future__ import annotations

import asyncio
import json

from relay.model import Event
from relay.outcome.events import EventLog


def event(n: int) -> Event:
    return Event.local(1_700_000_000.0 + n, f"Q{n}", f"r{n}@example.net", "example.net",
                       "delivered", "delivered")


def lines(path) -> list[str]:
    return [json.loads(line)["queue_id"] for line in path.read_bytes().splitlines()]


def test_without_a_running_loop_a_line_is_in_the_file_at_once(tmp_path):
    log = EventLog(str(tmp_path), 3)
    log.write([event(1)])
    assert lines(tmp_path / "delivery-3.jsonl") == ["Q1"]
    log.close()


def test_the_lines_of_one_loop_turn_reach_the_file_together_at_its_end(tmp_path):
    path = tmp_path / "delivery-0.jsonl"
    log = EventLog(str(tmp_path), 0)
    writes = []
    real = log._file.raw.write
    log._file.raw.write = lambda data: writes.append(bytes(data)) or real(data)

    async def turn():
        for n in range(3):
            log.write([event(n)])
        before = lines(path)
        await asyncio.sleep(0)  # the end of this turn
        return before

    assert asyncio.run(turn()) == []
    assert lines(path) == ["Q0", "Q1", "Q2"]
    assert len(writes) == 1
    log.close()


def test_a_reopen_and_a_close_leave_no_line_behind(tmp_path):
    async def run():
        log = EventLog(str(tmp_path / "a"), 0)
        log.write([event(1)])
        log.reopen(str(tmp_path / "b"))  # a reload that moves the log
        log.write([event(2)])
        log.close()
        await asyncio.sleep(0)  # the pending flush finds the file closed

    asyncio.run(run())
    assert lines(tmp_path / "a" / "delivery-0.jsonl") == ["Q1"]
    assert lines(tmp_path / "b" / "delivery-0.jsonl") == ["Q2"]
