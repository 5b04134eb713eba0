"""Delivery end to end: the real relay processes in the middle, the fake
internet (DNS server and SMTP sinks on 127.0.0.x) at the far end."""

from __future__ import annotations

import email
import email.policy
import json
import math
import os
import random
import re
import signal
import smtplib
import time

import pytest

from relay.route.shard import owner_of, recipient, slot_of
from relay.testing.fakenet import Behaviour, Rule
from support import deliver_relay, events, inject, read_spool, relayctl, wait_events, wait_for


BODY = (
    b"From: App <app@sender.example>\r\nTo: someone@d1.example\r\nSubject: hello\r\n"
    b"X-Relay-Trace: 1\r\nMessage-ID: <1@sender.example>\r\n\r\n"
    b"Hello,\r\n.leading dot\r\n\r\n8-bit: \xc3\xa9\r\n"
)


@pytest.mark.parametrize("offered, shaping, chunked", [
    (False, {"default": {"chunking": True}}, False),  # wanted, not offered: DATA
    (True, {"default": {"chunking": True}}, True),
    (True, {}, False),  # offered, but off by default
], ids=["data", "bdat", "bdat-not-by-default"])
def test_message_reaches_the_mx_byte_for_byte(relay_factory, net, offered, shaping, chunked):
    [sink] = net.add_domain("d1.example", ["127.0.0.10"], behaviour=Behaviour(chunking=offered))
    relay = deliver_relay(relay_factory, net, shaping=shaping)
    queue_id = inject(relay, "app@sender.example", ["someone@d1.example"], BODY)
    [received] = sink.wait_received(1)
    assert received.chunked is chunked
    assert received.mail_from == "app@sender.example"
    assert list(received.rcpt_tos) == ["someone@d1.example"]
    expected = BODY.replace(b"X-Relay-Trace: 1\r\n", b"")  # internal headers stripped
    assert received.data.endswith(expected)
    added = received.data[: -len(expected)]
    assert added.startswith(b"Received: from ") and f"id {queue_id}".encode() in added
    [event] = wait_events(relay, lambda e: e["outcome"] == "delivered")
    assert (event["queue_id"], event["recipient"], event["code"]) == (queue_id, "someone@d1.example", 250)
    assert event["mx"] == "mx1.d1.example"
    relay.stop()
    assert read_spool(relay.spool_dir) == []  # delivered mail leaves the queue


def test_chunking_for_one_site_only_shows_in_relayctl(relay_factory, net):
    [one] = net.add_domain("d1.example", ["127.0.0.10"], behaviour=Behaviour(chunking=True))
    [two] = net.add_domain("d2.example", ["127.0.0.11"], behaviour=Behaviour(chunking=True))
    relay = deliver_relay(relay_factory, net, shaping={"mx:.d1.example": {"chunking": True}})
    inject(relay, "app@sender.example", ["a@d1.example", "b@d2.example"], BODY)
    assert [m.chunked for m in one.wait_received(1) + two.wait_received(1)] == [True, False]
    # The pooled connections keep both sites listed for a while (idle timeout).
    sites = json.loads(relayctl(relay, "shaping", "--json").stdout)["sites"]
    assert {s["site"]: s["chunking"] for s in sites} == {"mx1.d1.example": True,
                                                          "mx1.d2.example": False}
    [d1_line] = [line for line in relayctl(relay, "shaping").stdout.splitlines()
                 if "mx1.d1.example" in line]
    assert "BDAT" in d1_line


def test_each_domain_gets_only_its_own_recipients(relay_factory, net):
    [one] = net.add_domain("d1.example", ["127.0.0.10"])
    [two] = net.add_domain("d2.example", ["127.0.0.11"])
    relay = deliver_relay(relay_factory, net, workers=2)
    inject(relay, "app@sender.example", ["a@d1.example", "b@d2.example", "c@d1.example"], BODY)
    [at_one] = one.wait_received(1)
    [at_two] = two.wait_received(1)
    assert sorted(at_one.rcpt_tos) == ["a@d1.example", "c@d1.example"]
    assert list(at_two.rcpt_tos) == ["b@d2.example"]
    assert at_one.data == at_two.data


