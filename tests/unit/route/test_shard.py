"""relay.route.shard: domain -> slot -> owner, stable across processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake.policy import BadDomain
from relay.model import Recipient
from relay.route.shard import SLOT_COUNT, key_owner, owner_of, recipient, slot_of, split

# Pinned: a change of hash or slot count re-homes every spooled message, and
# Python's per-process hash() would give other values in every run.
PINNED = {
    "example.com": 697,
    "gmail.com": 479,
    "xn--bcher-kva.example": 54,
    "a": 579,
    "[192.0.2.1]": 305,
    "example.net": 416,
    "example.org": 735,
}


def test_slot_count_is_fixed():
    assert SLOT_COUNT == 1024


@pytest.mark.parametrize("domain, slot", sorted(PINNED.items()))
def test_pinned_slots(domain, slot):
    assert slot_of(domain) == slot


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True))
def test_slot_in_range(domain):
    assert 0 <= slot_of(domain) < SLOT_COUNT


@pytest.mark.parametrize(
    "address",
    [
        "u@bücher.example",
        "u@BÜCHER.EXAMPLE",
        "u@Bücher.Example",
        "u@xn--bcher-kva.example",
        "u@XN--BCHER-KVA.EXAMPLE",
    ],
)
def test_same_slot_for_every_form_of_a_domain(address):
    rcpt = recipient(address, 3)
    assert rcpt == Recipient(address=address, domain="xn--bcher-kva.example", slot=54, index=3)


def test_recipient_case_folds_ascii_domains():
    assert recipient("User@Example.COM", 0) == Recipient("User@Example.COM", "example.com", 697, 0)


def test_recipient_uses_the_last_at_sign():
    rcpt = recipient('"a@gmail.com"@example.com', 1)
    assert rcpt.domain == "example.com" and rcpt.slot == 697


def test_recipient_with_an_address_literal():
    rcpt = recipient("u@[192.0.2.1]", 0)
    assert (rcpt.domain, rcpt.slot) == ("[192.0.2.1]", 305)


def test_recipient_with_a_bad_domain():
    with pytest.raises(BadDomain):
        recipient("u@bü_cher.example", 0)


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7, 16])
def test_owner_of(workers):
    for slot in range(SLOT_COUNT):
        owner = owner_of(slot, workers)
        assert 0 <= owner < workers
        assert owner == slot % workers


def test_owner_of_one_worker_is_always_zero():
    assert {owner_of(slot, 1) for slot in range(SLOT_COUNT)} == {0}


def _rcpts(domains: list[str]) -> list[Recipient]:
    return [recipient(f"u{i}@{d}", i) for i, d in enumerate(domains)]


def test_split_groups_by_owner_and_keeps_order():
    domains = ["example.com", "gmail.com", "example.net", "example.org", "a", "example.com"]
    rcpts = _rcpts(domains)
    groups = split(rcpts, 2)
    # slots 697, 479, 416, 735, 579, 697 -> owners 1, 1, 0, 1, 1, 1
    assert list(groups) == [1, 0]
    assert [r.index for r in groups[1]] == [0, 1, 3, 4, 5]
    assert [r.index for r in groups[0]] == [2]
    assert all(isinstance(g, tuple) for g in groups.values())


def test_split_one_worker_is_one_group():
    rcpts = _rcpts(["example.com", "gmail.com", "example.net"])
    assert split(rcpts, 1) == {0: tuple(rcpts)}


def test_split_empty():
    assert split([], 3) == {}


@settings(max_examples=60, deadline=None)
@given(
    slots=st.lists(st.integers(0, SLOT_COUNT - 1), max_size=40),
    workers=st.integers(1, 8),
)
def test_split_property(slots, workers):
    rcpts = [Recipient(f"u{i}@d", "d", slot, i) for i, slot in enumerate(slots)]
    groups = split(rcpts, workers)
    assert sorted(r.index for g in groups.values() for r in g) == list(range(len(rcpts)))
    for owner, group in groups.items():
        assert group  # no empty groups
        assert all(owner_of(r.slot, workers) == owner for r in group)
        assert [r.index for r in group] == sorted(r.index for r in group)



def test_key_owner_is_a_stable_hash_of_the_key():
    # Pinned like the slots: a change of hash moves every AMQP key record.
    # (Modulo 2**32 the owner is the hash itself: CRC-32 of the UTF-8 key.)
    assert [key_owner(key, 2**32) for key in ("id:m1", "sha256:00", "id:<7@sender.example>")] == [
        1312159715, 616056789, 2796584855]
    assert key_owner("id:m1", 1) == 0
    assert {key_owner(f"id:{n}", 3) for n in range(100)} == {0, 1, 2}


# -- [relay] spread_domains ------------------------------------------------------

SPREAD = frozenset({"gmail.com"})


def test_a_domain_not_spread_keeps_its_domain_slot():
    assert recipient("a@example.com", 0, SPREAD).slot == PINNED["example.com"]


def test_a_spread_domains_recipients_are_owned_by_every_worker_by_address():
    owners = [owner_of(recipient(f"user{n}@gmail.com", 0, SPREAD).slot, 2) for n in range(1000)]
    assert 400 < owners.count(0) < 600  # about half each
    # Pinned like the domain slots: a change re-homes queued mail.
    assert recipient("someone@gmail.com", 0, SPREAD).slot == 138


def test_one_address_has_one_slot_whatever_its_case_or_form():
    slots = {recipient(address, 0, frozenset({"xn--bcher-kva.example"})).slot
             for address in ("U@bücher.example", "u@XN--BCHER-KVA.EXAMPLE", "u@Bücher.Example")}
    assert len(slots) == 1


@pytest.mark.parametrize("hosts", [1, 2, 3, 5])
def test_a_spread_domain_stays_on_its_domains_host(hosts):
    host = slot_of("gmail.com") % hosts
    slots = {recipient(f"user{n}@gmail.com", 0, SPREAD, hosts).slot for n in range(500)}
    assert all(0 <= slot < SLOT_COUNT and slot % hosts == host for slot in slots)
    assert len({owner_of(slot, 4, hosts) for slot in slots}) == 4  # every worker of the host
