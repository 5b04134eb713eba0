"""Three relay hosts on the local RabbitMQ: each domain delivered by exactly
one host, per-domain limits held across the cluster as the sinks see
them, and a host SIGKILLed mid-run losing nothing.

Each host is a relay process with its own port, spool, run dir and source
IP (127.0.1.<index+1>); the shard queues get this test's prefix and are
deleted afterwards.
"""

from __future__ import annotations

import collections
import json
import smtplib
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from amqp_support import URL, Broker, leftovers, postmanq
from relay.route.shard import host_of, slot_of
from support import (Injector, deliver_relay, events, free_port, message_id_of, relayctl, tally,
                     wait_for)

pytestmark = pytest.mark.slow

HOSTS = 3
DOMAINS = [f"c{i}.example" for i in range(30)]
LIMITS = {"connection_limit": 2, "max_message_rate": "40/s"}


@pytest.fixture
def broker():
    broker = Broker()
    broker.declare()
    yield broker
    broker.cleanup()
    assert leftovers(broker.prefix) == []


@pytest.fixture
def relay_factory(broker, relay_factory):
    """Relays stop before the broker fixture deletes the queues."""
    return relay_factory


def source_ip(index: int) -> str:
    return f"127.0.1.{index + 1}"


def cluster(relay_factory, net, broker, tmp_path, amqp_intake: bool = True, start: bool = True):
    sinks = {domain: net.add_domain(domain, [f"127.0.2.{10 + i}"])[0]
             for i, domain in enumerate(DOMAINS)}
    prefix = f"{broker.prefix}.shard"
    broker._declared.update(f"{prefix}.{i}" for i in range(HOSTS))
    broker._declared.update(f"{prefix}.{i}.bad" for i in range(HOSTS))
    hosts = []
    for index in range(HOSTS):
        directory = tmp_path / f"host{index}"
        directory.mkdir()
        sections = {
            "cluster": {"hosts": HOSTS, "index": index, "amqp_url": URL, "queue_prefix": prefix},
            "shaping": {domain: dict(LIMITS) for domain in DOMAINS},
        }
        if index == 0:
            sections["stats"] = {"metrics_address": f"127.0.0.1:{free_port()}"}
        if amqp_intake:
            sections["amqp"] = {"consumer": [{"url": URL, "queue": broker.queue, "prefetch": 16}]}
        relay = relay_factory(workers=2, directory=directory, **{
            **net.config_overrides(), **sections,
            "relay": {"source_ips": [source_ip(index)]},
        })
        relay.overrides["deliver"].update({"retry_schedule": ["1s"]})
        relay.write_config()
        hosts.append(relay.start() if start else relay)
    return hosts, sinks


def owner_host(domain: str) -> int:
    return host_of(slot_of(domain), HOSTS)


def check_one_host_per_domain(sinks) -> None:
    for domain, sink in sinks.items():
        peers = {r.peer_ip for r in sink.received}
        assert peers <= {source_ip(owner_host(domain))}, (domain, peers)