def test_deferred_mail_follows_the_retry_schedule(relay_factory, net):
    [sink] = net.add_domain(
        "d1.example", ["127.0.0.10"],
        behaviour=Behaviour(rules=[Rule(r"^later", "451 4.3.0 Try again later")]),
    )
    relay = deliver_relay(relay_factory, net, deliver={"retry_schedule": ["1s", "2s"]})
    inject(relay, "app@sender.example", ["later@d1.example"], BODY)
    deferred = wait_events(relay, lambda e: e["outcome"] == "deferred", count=3, timeout=20)
    gaps = [b["time"] - a["time"] for a, b in zip(deferred, deferred[1:])]
    assert 0.85 <= gaps[0] <= 1.6, gaps  # 1s (+-10% jitter, plus the loop's reaction)
    assert 1.75 <= gaps[1] <= 2.8, gaps  # then 2s, the last step repeating
    assert all(e["code"] == 451 and e["class"] for e in deferred)
    sink.behaviour = Behaviour()  # the receiver recovers
    [received] = sink.wait_received(1, timeout=10)
    assert list(received.rcpt_tos) == ["later@d1.example"]
    wait_events(relay, lambda e: e["outcome"] == "delivered")


def parse_dsn(data: bytes):
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    return message, parts


def test_hard_bounce_sends_an_rfc3464_dsn_to_the_sender(relay_factory, net):
    net.add_domain("d1.example", ["127.0.0.10"],
                   behaviour=Behaviour(rules={r"^nobody": "550 5.1.1 No such user"}))
    [sender_mx] = net.add_domain("sender.example", ["127.0.0.20"])
    relay = deliver_relay(relay_factory, net, workers=2)
    queue_id = inject(relay, "app@sender.example", ["nobody@d1.example"], BODY)
    [dsn] = sender_mx.wait_received(1)
    assert dsn.mail_from == "" and list(dsn.rcpt_tos) == ["app@sender.example"]
    message, parts = parse_dsn(dsn.data)
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; nobody@d1.example" in status
    assert "Status: 5.1.1" in status and "Action: failed" in status
    assert queue_id in status
    [bounce] = wait_events(relay, lambda e: e["outcome"] == "bounced")
    assert (bounce["code"], bounce["enhanced"], bounce["class"]) == (550, "5.1.1", "recipient")
    # The address is now suppressed: a second message is not even tried.
    inject(relay, "app@sender.example", ["nobody@d1.example"], BODY)
    wait_for(lambda: len(sender_mx.received) == 2, what="second DSN")
    second = wait_events(relay, lambda e: e["outcome"] == "bounced", count=2)[1]
    assert "suppressed" in second["text"] and second["mx"] is None


@pytest.mark.parametrize(
    "setup, code, enhanced",
    [
        (lambda net: net.dns.add_null_mx("d1.example"), 556, "5.1.10"),
        (lambda net: net.dns.set_nxdomain("d1.example"), 550, "5.1.2"),
    ],
    ids=["null-mx", "nxdomain"],
)
def test_permanent_dns_failures_bounce_at_once(relay_factory, net, setup, code, enhanced):
    setup(net)
    [sender_mx] = net.add_domain("sender.example", ["127.0.0.20"])
    relay = deliver_relay(relay_factory, net)
    inject(relay, "app@sender.example", ["someone@d1.example"], BODY)
    [event] = wait_events(relay, lambda e: e["recipient"] == "someone@d1.example")
    assert (event["outcome"], event["code"], event["enhanced"]) == ("bounced", code, enhanced)
    [dsn] = sender_mx.wait_received(1)
    assert f"Status: {enhanced}" in parse_dsn(dsn.data)[1][1].as_string()


def test_servfail_defers(relay_factory, net):
    net.dns.set_servfail("d1.example")
    relay = deliver_relay(relay_factory, net)
    inject(relay, "app@sender.example", ["someone@d1.example"], BODY)
    [event] = wait_events(relay, lambda e: e["recipient"] == "someone@d1.example")
    assert (event["outcome"], event["code"], event["enhanced"]) == ("deferred", 451, "4.4.3")
    relay.stop()
    [message] = read_spool(relay.spool_dir)
    assert message.recipients == [("someone@d1.example", slot_of("d1.example"))]


