"""The cluster's slot ownership and its shard message format (pure)."""

from __future__ import annotations

import pytest

from relay import config
from relay.errors import ConfigError, CorruptEntry
from relay.model import Part, Recipient
from relay.route import shard
from relay.route.cluster import decode, encode, transaction_of


def test_every_host_and_every_worker_of_it_gets_slots_whatever_the_counts():
    for hosts, workers in [(1, 2), (2, 2), (3, 2), (3, 3), (4, 2)]:
        owners = {(shard.host_of(s, hosts), shard.owner_of(s, workers, hosts))
                  for s in range(shard.SLOT_COUNT)}
        assert owners == {(h, w) for h in range(hosts) for w in range(workers)}, (hosts, workers)
    # One host: the single-host rule, unchanged.
    assert all(shard.owner_of(s, 3) == s % 3 for s in range(shard.SLOT_COUNT))


def test_recipients_split_by_host_keep_their_order_and_indices():
    recipients = [shard.recipient(f"u{i}@d{i}.example", i) for i in range(12)]
    groups = shard.split_hosts(recipients, 3)
    assert sorted(r.index for g in groups.values() for r in g) == list(range(12))
    for host, group in groups.items():
        assert [r.index for r in group] == sorted(r.index for r in group)
        assert all(shard.host_of(r.slot, 3) == host for r in group)


def test_a_shard_message_carries_the_whole_part_and_its_origin():
    part = Part("66192D032C595003A3", "app@sender.example",
                (Recipient("a@x.example", "x.example", 7, 0), Recipient("b@x.example", "x.example", 7, 3)),
                b"Subject: x\r\n\r\nbody \x00\xff\r\n", 1_800_000_000.5, smtputf8=True, trace=True)
    decoded, origin = decode(encode(part, origin=2))
    assert origin == 2 and decoded == part


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x09{}", b"\x00\x00\x00\x02{}body",
                                  b"\x00\x00\x00\x03{x}"])
def test_a_shard_message_that_is_not_whole_is_corrupt(data):
    with pytest.raises(CorruptEntry):
        decode(data)


def test_cluster_settings_are_checked():
    assert config.from_dict({}).cluster.hosts == 1
    with pytest.raises(ConfigError, match=r"\[cluster\] index"):
        config.from_dict({"cluster": {"hosts": 2, "index": 2, "amqp_url": "amqp://h/"}})
    with pytest.raises(ConfigError, match=r"\[cluster\] amqp_url"):
        config.from_dict({"cluster": {"hosts": 2, "index": 1}})


def test_a_consumed_part_keeps_its_class_and_campaign():
    part = Part("66192D032C595003A4", "app@sender.example",
                (Recipient("a@x.example", "x.example", 7, 2),), b"Subject: x\r\n\r\nbody\r\n",
                1_800_000_000.5, lane="bulk", campaign="spring", tenant="acme")
    decoded, _ = decode(encode(part, origin=1))
    txn = transaction_of(decoded)
    assert (txn.queue_id, txn.lane, txn.campaign, txn.tenant) == (part.queue_id, "bulk", "spring", "acme")
    assert txn.recipients == ("a@x.example",) and txn.body == part.body
