"""The spool owns its schema (DESIGN.md, "The spool"): no SQL against the
spool's tables outside relay/spool.

Every source file under relay/, perf/ and tests/ is searched for SQL that
names one of the tables relay.spool.schema declares (``FROM recipient``,
``UPDATE message``, ``JOIN event``, ...) and for any ``INSERT INTO``.  What
relayctl, perf/ and the tests read goes through relay.spool.read; what
tests must write by hand (states, events, another format version) through
relay.spool.testing; perf/'s synthetic spool through relay.spool.bulk.

Outside the rule: relay/spool itself, and tests/unit/spool, the spool's
own white-box tests, which check the rows the store writes next to the
code that writes them.  ``ALLOWED`` names any other file, with its reason.
"""

from __future__ import annotations

import os
import re

from relay.spool import schema

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEARCHED = ("relay", "perf", "tests")
OWNERS = (os.path.join("relay", "spool"), os.path.join("tests", "unit", "spool"))
# path (from the repository root) -> why it may hold SQL against the spool
ALLOWED: dict[str, str] = {
    os.path.join("tests", "unit", "test_spool_sql.py"): "this test: the SQL it must recognise",
}

TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", schema.SCHEMA))
SPOOL_SQL = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE)\s+(?:%s)\b|\bINSERT\s+(?:OR\s+\w+\s+)?INTO\b"
    % "|".join(TABLES)
)


def sources():
    for top in SEARCHED:
        for directory, subdirs, files in os.walk(os.path.join(ROOT, top)):
            subdirs[:] = [d for d in subdirs if not d.startswith((".", "__pycache__"))]
            for name in files:
                if name.endswith((".py", ".sh", ".pyx")) or "." not in name:
                    path = os.path.join(directory, name)
                    yield os.path.relpath(path, ROOT), path


def offences(text: str) -> list[tuple[int, str]]:
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if SPOOL_SQL.search(line)]


def test_the_pattern_knows_the_tables_and_finds_sql():
    assert {"message", "recipient", "event", "body", "meta"} <= set(TABLES)
    for line in ('"SELECT id FROM message"', "INSERT OR IGNORE INTO meta VALUES", '"DELETE FROM event"',
                 "UPDATE recipient SET state = ?", " JOIN event e ON"):
        assert offences(line), line
    for line in ("# a line from message text", "SELECT 1 FROM sqlite_master", "the recipient's"):
        assert not offences(line), line


def test_no_sql_against_the_spool_outside_relay_spool():
    found = []
    for relative, path in sources():
        if relative.startswith(OWNERS) or relative in ALLOWED:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            found += [f"{relative}:{number}: {line}" for number, line in offences(f.read())]
    assert not found, ("SQL against the spool's tables outside relay/spool (use"
                       " relay.spool.read, relay.spool.testing or relay.spool.bulk):\n"
                       + "\n".join(found))


def test_the_owners_do_hold_the_sql():
    # The search would pass vacuously if it looked at nothing.
    with open(os.path.join(ROOT, "relay", "spool", "read.py"), encoding="utf-8") as f:
        assert offences(f.read())
    assert sum(1 for _ in sources()) > 50
    assert all(os.path.exists(os.path.join(ROOT, path)) for path in ALLOWED)