def test_mx_fallback_when_the_first_host_is_down(relay_factory, net):
    first, second = net.add_domain("d1.example", ["127.0.0.10", "127.0.0.11"], preferences=[10, 20])
    first.stop_listening()
    relay = deliver_relay(relay_factory, net)
    inject(relay, "app@sender.example", ["someone@d1.example"], BODY)
    [received] = second.wait_received(1)
    assert list(received.rcpt_tos) == ["someone@d1.example"] and first.received == []
    [event] = wait_events(relay, lambda e: e["outcome"] == "delivered")
    assert event["mx"] == "mx2.d1.example"


def test_a_record_fallback_without_mx(relay_factory, net):
    sink = net.add_host("d1.example", "127.0.0.12")  # an A record, no MX
    relay = deliver_relay(relay_factory, net)
    inject(relay, "app@sender.example", ["someone@d1.example"], BODY)
    [received] = sink.wait_received(1)
    assert list(received.rcpt_tos) == ["someone@d1.example"]


def test_opportunistic_tls_uses_tls_and_falls_back_to_plaintext(relay_factory, net):
    [good] = net.add_domain("tls.example", ["127.0.0.10"], behaviour=Behaviour(tls="on"))
    [broken] = net.add_domain("broken.example", ["127.0.0.11"], behaviour=Behaviour(tls="abort"))
    relay = deliver_relay(relay_factory, net)
    inject(relay, "app@sender.example", ["a@tls.example", "b@broken.example"], BODY)
    assert good.wait_received(1)[0].tls is True
    assert broken.wait_received(1)[0].tls is False
    delivered = wait_events(relay, lambda e: e["outcome"] == "delivered", count=2)
    assert {e["recipient"]: e["tls"] for e in delivered} == {"a@tls.example": 1, "b@broken.example": 0}


def test_required_tls_never_downgrades(relay_factory, net):
    [plain] = net.add_domain("plain.example", ["127.0.0.10"], behaviour=Behaviour(tls="off"))
    [secure] = net.add_domain("secure.example", ["127.0.0.11"], behaviour=Behaviour(tls="on"))
    relay = deliver_relay(
        relay_factory, net, tls_policy={"plain.example": "required", "secure.example": "verify"},
        deliver={"ca_file": net.farm.ca_cert_path, "retry_schedule": ["1s"]},
    )
    inject(relay, "app@sender.example", ["a@plain.example", "b@secure.example"], BODY)
    assert secure.wait_received(1)[0].tls is True
    deferred = wait_events(relay, lambda e: e["recipient"] == "a@plain.example", count=2)
    assert all(e["outcome"] == "deferred" for e in deferred)
    assert plain.received == []


def test_messages_share_connections(relay_factory, net):
    [sink] = net.add_domain("d1.example", ["127.0.0.10"])
    # The bound holds while no job waits behind a busy connection longer
    # than spawn_after (then a slow receiver gets more connections); on a
    # loaded test machine that may happen, so spawn_after is long here.
    relay = deliver_relay(relay_factory, net, deliver={"max_messages_per_connection": 10,
                                                      "spawn_after": "10s",
                                                      "retry_schedule": ["1s"]})
    count = 25
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        for i in range(count):
            smtp.sendmail("app@sender.example", [f"r{i}@d1.example"], BODY)
    sink.wait_received(count, timeout=20)
    assert sink.connections_opened <= math.ceil(count / 10), sink.connections_opened
    assert max(sink.transactions.values()) <= 10


def test_each_worker_sends_from_its_own_source_ips(relay_factory, net):
    domains = [f"s{i}.example" for i in range(12)]
    sinks = {domain: net.add_domain(domain, [f"127.0.0.{30 + i}"])[0] for i, domain in enumerate(domains)}
    source_ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    relay = deliver_relay(relay_factory, net, workers=2,
                          relay={"source_ips": source_ips},
                          deliver={"max_messages_per_connection": 1, "retry_schedule": ["1s"]})
    per_domain = 4
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        for n in range(per_domain):
            for domain in domains:
                smtp.sendmail("app@sender.example", [f"r{n}@{domain}"], BODY)
    seen = {0: {}, 1: {}}
    for domain, sink in sinks.items():
        sink.wait_received(per_domain, timeout=20)
        owner = slot_of(domain) % 2
        for ip, n in sink.peer_ips.items():
            seen[owner][ip] = seen[owner].get(ip, 0) + n
    assert set(seen[0]) <= {"127.0.0.2", "127.0.0.4"} and set(seen[1]) <= {"127.0.0.3", "127.0.0.5"}
    for counts in seen.values():
        if counts:  # round robin: each of a worker's addresses equally often
            assert len(counts) == 2 and abs(max(counts.values()) - min(counts.values())) <= 1, seen


