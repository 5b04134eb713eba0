"""MX resolution: recipient domain -> Destination (the hops to try, in order).

Input: a routing domain.  Output: a ``Destination`` — its key (the set of
MX host names, so domains sharing MX hosts share connections) and its hops
(one per MX address, by MX preference, equal preferences shuffled) — or a
``DeliveryError`` whose reply says whether the failure is permanent:

* static ``[routes]`` bypass DNS;
* MX records -> their A/AAAA addresses (RFC 5321 5.1);
* no MX (NODATA) -> the domain's own A/AAAA (the implicit MX);
* null MX ``MX 0 .`` (RFC 7505) -> ``556 5.1.10``, permanent;
* NXDOMAIN -> ``550 5.1.2``, permanent;
* SERVFAIL, timeouts, MX hosts without addresses -> ``451 4.4.3``, temporary.

Answers are cached for their TTL; failures too (permanent ones for
``NEGATIVE_TTL``, temporary ones for ``TEMPFAIL_TTL``), so a burst of mail
to a broken domain costs one lookup.  MX hosts' addresses are cached by
host as well: a thousand domains on fifty MX hosts cost a thousand MX
queries and a hundred address queries, not three thousand.  At most
``MAX_QUERIES`` queries are in flight, so a burst of new domains does not
flood the DNS server into timeouts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relay.deliver.session import Hop
from relay.errors import DeliveryError
from relay.model import Reply, Stage

NEGATIVE_TTL = 300.0
TEMPFAIL_TTL = 30.0
MAX_TTL = 3600.0
MIN_TTL = 5.0
LOOKUP_TIMEOUT = 10.0
CACHE_SIZE = 100_000  # answers kept at most; past it, expired ones are dropped
MAX_QUERIES = 64  # DNS queries in flight at once


@dataclass(frozen=True)
class Destination:
    key: tuple[str, ...]  # sorted MX host names (or the static route)
    hops: tuple[Hop, ...]

    @property
    def name(self) -> str:
        return ",".join(self.key)


def _fail(code: int, enhanced: str, text: str) -> DeliveryError:
    return DeliveryError(Reply(code, enhanced, text, None), Stage.LOCAL)


class Resolver:
    def __init__(self, *, nameservers: tuple[tuple[str, int], ...], routes: dict,
                 mx_port: int, clock=time.monotonic, rng: random.Random | None = None) -> None:
        self.routes = routes
        self.mx_port = mx_port
        self._clock = clock
        self._rng = rng or random.Random()
        # domain -> (expiry, Destination or the (reply, stage) of a failure):
        # a failure is raised as a new exception each time, since a cached
        # instance would keep the frames of every job it was raised in.
        self._cache: dict[str, tuple[float, Destination | tuple]] = {}
        self._pending: dict[str, asyncio.Future] = {}
        # MX host -> (expiry, (addresses, ttl) or the (reply, stage) of a failure)
        self._hosts: dict[str, tuple[float, tuple]] = {}
        self._host_pending: dict[str, asyncio.Future] = {}
        self._queries = asyncio.Semaphore(MAX_QUERIES)
        if nameservers:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
            ]
        else:
            self._dns = dns.asyncresolver.Resolver()
        self._dns.lifetime = LOOKUP_TIMEOUT
        self._dns.timeout = LOOKUP_TIMEOUT / 3
        self.lookups = 0

    async def resolve(self, domain: str) -> Destination:
        """The destination of a domain; raises DeliveryError (cached too)."""
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > self._clock():
            return self._order(cached[1])
        # Concurrent callers for one domain share one lookup.
        pending = self._pending.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(domain))
            self._pending[domain] = pending
            pending.add_done_callback(lambda _: self._pending.pop(domain, None))
        return self._order(await asyncio.shield(pending))

    def _order(self, entry) -> Destination:
        if isinstance(entry, DeliveryError):
            raise DeliveryError(entry.reply, entry.stage)
        if isinstance(entry, tuple):
            raise DeliveryError(*entry)
        return entry

    async def _lookup(self, domain: str) -> Destination | tuple:
        try:
            destination, ttl = await self._find(domain)
            entry: Destination | DeliveryError = destination
        except DeliveryError as exc:
            entry, ttl = exc, (TEMPFAIL_TTL if exc.reply.code < 500 else NEGATIVE_TTL)
        now = self._clock()
        if len(self._cache) >= CACHE_SIZE:  # domains that never came back
            self._cache = {d: e for d, e in self._cache.items() if e[0] > now}
        cached = (entry.reply, entry.stage) if isinstance(entry, DeliveryError) else entry
        self._cache[domain] = (now + ttl, cached)
        return cached

    async def _find(self, domain: str) -> tuple[Destination, float]:
        route = self.routes.get(domain)
        if route is not None:
            host, port = route
            ips, ttl = await self._addresses(host) if not _is_ip(host) else ([host], MAX_TTL)
            if not ips:
                raise _fail(451, "4.4.3", f"static route host {host} has no address")
            return Destination((f"{host}:{port}",), tuple(Hop(host, ip, port) for ip in ips)), ttl
        if domain.startswith("["):  # an address literal: deliver to it
            literal = domain[1:-1]
            literal = literal[5:] if literal.lower().startswith("ipv6:") else literal
            return Destination((domain,), (Hop(literal, literal, self.mx_port),)), MAX_TTL
        mx_records, ttl = await self._mx(domain)
        if mx_records is None:  # no MX: the implicit MX is the domain itself
            mx_records = [(0, domain)]
        elif len(mx_records) == 1 and mx_records[0][1] == "":
            raise _fail(556, "5.1.10", f"{domain} accepts no mail (null MX)")
        mx_records = [(pref, host) for pref, host in mx_records if host]
        hosts = await asyncio.gather(
            *(self._addresses(host) for _, host in mx_records), return_exceptions=True
        )
        hops, ttls, failed = [], [ttl], None
        for (pref, host), found in zip(mx_records, hosts):
            if isinstance(found, DeliveryError):  # this host only: the others may do
                failed = found
                ttls.append(TEMPFAIL_TTL)
                continue
            if isinstance(found, BaseException):
                raise found
            ips, host_ttl = found
            ttls.append(host_ttl)
            hops.extend((pref, Hop(host, ip, self.mx_port)) for ip in ips)
        if not hops:
            if failed is not None:
                raise failed
            raise _fail(451, "4.4.3", f"no MX host of {domain} has an address")
        # Preference order; equal preferences in random order (RFC 5321 5.1).
        self._rng.shuffle(hops)
        hops.sort(key=lambda item: item[0])
        key = tuple(sorted({host for _, host in mx_records}))
        return Destination(key, tuple(hop for _, hop in hops)), _clamp(min(ttls))

    async def _mx(self, domain: str) -> tuple[list[tuple[int, str]] | None, float]:
        try:
            answer = await self._query(domain, "MX")
        except dns.resolver.NoAnswer:
            return None, NEGATIVE_TTL
        except dns.resolver.NXDOMAIN:
            raise _fail(550, "5.1.2", f"domain {domain} does not exist") from None
        records = [
            (r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in answer
        ]
        records = [(pref, "" if host in ("", ".") else host) for pref, host in records]
        return sorted(records), float(answer.rrset.ttl)

    async def _addresses(self, host: str) -> tuple[list[str], float]:
        """A host's addresses and their TTL, cached by host (concurrent
        callers share one lookup); a temporary failure is cached for
        TEMPFAIL_TTL and raised afresh each time."""
        cached = self._hosts.get(host)
        if cached is None or cached[0] <= self._clock():
            pending = self._host_pending.get(host)
            if pending is None:
                pending = asyncio.ensure_future(self._look_up_addresses(host))
                self._host_pending[host] = pending
                pending.add_done_callback(lambda _: self._host_pending.pop(host, None))
            cached = await asyncio.shield(pending)
        entry = cached[1]
        if isinstance(entry[0], Reply):
            raise DeliveryError(*entry)
        return list(entry[0]), entry[1]

    async def _look_up_addresses(self, host: str) -> tuple[float, tuple]:
        try:
            ips, ttl = await self._fetch_addresses(host)
            entry: tuple = (tuple(ips), ttl)
        except DeliveryError as exc:
            entry, ttl = (exc.reply, exc.stage), TEMPFAIL_TTL
        now = self._clock()
        if len(self._hosts) >= CACHE_SIZE:
            self._hosts = {h: e for h, e in self._hosts.items() if e[0] > now}
        self._hosts[host] = (now + _clamp(ttl), entry)
        return self._hosts[host]

    async def _fetch_addresses(self, host: str) -> tuple[list[str], float]:
        results = await asyncio.gather(
            self._records(host, "A"), self._records(host, "AAAA"), return_exceptions=True
        )
        ips, ttls, errors = [], [], []
        for result in results:
            if isinstance(result, DeliveryError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                ips.extend(result[0])
                ttls.append(result[1])
        if not ips and errors and any(e.reply.code < 500 for e in errors):
            raise errors[0]
        return ips, min(ttls) if ttls else NEGATIVE_TTL

    async def _records(self, host: str, rdtype: str) -> tuple[list[str], float]:
        try:
            answer = await self._query(host, rdtype)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return [], NEGATIVE_TTL
        return [r.address for r in answer], float(answer.rrset.ttl)

    async def _query(self, name: str, rdtype: str):
        self.lookups += 1
        try:
            async with self._queries:
                return await self._dns.resolve(name, rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            raise
        except dns.resolver.NoNameservers:
            raise _fail(451, "4.4.3", f"DNS server failure for {name}/{rdtype}") from None
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            raise _fail(451, "4.4.3", f"DNS timeout for {name}/{rdtype}") from None
        except dns.exception.DNSException as exc:
            raise _fail(451, "4.4.3", f"DNS error for {name}/{rdtype}: {exc}") from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _clamp(ttl: float) -> float:
    return max(MIN_TTL, min(ttl, MAX_TTL))
