"""Traffic shaping through the real processes, against the fake internet:
site limits and rates as the sink sees them, a receiver that refuses extra
connections, rules that fire, show in `relayctl shaping` and are
cancelled, and held mail that keeps its attempts."""

from __future__ import annotations

import json
import smtplib
import time

import pytest

from relay.route.shard import owner_of, slot_of
from relay.testing.fakenet import Behaviour, Rule
from support import deliver_relay, events, relayctl, wait_events, wait_for

pytestmark = pytest.mark.slow

BODY = b"From: app@sender.example\r\nSubject: shaped\r\n\r\nhello\r\n"


def inject_many(relay, recipients: list[str]) -> None:
    """One message per recipient over one SMTP session."""
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        for rcpt in recipients:
            smtp.sendmail("app@sender.example", [rcpt], BODY)


def test_connection_limit_and_message_rate_hold_at_the_sink(relay_factory, net):
    [sink] = net.add_domain("rate.example", ["127.0.0.20"], behaviour=Behaviour(reply_delay=0.01))
    relay = deliver_relay(relay_factory, net, workers=2, shaping={
        "rate.example": {"connection_limit": 3, "max_message_rate": "20/s"}})
    inject_many(relay, [f"r{i}@rate.example" for i in range(600)])
    sink.wait_received(600, timeout=60)
    wait_events(relay, lambda e: e["outcome"] == "delivered", count=600)
    delivered = [e["time"] for e in events(relay) if e["outcome"] == "delivered"]
    assert len(delivered) == 600
    rate = (len(delivered) - 1) / (max(delivered) - min(delivered))
    print(f"\n600 messages at {rate:.1f} msg/s, peak {sink.peak_sessions} connections")
    assert 17 <= rate <= 22
    assert sink.peak_sessions <= 3


def domains_of_both_workers(workers=2) -> list[str]:
    found = {}
    for i in range(100):
        domain = f"s{i}.example"
        found.setdefault(owner_of(slot_of(domain), workers), domain)
        if len(found) == workers:
            return list(found.values())
    raise AssertionError("no domains for every worker")


def test_site_shared_by_two_workers_never_exceeds_its_limit(relay_factory, net):
    domains = domains_of_both_workers()
    net.add_host("mx.shared.example", "127.0.0.21", Behaviour(reply_delay=0.05))
    for domain in domains:
        net.dns.add_mx(domain, [(10, "mx.shared.example")])
    sink = net.farm.sinks["127.0.0.21"]
    relay = deliver_relay(relay_factory, net, workers=2, shaping={
        "mx:.shared.example": {"connection_limit": 4}})
    inject_many(relay, [f"r{i}@{domains[i % 2]}" for i in range(300)])
    sink.wait_received(300, timeout=60)
    print(f"\nshared site: peak {sink.peak_sessions} connections for a limit of 4")
    assert sink.peak_sessions <= 4


def test_receiver_refusing_extra_connections_gets_everything_with_few_421s(relay_factory, net):
    [sink] = net.add_domain("busy.example", ["127.0.0.22"],
                            behaviour=Behaviour(max_connections=2, reply_delay=0.01))
    relay = deliver_relay(relay_factory, net, workers=1)
    inject_many(relay, [f"r{i}@busy.example" for i in range(300)])
    sink.wait_received(300, timeout=90)
    wait_events(relay, lambda e: e["outcome"] == "delivered", count=300)
    outcomes = [e["outcome"] for e in events(relay) if e.get("recipient")]
    print(f"\n300 delivered with {sink.busy_refusals} 421s over 2 connections,"
          f" {outcomes.count('deferred')} deferrals")
    assert outcomes.count("delivered") == 300 and "bounced" not in outcomes
    assert sink.busy_refusals <= 20


RULE = {"regex": "(?i)rate limited", "action": "suspend", "duration": "3s"}


def test_rule_fires_shows_in_relayctl_is_cancelled_and_held_mail_keeps_its_attempts(
        relay_factory, net):
    [sink] = net.add_domain("limited.example", ["127.0.0.23"], behaviour=Behaviour(
        rules=[Rule("first@", "451 4.7.1 You are rate limited, slow down", at="RCPT")]))
    relay = deliver_relay(relay_factory, net, workers=1,
                          shaping={"rules": [{**RULE, "duration": "1h"}]},
                          deliver={"retry_schedule": ["1h"]})
    inject_many(relay, ["first@limited.example"])
    wait_events(relay, lambda e: e["outcome"] == "effect_started")
    listed = json.loads(relayctl(relay, "shaping", "--json").stdout)
    (effect,) = listed["effects"]
    assert effect["kind"] == "suspend" and effect["site"] == "mx1.limited.example"
    assert "rate limited" in effect["reason"] and "rule 1" in effect["reason"]
    assert 3500 < effect["expires"] - effect["since"] <= 3600
    # Held: mail to the site waits, no attempt is used.
    inject_many(relay, ["second@limited.example"])
    time.sleep(1.5)
    assert [r.rcpt_tos for r in sink.received] == []
    text = relayctl(relay, "shaping").stdout
    assert "suspend" in text and "rate limited" in text
    cancel = relayctl(relay, "shaping", "cancel", str(effect["id"]))
    assert cancel.returncode == 0, cancel.stderr
    [received] = sink.wait_received(1, timeout=20)
    assert received.rcpt_tos == ("second@limited.example",)
    wait_events(relay, lambda e: e["outcome"] == "effect_ended")
    assert json.loads(relayctl(relay, "shaping", "--json").stdout)["effects"] == []
    second = [e for e in events(relay) if e.get("recipient") == "second@limited.example"]
    assert [e["outcome"] for e in second] == ["delivered"]  # one attempt: the hold cost none
    assert relayctl(relay, "shaping", "cancel", str(effect["id"])).returncode == 1


def test_suspended_mail_goes_when_the_effect_ends_without_an_attempt(relay_factory, net):
    [sink] = net.add_domain("paused.example", ["127.0.0.24"], behaviour=Behaviour(
        rules=[Rule("first@", "451 4.7.1 rate limited", at="RCPT")]))
    relay = deliver_relay(relay_factory, net, workers=1, shaping={"rules": [RULE]},
                          deliver={"retry_schedule": ["1h"]})
    inject_many(relay, ["first@paused.example"])
    wait_events(relay, lambda e: e["outcome"] == "effect_started")
    inject_many(relay, ["second@paused.example"])
    started = time.monotonic()
    [received] = sink.wait_received(1, timeout=20)
    assert time.monotonic() - started >= 1.0  # held until the 3 s suspension ended
    assert received.rcpt_tos == ("second@paused.example",)
    wait_for(lambda: any(e["outcome"] == "effect_ended" for e in events(relay)),
             what="the end of the effect in the delivery log")
