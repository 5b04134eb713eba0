"""relay.supervisor's log lines: the cached date gives the standard format's
text, and a worker's lines go out once per turn of its event loop."""

from __future__ import annotations

import asyncio
import logging

from relay.supervisor import LogFormatter, TurnHandler

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


def test_lines_still_waiting_are_written_when_logging_shuts_down():
    logger, handler, stream = turn_logger("shutdown")

    async def main():
        logger.info("the last line")
        handler.flush()  # what logging.shutdown() does before the loop's turn ends

    asyncio.run(main())
    assert stream.writes == ["INFO the last line\n"]
