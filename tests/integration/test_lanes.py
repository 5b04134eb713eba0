"""Lanes and campaigns through the real processes: the class from each
source (header, listener, AUTH user, campaign) as `relayctl show` reports
it; a paused campaign's mail held at the sink while other mail flows,
resumed, cancelled with events and no DSN; classes and campaign states
surviving a restart."""

from __future__ import annotations

import json
import smtplib
import ssl
import time

import pytest

from relay.route.shard import owner_of, slot_of

from support import deliver_relay, events, free_port, inject, relayctl, wait_events, wait_for
from test_shaping import domains_of_both_workers

pytestmark = pytest.mark.slow

SENDER = "app@sender.example"


def message(*headers: str) -> bytes:
    return ("".join(h + "\r\n" for h in headers)
            + "From: app@sender.example\r\nSubject: lanes\r\n\r\nhello\r\n").encode()


def shown(relay, queue_id: str) -> dict:
    result = relayctl(relay, "show", queue_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def campaigns(relay) -> dict:
    result = relayctl(relay, "campaign", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {c["name"]: c for c in json.loads(result.stdout)["campaigns"]}


def test_class_from_header_listener_user_and_campaign(relay_factory, certificate):
    from relay.intake.auth import hash_password

    cert, key = certificate
    bulk_port = free_port()
    relay = relay_factory(
        workers=2,
        tls={"cert_file": cert, "key_file": key},
        intake={"min_free_space": 0,
                "users": [{"name": "news", "password_hash": hash_password("s3cret"),
                           "class": "bulk"}]},
    )
    relay.overrides["listen"] = [{"address": f"127.0.0.1:{relay.port}"},
                                 {"address": f"127.0.0.1:{bulk_port}", "class": "bulk"}]
    relay.write_config()
    relay.start()
    rcpt = [f"a@{domain}" for domain in domains_of_both_workers()]
    plain = inject(relay, SENDER, rcpt, message())
    header = inject(relay, SENDER, rcpt, message("X-Relay-Class: bulk"))
    campaign = inject(relay, SENDER, rcpt, message("X-Relay-Campaign: spring", "X-Relay-Tenant: acme"))
    with smtplib.SMTP("127.0.0.1", bulk_port) as smtp:
        smtp.ehlo()
        smtp.mail(SENDER)
        smtp.rcpt(rcpt[0])
        code, text = smtp.data(message("X-Relay-Class: transactional"))
        header_over_listener = text.split()[-1].decode()
    with smtplib.SMTP("127.0.0.1", bulk_port) as smtp:
        smtp.ehlo()
        smtp.mail(SENDER)
        smtp.rcpt(rcpt[0])
        code, text = smtp.data(message())
        listener = text.split()[-1].decode()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        smtp.starttls(context=context)
        smtp.login("news", "s3cret")
        smtp.mail(SENDER)
        smtp.rcpt(rcpt[0])
        code, text = smtp.data(message())
        user = text.split()[-1].decode()
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        smtp.ehlo()
        smtp.mail(SENDER)
        smtp.rcpt(rcpt[0])
        refused = smtp.data(message("X-Relay-Class: urgent"))
    assert refused[0] == 550 and b'"transactional" or "bulk"' in refused[1]
    got = {name: shown(relay, queue_id) for name, queue_id in [
        ("plain", plain), ("header", header), ("campaign", campaign), ("listener", listener),
        ("header_over_listener", header_over_listener), ("user", user)]}
    assert {name: view["class"] for name, view in got.items()} == {
        "plain": "transactional", "header": "bulk", "campaign": "bulk", "listener": "bulk",
        "header_over_listener": "transactional", "user": "bulk"}
    assert (got["campaign"]["campaign"], got["campaign"]["tenant"]) == ("spring", "acme")
    # Its recipients are at domains of both workers: the class travelled with the remote part.
    assert [p["worker"] for p in got["header"]["parts"]] == [0, 1]
    text = relayctl(relay, "show", campaign).stdout
    assert "class:      bulk, campaign spring, tenant acme" in text


def wait_campaign(relay, name, **expected):
    return wait_for(lambda: (c := campaigns(relay).get(name)) and all(
        c[key] == value for key, value in expected.items()) and c, timeout=20,
        what=f"campaign {name} {expected}")


def test_pause_holds_a_campaign_at_the_sink_while_other_mail_flows_then_resume_and_cancel(
        relay_factory, net):
    [sink] = net.add_domain("camp.example", ["127.0.0.30"])
    relay = deliver_relay(relay_factory, net, workers=2)
    # Paused before any of its mail comes: every worker holds it as it is claimed.
    paused = relayctl(relay, "campaign", "pause", "spring")
    assert paused.returncode == 0, paused.stderr
    assert "campaign spring: 0 recipient(s) held" in paused.stdout
    for i in range(10):
        inject(relay, SENDER, [f"s{i}@camp.example"], message("X-Relay-Campaign: spring"))
    for i in range(5):
        inject(relay, SENDER, [f"t{i}@camp.example"], message())
    sink.wait_received(5, timeout=20)
    wait_campaign(relay, "spring", held=10, state="paused")
    time.sleep(1.0)
    assert sorted(r.rcpt_tos[0] for r in sink.received) == [f"t{i}@camp.example" for i in range(5)]

    resumed = relayctl(relay, "campaign", "resume", "spring")
    assert resumed.returncode == 0 and "10 recipient(s) due now" in resumed.stdout
    sink.wait_received(15, timeout=20)
    spring = [r for r in sink.received if r.rcpt_tos[0].startswith("s")]
    assert len(spring) == 10
    assert all(b"X-Relay-" not in r.data for r in spring)  # stripped before sending
    wait_campaign(relay, "spring", delivered=10, queued=0, held=0, state="active")
    outcomes = [e["outcome"] for e in events(relay) if e.get("campaign") == "spring"]
    assert outcomes == ["delivered"] * 10  # the pause used no attempt
    assert all(e["lane"] == "bulk" for e in events(relay) if e.get("campaign") == "spring")

    # Cancel: held mail ends with cancelled events, no DSN; twice is harmless.
    relayctl(relay, "campaign", "pause", "autumn")
    for i in range(6):
        inject(relay, SENDER, [f"a{i}@camp.example"], message("X-Relay-Campaign: autumn"))
    wait_campaign(relay, "autumn", held=6)
    cancelled = relayctl(relay, "campaign", "cancel", "autumn", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["count"] == 6
    found = wait_events(relay, lambda e: e["outcome"] == "cancelled", count=6)
    assert {e["recipient"] for e in found} == {f"a{i}@camp.example" for i in range(6)}
    again = json.loads(relayctl(relay, "campaign", "cancel", "autumn", "--json").stdout)
    assert again["count"] == 0
    autumn = wait_campaign(relay, "autumn", dropped=6, queued=0, held=0, state="cancelled")
    assert autumn["delivered"] == 0
    queue = json.loads(relayctl(relay, "queue", "--json").stdout)
    assert queue["total"] == 0  # neither the cancelled mail nor a DSN for it waits
    assert len(sink.received) == 15
    assert relayctl(relay, "campaign", "show", "nothing").returncode == 1

    # The daily roll-up agrees with the events.
    daily = json.loads(relayctl(relay, "report", "--daily", "--by", "campaign", "--json").stdout)
    rows = {r["campaign"]: r for r in daily["rows"]}
    logged = events(relay)
    for name in ("spring", "autumn", ""):
        mine = [e for e in logged if e.get("recipient") and (e.get("campaign") or "") == name]
        assert rows[name]["sent"] == sum(e["outcome"] == "delivered" for e in mine)
        assert rows[name]["dropped"] == sum(e["outcome"] == "cancelled" for e in mine)
    assert (rows["spring"]["sent"], rows["autumn"]["dropped"], rows[""]["sent"]) == (10, 6, 5)
    by_class = json.loads(relayctl(relay, "report", "--daily", "--by", "class", "--json").stdout)
    assert {r["class"]: r["sent"] for r in by_class["rows"]} == {"bulk": 10, "transactional": 5}


def test_classes_and_campaign_states_survive_a_restart(relay_factory):
    relay = relay_factory(workers=2).start()  # no DNS: mail waits in the spool
    bulk = inject(relay, SENDER, ["a@one.example", "b@two.example"],
                  message("X-Relay-Campaign: winter"))
    plain = inject(relay, SENDER, ["c@one.example"], message())
    assert relayctl(relay, "campaign", "pause", "winter").returncode == 0
    relay.stop()
    relay.start()
    assert shown(relay, bulk)["class"] == "bulk" and shown(relay, bulk)["campaign"] == "winter"
    assert shown(relay, plain)["class"] == "transactional"
    assert campaigns(relay)["winter"]["state"] == "paused"
    # Three workers: parts are re-homed with their class; the pause applies in the new worker too.
    relay.stop()
    relay.workers = 3
    relay.write_config()
    relay.start()
    view = shown(relay, bulk)
    assert view["class"] == "bulk" and view["campaign"] == "winter"
    assert {r["worker"] for r in view["recipients"]} == {owner_of(slot_of(d), 3)
                                                         for d in ("one.example", "two.example")}
    assert shown(relay, plain)["class"] == "transactional"
    listed = campaigns(relay)["winter"]
    assert listed["state"] == "paused" and listed["queued"] + listed["held"] == 2


def test_a_transactional_message_overtakes_a_bulk_backlog_to_the_same_site(relay_factory, net):
    from relay.testing.fakenet import Behaviour

    [sink] = net.add_domain("busy.example", ["127.0.0.31"], behaviour=Behaviour(data_delay=0.3))
    relay = deliver_relay(relay_factory, net, workers=1,
                          deliver={"max_loaded": 20, "bulk_loaded_share": 0.5},
                          shaping={"busy.example": {"connection_limit": 2,
                                                    "transactional_share": 0.5}})
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        for i in range(100):
            smtp.sendmail(SENDER, [f"b{i}@busy.example"], message("X-Relay-Campaign: backlog"))
    time.sleep(0.5)  # the backlog fills the bulk room and both connections
    sent = time.time()
    inject(relay, SENDER, ["signup@busy.example"], message())
    wait_for(lambda: any(r.rcpt_tos == ("signup@busy.example",) for r in sink.received),
             timeout=10, what="the transactional message at the sink")
    waited = time.time() - sent
    bulk_done = sum(1 for r in sink.received if r.rcpt_tos[0].startswith("b"))
    print(f"\ntransactional delivered {waited:.2f}s after injection, {bulk_done}/100 bulk done")
    assert waited < 2.0 and bulk_done < 60  # FIFO would have put it behind ~15 s of bulk
    stats = json.loads(relayctl(relay, "stats", "--json").stdout)
    assert stats["counters"]["accepted_bulk"] == 100 and stats["counters"]["accepted_transactional"] == 1
    wait_for(lambda: json.loads(relayctl(relay, "stats", "--json").stdout)["counters"][
        "delivered_transactional"] == 1, timeout=5, what="delivered_transactional in the ring")


def test_campaign_list_text_and_usage_errors(relay_factory):
    relay = relay_factory(workers=1).start()
    inject(relay, SENDER, ["a@one.example"], message("X-Relay-Campaign: spring", "X-Relay-Tenant: acme"))
    text = relayctl(relay, "campaign", "list").stdout
    header, row = text.splitlines()[:2]
    assert header.split()[:4] == ["CAMPAIGN", "TENANT", "STATE", "CLASS"]
    assert row.split()[:5] == ["spring", "acme", "active", "bulk", "1"]
    assert relayctl(relay, "campaign", "pause").returncode == 2
    assert relayctl(relay, "campaign", "list", "spring").returncode == 2
    bad = relayctl(relay, "campaign", "pause", "x" * 65)
    assert bad.returncode == 1 and "not a valid campaign name" in bad.stderr
