"""Fault injection through the real processes: a broken network between the
relay and its MX (a fault-injecting proxy), a full disk, SIGKILL of the
supervisor and of workers, a stopped worker.  Each test counts, by
Message-ID at the sinks, the acknowledged mail that was lost (must be 0)
and the duplicates (printed: at-least-once delivery allows them where a
remote 250 was not seen or not recorded)."""

from __future__ import annotations

import time

import pytest

from relay.testing.faultproxy import DOT, REPLACE, RESET, STALL, STARTTLS, Fault, FaultProxy
from relay.testing.fakenet import Behaviour
from support import deliver_relay, events, read_spool, tally, wait_events, wait_for

# Short timeouts so that a stalled server costs seconds, not minutes.
FAST = {"retry_schedule": ["1s"], "connect_timeout": "2s", "command_timeout": "2s",
        "data_timeout": "2s"}


def message(n: int, rcpt: str) -> bytes:
    return (f"From: app@sender.example\r\nTo: {rcpt}\r\nMessage-ID: <{n}@faults.test>\r\n"
            f"Subject: fault {n}\r\n\r\nbody {n}\r\n").encode()


def send(relay, rcpts: list[str]) -> dict[str, set[str]]:
    """One message per recipient over one session; every one must get 250."""
    import smtplib

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
