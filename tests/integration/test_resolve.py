"""The resolver against the fake DNS server: a cached failure is raised as
a new exception each time (a cached instance would keep alive the frames
of every job it was raised in)."""

from __future__ import annotations

import asyncio

import pytest

from relay.deliver.resolve import Resolver
from relay.errors import DeliveryError
from relay.testing.fakenet import FakeDNS


def test_cached_failure_is_a_fresh_exception_each_time():
    async def run():
        async with FakeDNS("127.0.0.1", 0) as dns:
            host, port = dns.nameserver.rsplit(":", 1)
            resolver = Resolver(nameservers=((host, int(port)),), routes={}, mx_port=25)
            raised = []
            for _ in range(2):
                with pytest.raises(DeliveryError) as info:
                    await resolver.resolve("nowhere.example")
                raised.append(info.value)
            return raised, resolver.lookups

    (first, second), lookups = asyncio.run(run())
    assert first is not second
    assert (first.reply.code, second.reply.code) == (550, 550)  # NXDOMAIN, permanent
    assert lookups == 1  # the second came from the cache


def test_mx_hosts_shared_by_many_domains_are_looked_up_once():
    async def run():
        async with FakeDNS("127.0.0.1", 0) as dns:
            dns.add_a("mx.shared.example", "127.0.0.31")
            domains = [f"d{i}.example" for i in range(20)]
            for domain in domains:
                dns.add_mx(domain, [(10, "mx.shared.example")])
            host, port = dns.nameserver.rsplit(":", 1)
            resolver = Resolver(nameservers=((host, int(port)),), routes={}, mx_port=25)
            found = await asyncio.gather(*(resolver.resolve(d) for d in domains))
            return found, resolver.lookups

    found, lookups = asyncio.run(run())
    assert {d.hops[0].ip for d in found} == {"127.0.0.31"}
    assert {d.key for d in found} == {("mx.shared.example",)}  # one site
    assert lookups == 20 + 2  # an MX query per domain; A and AAAA of the host once
