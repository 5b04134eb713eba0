"""A damaged spool file, or one written by a newer relay, through the real
processes: one line naming the file and exit status 2 at start (no
traceback, no crash loop); ``relayctl spool check`` finds the damage."""

from __future__ import annotations

import json
import os
import signal
import sqlite3

from relay.spool import schema, testing
from relay.spool.format import FORMAT_VERSION
from support import inject, relayctl, wait_for

BODY = b"Subject: s\r\n\r\n" + (b"x" * 78 + b"\r\n") * 750  # 60 KB


def failed_start(relay) -> list[str]:
    """Start; the supervisor must exit 2.  Its log lines."""
    relay.start(wait=False)
    assert relay.proc.wait(30) == 2, relay.log()
    log = relay.log()
    assert "Traceback" not in log, log
    return log.splitlines()


def garbage(path: str) -> None:
    with open(path, "r+b" if os.path.exists(path) else "wb") as file:
        file.write(b"definitely not SQLite " * 200)


def spool_file(relay, worker: int) -> str:
    return os.path.join(relay.spool_dir, f"worker-{worker}.db")


def test_a_spool_file_of_garbage_stops_the_start(relay_factory):
    relay = relay_factory(workers=2)
    os.makedirs(relay.spool_dir)
    garbage(spool_file(relay, 1))
    lines = failed_start(relay)
    [line] = [line for line in lines if spool_file(relay, 1) in line]
    assert line.endswith(f"spool file {spool_file(relay, 1)} is damaged: file is not a database"
                         " (`relayctl spool check` lists the problems)")
    assert line == lines[-1]


def test_a_truncated_spool_stops_the_start(relay_factory):
    relay = relay_factory(workers=1).start()
    for _ in range(30):  # about 2 MB waiting (nothing resolves: no delivery)
        inject(relay, "app@sender.example", ["someone@d1.example"], BODY)
    assert relay.stop() == 0
    path = spool_file(relay, 0)
    assert not os.path.exists(path + "-wal")  # checkpointed: the .db holds it all
    os.truncate(path, os.path.getsize(path) // 2)
    lines = failed_start(relay)
    assert lines[-1].endswith(f"spool file {path} is damaged: database disk image is malformed"
                              " (`relayctl spool check` lists the problems)")
    check = relayctl(relay, "spool", "check", "--json")
    assert check.returncode == 1
    assert json.loads(check.stdout) == {"ok": False, "files": [
        {"file": "worker-0.db", "ok": False, "problems": ["database disk image is malformed"]}]}


def test_a_spool_of_a_newer_format_is_refused(relay_factory):
    relay = relay_factory(workers=1).start()
    assert relay.stop() == 0
    path = spool_file(relay, 0)
    testing.set_version(path, "99")
    lines = failed_start(relay)
    assert lines[-1].endswith(f"spool file {path} has format version 99, newer than this"
                              f" relay's ({FORMAT_VERSION}): run the relay that wrote it")
    assert schema.recorded_version(sqlite3.connect(path), path) == 99


def test_a_restarted_worker_whose_spool_was_damaged_says_so_in_one_line(relay_factory):
    relay = relay_factory(workers=2).start()
    garbage(spool_file(relay, 1))  # in place, under the running worker
    os.kill(relay.worker_pids()[1], signal.SIGKILL)
    message = f"worker 1 cannot run: spool file {spool_file(relay, 1)} is damaged"
    wait_for(lambda: message in relay.log(), timeout=15, what="the worker's error")
    assert "Traceback" not in relay.log()


def test_spool_check_says_ok_per_file_then_names_the_damaged_one(relay_factory):
    relay = relay_factory(workers=2).start()
    inject(relay, "app@sender.example", ["someone@d1.example", "else@d2.example"], BODY)
    running = relayctl(relay, "spool", "check")
    assert (running.returncode, running.stdout) == (0, "worker-0.db: ok\nworker-1.db: ok\n")
    assert relay.stop() == 0
    garbage(spool_file(relay, 0))
    offline = relayctl(relay, "spool", "check", "--quick")
    assert offline.returncode == 1
    assert offline.stdout == "worker-0.db: file is not a database\nworker-1.db: ok\n"