def delivered_by_worker(relay, workers: int) -> dict[int, set[str]]:
    found = {}
    for worker in range(workers):
        path = os.path.join(relay.directory, "log", f"delivery-{worker}.jsonl")
        with open(path, "rb") as file:
            found[worker] = {e["recipient"] for e in map(json.loads, file)
                             if e["outcome"] == "delivered"}
    return found


def test_a_spread_domain_is_stored_and_delivered_by_every_worker(relay_factory, net):
    [sink] = net.add_domain("hot.example", ["127.0.0.12"])
    [other] = net.add_domain("calm.example", ["127.0.0.14"])
    relay = deliver_relay(relay_factory, net, workers=2, relay={"spread_domains": ["Hot.Example"]})
    addresses = [f"user{n}@hot.example" for n in range(24)]
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        for address in addresses:
            smtp.sendmail("app@sender.example", [address], BODY)
        smtp.sendmail("app@sender.example", ["a@calm.example", "b@calm.example"], BODY)
    sink.wait_received(len(addresses), timeout=20)
    other.wait_received(1, timeout=20)
    spread = frozenset({"hot.example"})
    expected = {w: {a for a in addresses if owner_of(recipient(a, 0, spread).slot, 2) == w}
                for w in range(2)}
    assert expected[0] and expected[1]  # the addresses fall to both workers
    calm = owner_of(slot_of("calm.example"), 2)  # any other domain: one worker, as before
    expected[calm] |= {"a@calm.example", "b@calm.example"}
    wait_for(lambda: delivered_by_worker(relay, 2) == expected, 10, "every delivery event")

    # A domain's operator commands reach every worker that holds its mail.
    result = relayctl(relay, "suspend", "hot.example", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["workers"] == [0, 1]
    held = [f"held{n}@hot.example" for n in range(8)]
    queue_ids = [inject(relay, "app@sender.example", [address], BODY) for address in held]

    def states() -> set[str]:
        return {r["state"] for q in queue_ids
                for r in json.loads(relayctl(relay, "show", q, "--json").stdout)["recipients"]}

    wait_for(lambda: states() == {"held"}, 15, "every part held")
    assert {m.worker for m in read_spool(relay.spool_dir)} == {0, 1}  # held by both workers
    assert len(sink.received) == len(addresses), "a suspended domain got mail"
    assert relayctl(relay, "resume", "hot.example").returncode == 0
    sink.wait_received(len(addresses) + len(held), timeout=20)


def reconnect(smtp: smtplib.SMTP, port: int, within: float = 20.0) -> None:
    """Connect again once a worker listens (both may be restarting)."""
    deadline = time.monotonic() + within
    while True:
        try:
            smtp.connect("127.0.0.1", port)
            smtp.ehlo()
            return
        except (smtplib.SMTPException, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_sigkill_during_delivery_delivers_every_acked_message(relay_factory, net):
    domains = [f"k{i}.example" for i in range(8)]
    sinks = [net.add_domain(d, [f"127.0.0.{50 + i}"], behaviour=Behaviour(reply_delay=0.01))[0]
             for i, d in enumerate(domains)]
    relay = deliver_relay(relay_factory, net, workers=2)
    acked: dict[str, set[str]] = {}
    rng = random.Random(3)
    kills = 0
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as smtp:
        smtp.ehlo()
        for i in range(300):
            if i in (60, 120, 180):  # while earlier mail is being delivered
                os.kill(rng.choice(relay.worker_pids()), signal.SIGKILL)
                kills += 1
            rcpts = [f"m{i}-{k}@{rng.choice(domains)}" for k in range(rng.randint(1, 2))]
            try:
                smtp.mail("app@sender.example")
                for rcpt in rcpts:
                    smtp.rcpt(rcpt)
                code, text = smtp.data(BODY)
                if code == 250:
                    acked[text.split()[-1].decode()] = set(rcpts)
            except (smtplib.SMTPException, OSError):
                try:
                    smtp.close()
                except OSError:
                    pass
                reconnect(smtp, relay.port)
    assert kills == 3 and len(acked) > 100
    wanted = set().union(*acked.values())

    def delivered():
        got = [r for sink in sinks for m in sink.received for r in m.rcpt_tos]
        return got if wanted <= set(got) else None

    got = wait_for(delivered, timeout=60, what="every acked recipient delivered")
    duplicates = len(got) - len(set(got))
    print(f"acked messages={len(acked)} recipients={len(wanted)} duplicates={duplicates}")
    # At-least-once: a duplicate is only possible for a recipient whose 250
    # came back while its worker was killed; never more than a few per kill.
    assert duplicates <= 20 * kills


def test_recipients_over_the_servers_limit_go_in_a_later_transaction(relay_factory, net):
    [sink] = net.add_domain("d1.example", ["127.0.0.10"], behaviour=Behaviour(max_recipients=2))
    relay = deliver_relay(relay_factory, net)
    recipients = [f"r{i}@d1.example" for i in range(5)]
    inject(relay, "app@sender.example", recipients, BODY)
    received = sink.wait_received(3, timeout=15)
    assert [len(m.rcpt_tos) for m in received] == [2, 2, 1]
    assert sorted(r for m in received for r in m.rcpt_tos) == recipients
    requeued = [e for e in events(relay) if e["outcome"] == "requeued"]
    assert len(requeued) == 3 + 1 and all(e["code"] == 452 for e in requeued)


def test_domains_sharing_an_mx_get_one_transaction_per_message(relay_factory, net):
    [sink] = net.add_domain("d1.example", ["127.0.0.10"])
    net.dns.add_mx("d2.example", [(10, "mx1.d1.example")])  # the same MX host
    relay = deliver_relay(relay_factory, net)
    inject(relay, "app@sender.example", ["a@d1.example", "b@d2.example"], BODY)
    [received] = sink.wait_received(1)
    assert sorted(received.rcpt_tos) == ["a@d1.example", "b@d2.example"]
    delivered = wait_events(relay, lambda e: e["outcome"] == "delivered", count=2)
    assert {e["destination"] for e in delivered} == {"mx1.d1.example"}


def test_one_dsn_per_message_for_every_recipient_that_failed(relay_factory, net):
    for n, ip in ((1, "127.0.0.10"), (2, "127.0.0.11"), (3, "127.0.0.12")):
        net.add_domain(f"d{n}.example", [ip],
                       behaviour=Behaviour(rules=[Rule(r"^gone", "550 5.1.1 No such user")]))
    [sender_mx] = net.add_domain("sender.example", ["127.0.0.20"])
    relay = deliver_relay(relay_factory, net)
    failed = ["gone1@d1.example", "gone2@d2.example", "gone3@d3.example", "gone4@d3.example"]
    queue_id = inject(relay, "app@sender.example", [*failed, "here@d2.example"], BODY)
    wait_events(relay, lambda e: e["outcome"] == "bounced", count=4)
    wait_events(relay, lambda e: e["outcome"] == "delivered" and e["recipient"] == "here@d2.example")
    [dsn] = sender_mx.wait_received(1)
    with pytest.raises(TimeoutError):
        sender_mx.wait_received(2, timeout=2)  # not one per recipient or domain
    _, parts = parse_dsn(dsn.data)
    status = parts[1].as_string()
    assert sorted(re.findall(r"Final-Recipient: rfc822; (\S+)", status)) == failed
    assert queue_id in status and "here@d2.example" not in status


def test_expired_mail_gets_a_dsn_saying_it_expired(relay_factory, net):
    net.add_domain("slow.example", ["127.0.0.10"],
                   behaviour=Behaviour(rules=[Rule(".", "451 4.7.1 Try again later")]))
    [sender_mx] = net.add_domain("sender.example", ["127.0.0.20"])
    relay = deliver_relay(relay_factory, net, deliver={"retry_schedule": ["1s"], "max_lifetime": "2s"})
    inject(relay, "app@sender.example", ["late@slow.example"], BODY)
    [bounce] = wait_events(relay, lambda e: e["outcome"] == "bounced", timeout=20)
    assert bounce["code"] == 451
    [dsn] = sender_mx.wait_received(1, timeout=10)
    _, parts = parse_dsn(dsn.data)
    human, status = parts[0].get_content(), parts[1].as_string()
    assert "<late@slow.example>: message expired after " in human
    assert "said: 451 4.7.1 Try again later" in human
    assert "Diagnostic-Code: X-Relay; message expired after" in status
    assert "Status: 4.7.1" in status and "Action: failed" in status
