"""Quarantine through the real processes: a message whose delivery crashes
the worker is parked after ``deliver.quarantine_after`` crashes while the
rest of the mail goes out; ``relayctl show`` and ``queue`` report it and
``relayctl requeue --quarantined`` releases it.  The crash comes from the
delivery path's test hook, ``RELAY_TEST_CRASH_ON`` (relay/dispatch.py)."""

from __future__ import annotations

import json
import time

from support import deliver_relay, inject, relayctl, wait_events, wait_for

BODY = b"From: app@sender.example\r\nSubject: q\r\n\r\nHello.\r\n"


def delivered_to(sink) -> list[str]:
    return [rcpt for message in sink.received for rcpt in message.rcpt_tos]


def show(relay, queue_id: str) -> dict:
    result = relayctl(relay, "show", queue_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_message_that_crashes_delivery_is_quarantined_then_released(relay_factory, net,
                                                                      monkeypatch):
    [sink] = net.add_domain("d1.example", ["127.0.0.10"])
    monkeypatch.setenv("RELAY_TEST_CRASH_ON", "poison@")
    relay = deliver_relay(relay_factory, net, deliver={"quarantine_after": 3})
    poison = inject(relay, "app@sender.example", ["poison@d1.example"], BODY)
    good = [f"ok{i}@d1.example" for i in range(6)]
    for address in good[:3]:  # sent while the worker crashes (and restarts)
        wait_for(lambda: _accepts(relay, address), timeout=20, what="the relay to take mail")
    wait_events(relay, lambda e: e["outcome"] == "quarantined", timeout=40)
    for address in good[3:]:  # and after
        wait_for(lambda: _accepts(relay, address), timeout=20, what="the relay to take mail")
    wait_for(lambda: set(good) <= set(delivered_to(sink)), timeout=20, what="the good mail")
    time.sleep(1.5)  # time for another crash, if the loop went on
    assert relay.log().count("exited with status 70") == 3
    assert "poison@d1.example" not in delivered_to(sink)

    view = show(relay, poison)
    [recipient] = view["recipients"]
    assert (recipient["state"], recipient["crashes"], recipient["next_attempt"]) == (
        "quarantined", 3, None)
    assert recipient["error"] == f"RuntimeError: RELAY_TEST_CRASH_ON: delivery of {poison} crashes"
    assert [e["outcome"] for e in view["events"]] == ["crashed", "crashed", "quarantined"]
    text = relayctl(relay, "show", poison).stdout
    assert "quarantined" in text and "RuntimeError: RELAY_TEST_CRASH_ON" in text
    queue = json.loads(relayctl(relay, "queue", "--json").stdout)
    assert (queue["total"], queue["quarantined"], queue["quarantined_ids"]) == (0, 1, [poison])

    # Without the fault, a restart still leaves it parked: only requeue takes it back.
    assert relay.stop() == 0
    monkeypatch.delenv("RELAY_TEST_CRASH_ON")
    relay.start()
    time.sleep(1.5)
    assert "poison@d1.example" not in delivered_to(sink)
    released = relayctl(relay, "requeue", "--quarantined", poison.lower())
    assert (released.returncode, released.stdout.strip()) == (0, "1 quarantined recipients requeued")
    wait_for(lambda: "poison@d1.example" in delivered_to(sink), timeout=15, what="the released mail")
    again = relayctl(relay, "requeue", "--quarantined", poison)
    assert again.returncode == 1 and "no quarantined recipients" in again.stderr


def _accepts(relay, address: str) -> bool:
    try:
        inject(relay, "app@sender.example", [address], BODY)
        return True
    except (OSError, AssertionError):
        return False  # the worker died under the session, or 451 while it restarts
