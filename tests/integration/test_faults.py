"""Fault injection through the real processes: a broken network between the
relay and its MX (a fault-injecting proxy), a full disk, SIGKILL of the
supervisor and of workers, a stopped worker.  Each test counts, by
Message-ID at the sinks, the acknowledged mail that was lost (must be 0)
and the duplicates (printed: at-least-once delivery allows them where a
remote 250 was not seen or not recorded)."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import smtplib
import time

import pytest

from relay.route.forward import HELD_CHECK_INTERVAL, HELD_GRACE, REQUEST_TIMEOUT
from relay.route.shard import owner_of, slot_of
from relay.spool.format import MessageState
from relay.stats import ring
from relay.testing.faultproxy import DOT, REPLACE, RESET, STALL, STARTTLS, Fault, FaultProxy
from relay.testing.fakenet import Behaviour
from support import (Injector, SmallDisk, deliver_relay, events, message_id_of, process_gone,
                     read_spool, tally, wait_events, wait_for, worker_pid)

# Short timeouts so that a stalled server costs seconds, not minutes.
FAST = {"retry_schedule": ["1s"], "connect_timeout": "2s", "command_timeout": "2s",
        "data_timeout": "2s"}


def message(n: int, rcpt: str) -> bytes:
    return (f"From: app@sender.example\r\nTo: {rcpt}\r\nMessage-ID: <{n}@faults.test>\r\n"
            f"Subject: fault {n}\r\n\r\nbody {n}\r\n").encode()


def send(relay, rcpts: list[str]) -> dict[str, set[str]]:
    """One message per recipient over one session; every one must get 250."""
    acked = {}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        for n, rcpt in enumerate(rcpts):
            assert smtp.sendmail("app@sender.example", [rcpt], message(n, rcpt)) == {}
            acked[f"<{n}@faults.test>"] = {rcpt}
    return acked


def assert_no_crash(relay) -> None:
    log = relay.log()
    assert "delivery task failed" not in log and " restarted (pid" not in log, log[-3000:]


# -- a broken network: the fault proxy between the relay and the sink ---------------

GARBAGE = b"\x00\xff\xfe hello? \x80\x81\r\n"
OVERLONG_LINE = b"250 " + b"x" * 70000  # no line end: past any reply line limit
ENDLESS_REPLY = b"250-more\r\n" * 5000  # continuation lines that never end

PROXY_FAULTS = {
    # name: (fault, TLS mode of the domain, the deferral's text, at-least-once duplicates possible)
    "reset-after-dot": (Fault(RESET, after=DOT), "none", "connection lost", True),
    "stall-mid-dot-reply": (Fault(STALL, after=DOT, keep=2), "none", "timeout at dot", True),
    "stall-mid-greeting": (Fault(STALL, keep=2), "none", "timeout at greeting", False),
    "garbage-greeting": (Fault(REPLACE, data=GARBAGE), "none", "malformed reply line", False),
    "overlong-dot-reply": (Fault(REPLACE, after=DOT, data=OVERLONG_LINE), "none",
                           "reply line too long", True),
    "endless-dot-reply": (Fault(REPLACE, after=DOT, data=ENDLESS_REPLY), "none",
                          "too many lines", True),
    # KumoMTA issue 577: the 220 to STARTTLS arrives, the handshake never does.
    "stall-tls-handshake": (Fault(STALL, after=STARTTLS, skip_lines=1), "required",
                            "TLS handshake failed", False),
}
MESSAGES = 4


@pytest.mark.parametrize("name", list(PROXY_FAULTS))
def test_proxy_fault_then_recovery_delivers_every_message(relay_factory, net, name):
    fault, tls, deferral, may_duplicate = PROXY_FAULTS[name]
    sink = net.farm.add_sink("127.0.0.10", Behaviour(tls="off" if tls == "none" else "on"))
    started = time.monotonic()
    with FaultProxy(("127.0.0.10", net.mx_port)) as proxy:
        proxy.fault = fault
        relay = deliver_relay(relay_factory, net, workers=1, deliver=FAST,
                              routes={"p.example": proxy.address}, tls_policy={"p.example": tls})
        acked = send(relay, [f"r{n}@p.example" for n in range(MESSAGES)])
        # Every message meets the fault at least once, and is deferred for it.
        deferred = wait_events(relay, lambda e: e["outcome"] == "deferred", count=MESSAGES,
                               timeout=30)
        assert all(deferral in e["text"] and e["code"] == 0 for e in deferred), deferred
        assert proxy.hits >= 1
        proxy.fault = None  # the network heals
        wait_for(lambda: not tally([sink], acked)[0], timeout=30, what="every message delivered")
        delivered = wait_events(relay, lambda e: e["outcome"] == "delivered", count=MESSAGES)
        assert {e["recipient"] for e in delivered} == {r for rcpts in acked.values() for r in rcpts}
        if tls != "none":
            assert all(received.tls for received in sink.received)
        assert_no_crash(relay)
        assert relay.stop() == 0  # no session hangs the drain
    lost, duplicates = tally([sink], acked)
    print(f"\n{name}: acked={len(acked)} lost={len(lost)} duplicates={duplicates} "
          f"faulted connections={proxy.hits} in {time.monotonic() - started:.1f}s")
    assert lost == {}
    assert read_spool(relay.spool_dir) == []  # nothing left behind, nothing marked wrongly
    if not may_duplicate:
        assert duplicates == 0  # the fault struck before the server had the message
    assert len([e for e in events(relay) if e["outcome"] == "delivered"]) == MESSAGES


def test_stalled_tls_handshake_falls_back_to_plaintext_when_opportunistic(relay_factory, net):
    sink = net.farm.add_sink("127.0.0.10", Behaviour(tls="on"))
    with FaultProxy(("127.0.0.10", net.mx_port)) as proxy:
        proxy.fault = Fault(STALL, after=STARTTLS, skip_lines=1)
        relay = deliver_relay(relay_factory, net, workers=1, deliver=FAST,
                              routes={"p.example": proxy.address})
        started = time.monotonic()
        acked = send(relay, ["r0@p.example"])
        [received] = sink.wait_received(1, timeout=15)
        took = time.monotonic() - started
        assert received.tls is False and proxy.hits == 1
        [event] = wait_events(relay, lambda e: e["outcome"] == "delivered")
        assert event["tls"] == 0
        assert took < 2 + 5, took  # one connect_timeout for the handshake, then plaintext
        assert "STARTTLS to 127.0.0.1" in relay.log() and "plaintext" in relay.log()
        assert relay.stop() == 0
    assert tally([sink], acked) == ({}, 0)


# -- a full disk while outcomes and DSNs are recorded ------------------------------


def test_disk_full_during_completion_and_dsn_loses_nothing_and_recovers(relay_factory, net, tmp_path):
    # The sinks greet after a delay: the relay has claimed the mail and
    # waits on the connection when the disk fills, so the disk is full when
    # it records what the servers said (delivered, or bounced with a DSN).
    slow = Behaviour(greeting_delay=2.0)
    [good] = net.add_domain("good.example", ["127.0.0.10"], behaviour=slow)
    [bad] = net.add_domain("bad.example", ["127.0.0.11"],
                           behaviour=Behaviour(greeting_delay=2.0, rules={".": "550 5.1.1 No such user"}))
    [sender_mx] = net.add_domain("sender.example", ["127.0.0.20"])
    disk = SmallDisk(str(tmp_path / "spool"), size="16m").mount()
    relay = None
    try:
        relay = deliver_relay(relay_factory, net, workers=1,
                              deliver={**FAST, "command_timeout": "10s"})
        good_rcpts = [f"g{n}@good.example" for n in range(8)]
        bad_rcpts = [f"b{n}@bad.example" for n in range(4)]
        acked = send(relay, good_rcpts + bad_rcpts)
        filled = disk.fill()
        full_at = time.monotonic()
        good.wait_received(len(good_rcpts), timeout=15)
        # Longer than the relay retries a failed write before it gives up
        # (15 s before the fix): the disk stays full for 18 s.
        relay.wait_log("outcome not recorded yet", timeout=15)
        relay.wait_log("could not be queued", timeout=15)
        time.sleep(max(0.0, 18.0 - (time.monotonic() - full_at)))
        assert sender_mx.received == []  # no DSN could be queued yet
        disk.free()
        freed_at = time.monotonic()
        # Space is back: every outcome gets recorded, every DSN sent, with no restart.
        sender_mx.wait_received(len(bad_rcpts), timeout=30)
        wait_for(lambda: {m.queue_id for m in read_spool(relay.spool_dir)
                          if any(a.endswith("@good.example") for a, _ in m.recipients)} == set(),
                 timeout=30, what="the delivered mail recorded and gone from the spool")
        recovered = time.monotonic() - freed_at
        assert "outcome not recorded:" not in relay.log()  # never given up while running
        assert_no_crash(relay)
        assert relay.stop() == 0
    finally:
        if relay is not None:
            relay.kill()
        disk.unmount()
    lost, duplicates = tally([good], {mid: r for mid, r in acked.items() if r <= set(good_rcpts)})
    dsn_for = [next(line.split(";")[1].strip() for line in dsn.data.decode().split("\r\n")
                    if line.startswith("Final-Recipient:")) for dsn in sender_mx.received]
    print(f"\ndisk full ({filled} bytes of ballast): acked={len(acked)} lost={len(lost)} "
          f"duplicates={duplicates} DSNs={len(dsn_for)} recovered {recovered:.1f}s after space returned")
    assert lost == {}
    assert bad.received == []
    assert sorted(dsn_for) == sorted(bad_rcpts)  # one DSN per bounce, none lost, none twice
    outcomes = {}
    for event in events(relay):
        outcomes.setdefault(event["recipient"], []).append(event["outcome"])
    for rcpt in good_rcpts:
        assert outcomes[rcpt][-1] == "delivered" and "bounced" not in outcomes[rcpt], outcomes[rcpt]
    for rcpt in bad_rcpts:  # never marked delivered; bounced only once its DSN was queued
        assert outcomes[rcpt][-1] == "bounced" and "delivered" not in outcomes[rcpt], outcomes[rcpt]


# -- SIGKILL of the supervisor and of workers during injection and delivery --------

KILL_DOMAINS = [f"k{i}.example" for i in range(6)]
ORPHAN_EXIT_WITHIN = 10.0 + 5.0  # the test relays' shutdown_timeout, and some slack


def wait_orphans_gone(relay, worker_pids: list[int]) -> float:
    """After the supervisor's SIGKILL its workers, told by PR_SET_PDEATHSIG,
    drain and exit by themselves (they hold the spool lock until then).
    Returns how long that took; kills the process group if they do not."""
    started = time.monotonic()
    try:
        wait_for(lambda: all(process_gone(pid) for pid in worker_pids),
                 timeout=ORPHAN_EXIT_WITHIN, what="the orphaned workers to exit by themselves")
    except AssertionError:
        try:
            os.killpg(relay.proc.pid, signal.SIGKILL)  # leave no orphan behind the test
        except ProcessLookupError:
            pass
        raise
    ring.remove(os.path.join(relay.directory, "run"))  # left by the killed supervisor
    return time.monotonic() - started


def test_sigkill_of_supervisor_and_workers_loses_no_acknowledged_mail(relay_factory, net):
    sinks = [net.add_domain(d, [f"127.0.0.{50 + i}"], behaviour=Behaviour(reply_delay=0.01))[0]
             for i, d in enumerate(KILL_DOMAINS)]
    relay = deliver_relay(relay_factory, net, workers=2)
    injector = Injector(relay.port, KILL_DOMAINS, threads=3, per_thread=10_000, timeout=5,
                        pause=0.01).start()
    started = time.monotonic()
    kills, orphan_exits = [], []
    for round_ in range(2):
        time.sleep(1.5)  # injection and delivery under way
        victim = random.Random(round_).choice(relay.worker_pids())
        os.kill(victim, signal.SIGKILL)  # one worker: the supervisor restarts it
        kills.append("worker")
        relay.wait_log(" restarted (pid")  # the log counts from the last start
        time.sleep(1.5)
        workers = relay.worker_pids()
        relay.proc.kill()  # SIGKILL to the supervisor alone
        relay.proc.wait(10)
        kills.append("supervisor")
        orphan_exits.append(wait_orphans_gone(relay, workers))
        relay.start()  # the injector's connections fail meanwhile, then resume
    time.sleep(1.5)
    injector.stop()
    assert len(injector.acked) > 100, (len(injector.acked), injector.refused[-5:])
    wait_for(lambda: not tally(sinks, injector.acked)[0], timeout=60,
             what="every acknowledged recipient delivered")
    assert_no_crash(relay)  # since the last start
    assert relay.stop() == 0
    lost, duplicates = tally(sinks, injector.acked)
    print(f"\nSIGKILL {', '.join(kills)}: acked={len(injector.acked)} refused={len(injector.refused)} "
          f"lost={len(lost)} duplicates={duplicates}; orphaned workers exited after "
          f"{', '.join(f'{t:.1f}s' for t in orphan_exits)}; in {time.monotonic() - started:.1f}s")
    assert lost == {}
    # At-least-once: only what was in flight at a kill can go twice.
    assert duplicates <= 20 * len(kills)


# -- SIGSTOP of one worker -------------------------------------------------------------


def domains_owned(worker: int, workers: int, count: int) -> list[str]:
    return [d for d in (f"s{i}.example" for i in range(200))
            if owner_of(slot_of(d), workers) == worker][:count]


def live_session(port: int, within: float = 20.0) -> smtplib.SMTP:
    """An SMTP session with a worker that greets.  SO_REUSEPORT may hand a
    connection to the stopped worker, which never greets: try another."""
    deadline = time.monotonic() + within
    while True:
        smtp = smtplib.SMTP(timeout=2)
        try:
            smtp.connect("127.0.0.1", port)
            smtp.ehlo()
            smtp.sock.settimeout(REQUEST_TIMEOUT + 15)  # now the replies may take long
            return smtp
        except (OSError, smtplib.SMTPException):
            if time.monotonic() > deadline:
                raise
            smtp.close()


def timed_send(port: int, rcpts: list[str], n: int) -> tuple[int, float, str]:
    """(code, seconds from DATA to its reply, Message-ID) of one message."""
    smtp = live_session(port)
    try:
        smtp.mail("app@sender.example")
        for rcpt in rcpts:
            assert smtp.rcpt(rcpt)[0] == 250
        started = time.monotonic()
        code, _ = smtp.data(message(n, rcpts[0]))
        return code, time.monotonic() - started, f"<{n}@faults.test>"
    finally:
        smtp.close()


def test_stopped_worker_gets_451_for_its_slots_then_catches_up(relay_factory, net):
    [stopped_domain] = domains_owned(1, 2, 1)
    [live_domain] = domains_owned(0, 2, 1)
    stopped_sink = net.add_domain(stopped_domain, ["127.0.0.60"])[0]
    live_sink = net.add_domain(live_domain, ["127.0.0.61"])[0]
    stopped_sink.stop_listening()  # its mail waits in worker 1's spool, deferred
    relay = deliver_relay(relay_factory, net, workers=2)
    acked = {}
    for n in range(5):
        code, _, message_id = timed_send(relay.port, [f"q{n}@{stopped_domain}"], n)
        assert code == 250
        acked[message_id] = {f"q{n}@{stopped_domain}"}
    wait_events(relay, lambda e: e["outcome"] == "deferred", count=5)
    victim = worker_pid(relay, 1)
    os.kill(victim, signal.SIGSTOP)
    stopped_sink.start_listening()  # up now: only worker 1 itself holds its mail back
    try:
        # Worker 1's slots, alone or with worker 0's, while it is stopped.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            refused = [pool.submit(timed_send, relay.port, rcpts, 100 + n) for n, rcpts in enumerate([
                [f"x0@{stopped_domain}"], [f"x1@{stopped_domain}"],
                [f"x2@{live_domain}", f"x2@{stopped_domain}"], [f"x3@{stopped_domain}"],
            ])]
            # Meanwhile worker 0's slots are served as usual.
            for n in range(10):
                code, took, message_id = timed_send(relay.port, [f"l{n}@{live_domain}"], 200 + n)
                assert code == 250 and took < 5, (code, took)
                acked[message_id] = {f"l{n}@{live_domain}"}
            refused = [future.result() for future in refused]
        for code, took, _ in refused:
            assert code == 451 and took <= REQUEST_TIMEOUT + 5, (code, took)
        assert not process_gone(victim)  # stopped, not dead: nobody restarted it
        assert stopped_sink.received == []
    finally:
        os.kill(victim, signal.SIGCONT)
    resumed = time.monotonic()
    # It catches up: its queue goes out, and its slots take mail again at once.
    for n in range(3):
        code, took, message_id = timed_send(relay.port, [f"a{n}@{stopped_domain}"], 300 + n)
        assert code == 250 and took < 5, (code, took)
        acked[message_id] = {f"a{n}@{stopped_domain}"}
    sinks = [stopped_sink, live_sink]
    wait_for(lambda: not tally(sinks, acked)[0], timeout=30, what="worker 1 caught up")
    caught_up = time.monotonic() - resumed
    # The parts it stored for the 451'd transactions after it woke are held,
    # never released: the coordinator says they were aborted, so they go.
    relay.wait_log("dropping a held part its coordinator never decided", count=len(refused),
                   timeout=HELD_GRACE + 3 * HELD_CHECK_INTERVAL)
    # The line is logged as the drop is handed to the spool's writer: its
    # commit may come a moment later.
    wait_for(lambda: all(m.state == MessageState.ACTIVE for m in read_spool(relay.spool_dir)),
             timeout=10, what="the dropped held parts gone from the spool")
    assert_no_crash(relay)
    assert relay.stop() == 0
    lost, duplicates = tally(sinks, acked)
    delivered_ids = {message_id_of(r.data) for sink in sinks for r in sink.received}
    refused_ids = {message_id for _, _, message_id in refused}
    print(f"\nSIGSTOP worker 1: acked={len(acked)} lost={len(lost)} duplicates={duplicates}; "
          f"451 after {', '.join(f'{took:.1f}s' for _, took, _ in refused)}; "
          f"caught up {caught_up:.1f}s after SIGCONT")
    assert lost == {} and duplicates == 0
    assert refused_ids.isdisjoint(delivered_ids)  # a 451 never leads to a delivery
    assert read_spool(relay.spool_dir) == []
