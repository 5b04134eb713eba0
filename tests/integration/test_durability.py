"""The durability contract with real processes: a 250 means the mail is on
disk, whatever is killed, restarted, re-sized or runs out of space."""

from __future__ import annotations

import glob
import os
import random
import resource
import signal
import smtplib
import threading
import time

from support import read_spool, recipients_by_id

DOMAINS = [f"d{i}.example" for i in range(24)]


class Injector:
    """Threads that send mail until told to stop and record every 250."""

    def __init__(self, port: int, threads: int = 6, max_per_thread: int = 400) -> None:
        self.port = port
        self.acked: dict[str, set[str]] = {}
        self.refused = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(n, max_per_thread), daemon=True)
            for n in range(threads)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(60)

    def _run(self, n: int, limit: int) -> None:
        rng = random.Random(n)
        smtp = None
        for i in range(limit):
            if self._stop.is_set():
                break
            rcpts = [f"u{n}-{i}-{k}@{rng.choice(DOMAINS)}" for k in range(rng.randint(1, 3))]
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
                    smtp.ehlo()
                smtp.mail(f"app{n}@sender.example")
                for rcpt in rcpts:
                    smtp.rcpt(rcpt)
                code, text = smtp.data(f"Subject: {n}-{i}\r\n\r\nbody {n}-{i}\r\n".encode())
                if code == 250:
                    with self._lock:
                        self.acked[text.split()[-1].decode()] = set(rcpts)
                else:
                    self.refused += 1
            except (smtplib.SMTPException, OSError):
                self.refused += 1
                if smtp is not None:
                    try:
                        smtp.close()
                    except OSError:
                        pass
                smtp = None
                time.sleep(0.05)
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass


def assert_homed(spool_dir: str, workers: int) -> None:
    for message in read_spool(spool_dir):
        assert message.state == 1, f"{message.queue_id} still held"
        assert message.body is not None
        for address, slot in message.recipients:
            assert slot % workers == message.worker, (address, slot, message.worker)


def test_sigkill_of_workers_loses_no_acknowledged_message(relay_factory):
    relay = relay_factory(workers=2).start()
    injector = Injector(relay.port)
    injector.start()
    kills = 0
    rng = random.Random(7)
    for _ in range(4):
        time.sleep(1.0)
        pids = relay.worker_pids()
        victim = rng.choice(pids)
        signal_sent = False
        try:
            os.kill(victim, signal.SIGKILL)
            signal_sent = True
        except ProcessLookupError:
            pass
        kills += signal_sent
        relay.wait_log("killed by signal 9", count=kills)
        relay.wait_log(" restarted (pid", count=kills)
    time.sleep(1.0)
    injector.stop()
    assert kills == 4
    assert len(injector.acked) > 50, (len(injector.acked), injector.refused)
    print(f"acked={len(injector.acked)} refused={injector.refused}")
    assert relay.stop() == 0
    # A second start settles what the kills left held, as any restart would.
    relay.start()
    assert relay.stop() == 0
    spooled = recipients_by_id(relay.spool_dir)
    lost = {qid: rcpts - spooled.get(qid, set()) for qid, rcpts in injector.acked.items()}
    lost = {qid: missing for qid, missing in lost.items() if missing}
    assert lost == {}, f"{len(lost)} acknowledged messages lost recipients"
    for qid, rcpts in injector.acked.items():
        assert spooled[qid] == rcpts  # and no recipient was added
    assert_homed(relay.spool_dir, 2)


def test_restart_with_another_worker_count_rehomes_every_message(relay_factory):
    relay = relay_factory(workers=2).start()
    injector = Injector(relay.port, threads=3, max_per_thread=40)
    injector.start()
    injector.join()
    assert len(injector.acked) == 120
    assert relay.stop() == 0
    for workers in (3, 1, 2):
        relay.workers = workers
        relay.write_config()
        relay.start()
        assert relay.stop() == 0
        assert recipients_by_id(relay.spool_dir) == injector.acked
        assert_homed(relay.spool_dir, workers)
        assert {m.worker for m in read_spool(relay.spool_dir)} <= set(range(workers))
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(relay.spool_dir, "*.db"))) == [
        "worker-0.db",
        "worker-1.db",
    ]


def _limit_file_size() -> None:
    # Any file the relay grows past 3 MB fails with EFBIG, as a full disk
    # fails with ENOSPC: the write and its commit fail for real.
    limit = 3 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_spool_write_failure_answers_451_and_leaves_nothing_half_written(relay_factory):
    relay = relay_factory(workers=1)
    relay.preexec_fn = _limit_file_size
    relay.start()
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200  # ~200 KB
    acked, failures = set(), []
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        smtp.ehlo()
        for i in range(40):
            smtp.mail("app@sender.example")
            smtp.rcpt(f"r{i}@{DOMAINS[i % len(DOMAINS)]}")
            code, text = smtp.data(body)
            if code == 250:
                acked.add(text.split()[-1].decode())
            else:
                failures.append((code, text))
                if len(failures) >= 3:
                    break
    assert failures, "the file size limit was never reached"
    for code, text in failures:
        assert (code, text) == (451, b"4.3.0 Temporary failure, try again later")
    assert relay.stop() == 0
    spool = read_spool(relay.spool_dir)
    assert {m.queue_id for m in spool} == acked
    for message in spool:
        assert len(message.body) > len(body) and len(message.recipients) == 1
