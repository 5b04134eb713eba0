"""relayctl against a running relay: the stats ring's totals (also across a
worker's restart), every verb that changes the queue, /metrics."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest

from prometheus_client.parser import text_string_to_metric_families

from relay.cli.control import ControlError, request as control_request
from relay.route.shard import owner_of, slot_of
from relay.testing.fakenet import Behaviour, Rule
from support import (
    deliver_relay, free_port, inject, read_spool, relayctl, wait_events, wait_for,
)

BODY = b"From: app@sender.example\r\nSubject: stats\r\n\r\nbody\r\n"


def request(run_dir: str, message: dict, expect_ok: bool = True) -> str | dict:
    """The supervisor's answer (its error text when ``expect_ok`` is False)."""
    if expect_ok:
        return control_request(run_dir, message)
    with pytest.raises(ControlError) as refused:
        control_request(run_dir, message)
    return str(refused.value)


def stats(relay) -> dict:
    result = relayctl(relay, "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_stats_show_exact_totals_also_after_a_worker_restart(relay_factory, net):
    net.add_domain("ok.example", ["127.0.0.10"])
    net.add_domain("later.example", ["127.0.0.11"],
                   behaviour=Behaviour(rules=[Rule(".", "451 4.3.0 Try later")]))
    net.add_domain("gone.example", ["127.0.0.12"],
                   behaviour=Behaviour(rules=[Rule(".", "550 5.1.1 No such user")]))
    # One deferral each: the next attempt is an hour away.
    relay = deliver_relay(relay_factory, net, workers=2, deliver={"retry_schedule": ["1h"]})
    # From the null sender: no DSN adds to the figures.
    for i in range(5):
        inject(relay, "", [f"d{i}@ok.example"], BODY)
    for i in range(3):
        inject(relay, "", [f"l{i}@later.example"], BODY)
    for i in range(2):
        inject(relay, "", [f"b{i}@gone.example"], BODY)
    expected = {"accepted_messages": 10, "delivered": 5, "deferred": 3, "bounced": 2,
                "bounced_recipient": 2, "deferred_technical": 3, "dsn_queued": 0,
                # Each went from intake to its site in memory: no claim, no body read back.
                "claimed_at_intake": 10}

    def totals():
        counters = stats(relay)["counters"]
        return {k: counters[k] for k in expected}

    wait_for(lambda: totals() == expected, what=f"the totals {expected}")
    # The queue sizes are counted every few seconds.
    wait_for(lambda: stats(relay)["gauges"]["deferred_queue"] == 3, what="deferred_queue == 3")
    before = stats(relay)
    assert before["workers"] == 2
    assert before["histograms"]["data_to_250"]["p50"] is not None
    assert before["histograms"]["accept_to_delivered"]["p99"] is not None

    victim = relay.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    relay.wait_log(" restarted (pid")
    wait_for(lambda: stats(relay)["gauges"]["restarts"] >= 1, what="the restarted worker's publication")
    assert totals() == expected

    table = relayctl(relay, "stats")
    assert table.returncode == 0 and "delivered" in table.stdout and "workers 2" in table.stdout


def test_flush_retries_deferred_mail_now(relay_factory, net):
    [sink] = net.add_domain("later.example", ["127.0.0.11"],
                            behaviour=Behaviour(rules=[Rule(".", "451 4.3.0 Try later")]))
    relay = deliver_relay(relay_factory, net, deliver={"retry_schedule": ["1h"]})
    inject(relay, "app@sender.example", ["x@later.example"], BODY)
    wait_events(relay, lambda e: e["outcome"] == "deferred")
    sink.behaviour = Behaviour()
    result = relayctl(relay, "flush", "later.example", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["count"] == 1
    assert sink.wait_received(1, timeout=10)[0].rcpt_tos == ("x@later.example",)


def test_suspend_holds_a_domain_until_resume(relay_factory, net):
    [sink] = net.add_domain("held.example", ["127.0.0.12"])
    [other] = net.add_domain("flowing.example", ["127.0.0.14"])
    relay = deliver_relay(relay_factory, net, workers=2)
    result = relayctl(relay, "suspend", "held.example")
    assert result.returncode == 0 and "held.example" in result.stdout
    queue_id = inject(relay, "app@sender.example", ["x@held.example", "y@flowing.example"], BODY)
    assert other.wait_received(1, timeout=10)[0].rcpt_tos == ("y@flowing.example",)

    def held():
        shown = json.loads(relayctl(relay, "show", queue_id, "--json").stdout)
        return [r for r in shown["recipients"] if r["state"] == "held"]

    [recipient] = wait_for(held, 10, "the suspended recipient in the held state")
    assert recipient["address"] == "x@held.example" and recipient["attempts"] == 0
    assert sink.received == [], "a suspended domain got mail"
    assert relayctl(relay, "resume", "held.example").returncode == 0
    assert sink.wait_received(1, timeout=10)[0].rcpt_tos == ("x@held.example",)
    delivered = wait_events(relay, lambda e: e["recipient"] == "x@held.example"
                            and e["outcome"] == "delivered")
    assert len(delivered) == 1


def test_suspensions_are_listed_from_every_worker(relay_factory):
    relay = relay_factory(workers=2).start()
    # One domain owned by each worker.
    by_owner = {}
    for n in range(50):
        by_owner.setdefault(owner_of(slot_of(f"d{n}.example"), 2), f"d{n}.example")
    first, second = by_owner[0], by_owner[1]
    assert relayctl(relay, "suspend", first).returncode == 0
    both = relayctl(relay, "suspend", second)
    assert both.returncode == 0, both.stderr
    assert both.stdout.strip() == f"suspended domains: {', '.join(sorted([first, second]))}"
    listed = relayctl(relay, "suspend", "--list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["suspended"] == sorted([first, second])
    resumed = relayctl(relay, "resume", second, "--json")
    assert json.loads(resumed.stdout)["suspended"] == [first]
    assert relayctl(relay, "suspend", "--list").stdout.strip() == f"suspended domains: {first}"
    assert relayctl(relay, "suspend").returncode == 2  # neither a DOMAIN nor --list


def test_requeue_puts_bounced_recipients_back(relay_factory, net):
    [sink] = net.add_domain("gone.example", ["127.0.0.13"],
                            behaviour=Behaviour(rules=[Rule("^b", "550 5.1.1 No such user")]))
    relay = deliver_relay(relay_factory, net)
    inject(relay, "app@sender.example", ["bob@gone.example"], BODY)
    wait_events(relay, lambda e: e["outcome"] == "bounced" and e["recipient"] == "bob@gone.example")
    sink.behaviour = Behaviour()  # the mailbox exists after all
    nothing = relayctl(relay, "requeue", "--code", "451", "--json")
    assert json.loads(nothing.stdout)["count"] == 0
    result = relayctl(relay, "requeue", "--code", "550", "--recipient", "^bob@", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["count"] == 1
    assert sink.wait_received(1, timeout=10)[0].rcpt_tos == ("bob@gone.example",)


def test_requeue_without_a_filter_needs_all_and_dry_run_changes_nothing(relay_factory, net):
    [sink] = net.add_domain("gone.example", ["127.0.0.13"],
                            behaviour=Behaviour(rules=[Rule(".", "550 5.1.1 No such user")]))
    relay = deliver_relay(relay_factory, net, workers=2)
    for name in ("ann", "bob"):
        inject(relay, "", [f"{name}@gone.example"], BODY)
    wait_events(relay, lambda e: e["outcome"] == "bounced", count=2)
    sink.behaviour = Behaviour()

    refused = relayctl(relay, "requeue")
    assert refused.returncode == 2 and "--all" in refused.stderr
    assert "without a filter" in request(os.path.join(relay.directory, "run"), {"op": "requeue"},
                                         expect_ok=False)
    dry = relayctl(relay, "requeue", "--all", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["count"] == 2
    assert "2 recipients would be requeued" in relayctl(relay, "requeue", "--all", "--dry-run").stdout
    with pytest.raises(TimeoutError):
        sink.wait_received(1, timeout=2)  # nothing went back in the queue

    done = relayctl(relay, "requeue", "--all", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["count"] == 2
    assert len(sink.wait_received(2, timeout=10)) == 2


def test_delete_removes_a_message_with_an_event_per_recipient(relay_factory, net):
    net.dns.set_servfail("stuck.example")
    net.dns.set_servfail("other.example")
    relay = deliver_relay(relay_factory, net, workers=2, deliver={"retry_schedule": ["1h"]})
    queue_id = inject(relay, "app@sender.example", ["x@stuck.example", "y@other.example"], BODY)
    kept = inject(relay, "app@sender.example", ["z@stuck.example"], BODY)
    wait_events(relay, lambda e: e["outcome"] == "deferred", count=3)

    result = relayctl(relay, "delete", queue_id.lower(), "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["count"], answer["deleted"], answer["missing"]) == (1, [queue_id], [])
    deleted = wait_events(relay, lambda e: e["outcome"] == "deleted", count=2)
    assert sorted(e["recipient"] for e in deleted) == ["x@stuck.example", "y@other.example"]
    assert {e["queue_id"] for e in deleted} == {queue_id}
    assert relay.log().count(f"{queue_id}: deleted by the operator") >= 1

    shown = relayctl(relay, "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert "deleted by the operator" in shown.stdout
    assert "delivered or bounced" not in shown.stdout
    view = json.loads(relayctl(relay, "show", queue_id, "--json").stdout)
    assert view["deleted"] and not view["in_queue"]
    assert [e["outcome"] for e in view["events"]][-2:] == ["deleted", "deleted"]

    missing = relayctl(relay, "delete", "NOSUCHID", kept)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "relayctl: delete: no such message in any spool: NOSUCHID"
    assert missing.stdout.strip() == "1 messages deleted"
    relay.stop()
    assert [m for m in read_spool(relay.spool_dir) if m.queue_id in (queue_id, kept)] == []
    # The events table holds them too (what grep and report read).
    offline = json.loads(relayctl(relay, "grep", "@stuck.example", "--offline", "--json").stdout)
    assert sorted(e["recipient"] for e in offline["events"] if e["outcome"] == "deleted") == [
        "x@stuck.example", "z@stuck.example"]


def test_verbs_say_when_the_relay_is_not_running(relay_factory):
    relay = relay_factory(workers=1)
    for verb in (["stats"], ["flush"], ["suspend", "a.example"], ["delete", "X"],
                 ["requeue", "--all"]):
        result = relayctl(relay, *verb)
        assert result.returncode == 1, verb
        assert "not running" in result.stderr


def test_metrics_parse_as_prometheus_text(relay_factory, net):
    net.add_domain("ok.example", ["127.0.0.10"])
    port = free_port()
    relay = deliver_relay(relay_factory, net, stats={"metrics_address": f"127.0.0.1:{port}"})
    inject(relay, "app@sender.example", ["x@ok.example"], BODY)
    wait_events(relay, lambda e: e["outcome"] == "delivered")

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return {
                sample.name: sample.value
                for family in text_string_to_metric_families(response.read().decode())
                for sample in family.samples
                if not sample.labels or sample.name.endswith("_count")
            }

    samples = wait_for(lambda: (s := scrape()).get("relay_delivered_total") == 1 and s,
                       what="a scrape showing the delivery")
    assert samples["relay_accepted_messages_total"] == 1
    assert samples["relay_accept_to_delivered_seconds_count"] == 1
    assert samples["relay_workers"] == 1


def test_traced_mail_logs_every_step(relay_factory, net):
    net.add_domain("ok.example", ["127.0.0.10"])
    relay = deliver_relay(relay_factory, net, workers=2)
    result = relayctl(relay, "trace", "add", "Watched@ok.example", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["traced"] == ["watched@ok.example"]
    traced_by_header = inject(relay, "app@sender.example", ["plain@ok.example"],
                              b"X-Relay-Trace: 1\r\nSubject: t\r\n\r\nbody\r\n")
    traced_by_address = inject(relay, "app@sender.example", ["watched@ok.example"], BODY)
    untraced = inject(relay, "app@sender.example", ["other@ok.example"], BODY)
    wait_events(relay, lambda e: e["outcome"] == "delivered", count=3)
    log = relay.log()
    for queue_id in (traced_by_header, traced_by_address):
        steps = [line for line in log.splitlines() if "relay.trace" in line and queue_id in line]
        text = "\n".join(steps)
        for step in ("claimed", "->", "session mx1.ok.example", "MAIL 250", "delivered"):
            assert step in text, (step, text)
        assert all("ms " in line for line in steps)
    assert not [line for line in log.splitlines() if "relay.trace" in line and untraced in line]
    listed = relayctl(relay, "trace", "list")
    assert "watched@ok.example" in listed.stdout
    assert "none" in relayctl(relay, "trace", "remove", "watched@ok.example").stdout
