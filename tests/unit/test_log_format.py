"""relay.supervisor's log lines: the cached date gives the standard format's text."""

from __future__ import annotations

import logging

from relay.supervisor import LogFormatter

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
