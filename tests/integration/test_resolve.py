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
