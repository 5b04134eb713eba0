"""relay.supervisor's log lines: the cached date gives the standard format's
text, and a worker's lines go out once per turn of its event loop."""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import weakref

from relay.supervisor import LogFormatter, TurnHandler, _pieces

FORMAT = "%(asctime)s relay[worker 0] %(levelname)s %(name)s: %(message)s"


def record(created: float) -> logging.LogRecord:
    made = logging.LogRecord("relay.intake", logging.INFO, __file__, 1, "queued %s", ("A1",), None)
    made.created, made.msecs = created, (created - int(created)) * 1000
    return made


def test_lines_are_those_of_the_standard_formatter_across_seconds():
    ours, standard = LogFormatter(FORMAT), logging.Formatter(FORMAT)
    for created in (1_800_000_000.123, 1_800_000_000.999, 1_800_000_001.0, 1_800_000_001.5,
                    1_800_000_000.5, 1_800_086_400.042):
        assert ours.format(record(created)) == standard.format(record(created))


# -- TurnHandler: a worker's lines, one write per turn of its loop ----------------------------


class Recording:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def turn_logger(name: str):
    stream = Recording()
    handler = TurnHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"relay.test.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, handler, stream


def test_the_lines_of_one_loop_turn_go_out_in_one_write_at_its_end():
    logger, _, stream = turn_logger("turn")

    async def main():
        logger.info("one")
        logger.info("two")
        before = list(stream.writes)
        await asyncio.sleep(0)
        logger.info("three")
        await asyncio.sleep(0)
        return before

    assert asyncio.run(main()) == []
    assert stream.writes == ["INFO one\nINFO two\n", "INFO three\n"]


def test_a_warning_goes_out_at_once_after_the_lines_before_it():
    logger, _, stream = turn_logger("warning")

    async def main():
        logger.info("accepted")
        logger.warning("not accepted")
        return list(stream.writes)

    assert asyncio.run(main()) == ["INFO accepted\nWARNING not accepted\n"]


def test_outside_a_running_loop_a_line_goes_out_at_once():
    logger, _, stream = turn_logger("thread")
    logger.info("from the writer thread")
    assert stream.writes == ["INFO from the writer thread\n"]


def test_a_line_from_another_thread_goes_out_at_once_with_those_waiting():
    logger, _, stream = turn_logger("thread-while-due")

    async def main():
        logger.info("from the loop")
        thread = threading.Thread(target=logger.info, args=("from the writer thread",))
        thread.start()
        thread.join()
        return list(stream.writes)

    assert asyncio.run(main()) == ["INFO from the loop\nINFO from the writer thread\n"]


def _log_as_the_loop_stops(logger, text: str) -> None:
    """Log in a loop's last turn: the flush it schedules never runs."""
    loop = asyncio.new_event_loop()

    def last_words():
        logger.info(text)
        loop.stop()  # callbacks scheduled in this turn do not run

    loop.call_soon(last_words)
    loop.run_forever()
    loop.close()


def test_lines_still_waiting_when_the_loop_ends_are_written_at_shutdown():
    logger, handler, stream = turn_logger("shutdown")
    _log_as_the_loop_stops(logger, "the last line")
    assert stream.writes == []
    logging.shutdown([weakref.ref(handler)])
    assert stream.writes == ["INFO the last line\n"]


def test_a_flush_due_on_a_loop_that_stopped_is_scheduled_again_on_the_next():
    logger, _, stream = turn_logger("two-loops")
    _log_as_the_loop_stops(logger, "one")

    async def log(text):
        logger.info(text)

    asyncio.run(log("two"))  # its own flush, though the first loop's never ran
    assert stream.writes == ["INFO one\nINFO two\n"]


def test_each_write_stays_within_pipe_buf_and_ends_a_line():
    lines = [f"line {i:04} " + "x" * 90 for i in range(200)] + ["é" * 3000, "y" * 5000]
    pieces = list(_pieces(lines, "\n"))
    assert "".join(pieces) == "\n".join(lines) + "\n"
    assert all(piece.endswith("\n") for piece in pieces)
    assert all(len(piece.encode()) <= select.PIPE_BUF for piece in pieces[:-2])
    assert pieces[-1] == "y" * 5000 + "\n"  # a longer line goes alone
    assert pieces[-2] == "é" * 3000 + "\n"  # 6,000 bytes, 3,000 characters: alone too