def test_three_hosts_share_the_domains_and_their_limits(relay_factory, net, broker, tmp_path):
    hosts, sinks = cluster(relay_factory, net, broker, tmp_path)
    assert {owner_host(d) for d in DOMAINS} == set(range(HOSTS))  # every host owns some
    # 1,800 messages over SMTP, 600 through each host, and 1,200 from the AMQP queue.
    injectors = [Injector(relay.port, DOMAINS, threads=3, per_thread=200, tag=f"h{i}-").start()
                 for i, relay in enumerate(hosts)]
    published = {f"<a{n}@amqp.test>": {f"a{n}@{DOMAINS[n % len(DOMAINS)]}"} for n in range(1200)}
    broker.publish([postmanq("app@sender.example", next(iter(rcpts)),
                             f"Message-ID: {mid}\r\nSubject: a\r\n\r\nbody\r\n")
                    for mid, rcpts in published.items()])
    for injector in injectors:
        injector.join(120)
    acked = {mid: rcpts for injector in injectors for mid, rcpts in injector.acked.items()}
    assert len(acked) == 1800, [i.refused[:3] for i in injectors]
    acked.update(published)
    expected = sum(len(r) for r in acked.values())
    wait_for(lambda: sum(len(r.rcpt_tos) for s in sinks.values() for r in s.received) >= expected,
             180, f"{expected} recipients at the sinks")
    lost, duplicates = tally(sinks.values(), acked)
    print(f"\n{expected} recipients delivered by 3 hosts; lost {sum(map(len, lost.values()))},"
          f" duplicates {duplicates}")
    assert lost == {} and duplicates == 0
    check_one_host_per_domain(sinks)
    # The limits of each domain hold for the whole cluster, as its sink saw them.
    delivered = collections.defaultdict(list)
    for relay in hosts:
        for event in events(relay):
            if event["outcome"] == "delivered":
                delivered[event["recipient"].rpartition("@")[2]].append(event["time"])
    for domain, sink in sinks.items():
        assert sink.peak_sessions <= LIMITS["connection_limit"], (domain, sink.peak_sessions)
        times = sorted(delivered[domain])
        if len(times) > 40:
            rate = (len(times) - 1) / (times[-1] - times[0])
            assert rate <= 44, (domain, rate)  # 40/s and the clock's grain
    answer = json.loads(relayctl(hosts[0], "cluster", "--json").stdout)
    assert answer["host"] == 0 and answer["hosts"] == HOSTS
    assert answer["published"] > 0 and answer["publish_failed"] == 0
    assert [q["consumers"] for q in answer["queues"]] == [1, 1, 1]
    assert all(q["messages"] == 0 for q in answer["queues"])
    address = hosts[0].overrides["stats"]["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        samples = {sample.name: sample.value
                   for family in text_string_to_metric_families(response.read().decode())
                   for sample in family.samples if not sample.labels}
    assert samples["relay_cluster_published_total"] == answer["published"]
    assert samples["relay_cluster_consumed_total"] == answer["consumed"] > 0
    assert samples["relay_cluster_connected"] == 2 and samples["relay_cluster_queue_depth"] == 0
    foreign = next(d for d in DOMAINS if owner_host(d) != 0)
    refused = relayctl(hosts[0], "suspend", foreign)
    assert refused.returncode == 1 and f"belongs to host {owner_host(foreign)}" in refused.stderr
    text = relayctl(hosts[1], "cluster").stdout
    assert text.startswith("host 1 of 3") and f"{broker.prefix}.shard.1" in text
    for relay in hosts:
        assert relay.stop() == 0


def test_a_host_killed_mid_run_loses_nothing_and_delivers_its_domains_on_return(
        relay_factory, net, broker, tmp_path):
    hosts, sinks = cluster(relay_factory, net, broker, tmp_path, amqp_intake=False)
    victim = hosts[2]
    # Mail enters through every host, the victim included (what it accepted
    # and had not sent yet waits in its spool while it is down).
    injectors = [Injector(relay.port, DOMAINS, threads=2, per_thread=600, tag=f"h{i}-",
                          pause=0.01).start() for i, relay in enumerate(hosts)]
    wait_for(lambda: all(len(i.acked) > 100 for i in injectors), 60, "mail flowing")
    victim.kill()
    killed_at = time.monotonic()
    during = [len(i.acked) for i in injectors[:2]]
    time.sleep(20)  # the others keep accepting; the victim's parts wait in its shard queue
    assert all(len(i.acked) > n + 50 for i, n in zip(injectors, during)), "intake stalled"
    depth = broker.count(f"{broker.prefix}.shard.2")
    print(f"\nhost 2 down for {time.monotonic() - killed_at:.0f}s: {depth} parts waiting for it")
    assert depth > 0
    victim.start()
    for injector in injectors:
        injector.join(180)
    acked = {mid: rcpts for injector in injectors for mid, rcpts in injector.acked.items()}
    expected = sum(len(r) for r in acked.values())
    wait_for(lambda: all(any(message_id_of(r.data) == mid for s in sinks.values() for r in s.received)
                         for mid in list(acked)[-50:]), 180, "the last messages delivered")
    wait_for(lambda: not tally(sinks.values(), acked)[0], 180, "every acked recipient delivered")
    lost, duplicates = tally(sinks.values(), acked)
    print(f"{len(acked)} messages ({expected} recipients) acked: lost 0, duplicates {duplicates}")
    assert lost == {}
    check_one_host_per_domain(sinks)
    assert broker.count(f"{broker.prefix}.shard.2") == 0
    for relay in hosts:
        assert relay.stop() == 0


def test_a_host_whose_slots_changed_refuses_to_start_with_their_mail(relay_factory, net, broker,
                                                                      tmp_path):
    relay = deliver_relay(relay_factory, net, workers=1)  # no cluster: it owns every slot
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        for domain in DOMAINS:  # the domains do not resolve: the mail waits
            smtp.sendmail("app@sender.example", [f"x@{domain}.invalid"], b"Subject: x\r\n\r\nx\r\n")
    assert relay.stop() == 0
    relay.overrides["cluster"] = {"hosts": HOSTS, "index": 1, "amqp_url": URL,
                                  "queue_prefix": f"{broker.prefix}.shard"}
    relay.write_config()
    relay.start(wait=False)
    assert relay.proc.wait(30) == 2
    assert "no longer owns" in relay.log() and "drain it with the old [cluster] settings" in relay.log()
