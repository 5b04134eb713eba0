"""The benchmark scenarios (pure data): who receives, who sends, how much.

Input: a scenario name and whether the quick variant is wanted.  Output: a
``Scenario`` — the fake internet's layout (MX sites, their behaviour, the
recipient domains), the generator's streams, the time bounds and the relay
settings that differ from the harness's defaults.

Full variants follow issue 6; quick ones keep the same shape at a size
that runs in seconds (the smoke test runs ``transactional --quick``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from perf.farm import Layout, layout
from perf.loadgen import Stream

KB = 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    layout: Layout
    streams: tuple[Stream, ...]
    time_limit: float  # seconds of injection at most
    drain_limit: float  # then seconds to wait for the last deliveries
    relay_overrides: dict = field(default_factory=dict)
    deferred: int = 0  # deferred-1m: messages already deferred in the spool
    intake: str = ""  # http or amqp: run that intake against SMTP with the same messages
    workers: int = 0  # relay workers when the scenario fixes them; 0 = --workers
    cluster: int = 0  # cluster: run 1, 2, ... this many relay instances sharing the broker
    held: bool = False  # delivery held (intake): only taking mail in is measured


def _domains(farm: Layout) -> tuple[str, ...]:
    return tuple(domain for domain, _ in farm.domains)


def transactional(quick: bool) -> Scenario:
    farm = layout(domains=100, sites=20)
    messages = 1_000 if quick else 20_000
    return Scenario(
        "transactional", "1 recipient, 2 KB, 100 domains on 20 MX hosts, 50 connections",
        farm,
        (Stream("transactional", messages, _domains(farm), concurrency=50),),
        time_limit=30 if quick else 600, drain_limit=20 if quick else 120,
    )


def hot_domain(quick: bool) -> Scenario:
    # Issue 15: real lists put a large share of their mail at two or three
    # providers; one domain's mail is stored and delivered by one worker.
    farm = layout(domains=1, sites=1)
    messages = 1_000 if quick else 20_000
    return Scenario(
        "hot-domain", "1 recipient, 10 KB, every message to one domain on one MX host, 50 connections",
        farm,
        (Stream("hot-domain", messages, _domains(farm), sizes=((10 * KB, 1.0),), concurrency=50),),
        time_limit=30 if quick else 600, drain_limit=20 if quick else 120,
    )


def hot_domain_spread(quick: bool) -> Scenario:
    """hot-domain with the relay's ``[relay] spread_domains`` naming the
    domain: every worker stores and delivers its mail (Postfix: unchanged)."""
    scenario = hot_domain(quick)
    return dataclasses.replace(
        scenario, name="hot-domain-spread",
        description=scenario.description + "; the relay spreads the domain over every worker",
        relay_overrides={"relay": {"spread_domains": list(_domains(scenario.layout))}})


def intake(quick: bool) -> Scenario:
    """Intake alone (the foundation issue: 2,500 msg/s at 10 KB with fsync):
    every domain is suspended on the relay (relayctl suspend, before the
    run) and Postfix defers its smtp transport (defer_transports), so
    nothing is delivered and each side only takes mail in and keeps it."""
    farm = layout(domains=20, sites=4)
    messages = 2_000 if quick else 20_000
    return Scenario(
        "intake", "intake alone: 1 recipient, 10 KB, 20 domains, 50 connections; delivery held"
        " (the relay's domains suspended, Postfix's defer_transports = smtp)",
        farm,
        (Stream("intake", messages, _domains(farm), sizes=((10 * KB, 1.0),), concurrency=50),),
        time_limit=30 if quick else 600, drain_limit=0, held=True,
    )


def bulk(quick: bool) -> Scenario:
    farm = layout(domains=100 if quick else 1_000, sites=10 if quick else 50)
    messages = 50 if quick else 1_000  # x 100 recipients
    return Scenario(
        "bulk", "100 recipients per message, 20 KB, Zipf-distributed over 1,000 domains on 50 MX hosts",
        farm,
        (Stream("bulk", messages, _domains(farm), recipients=100, sizes=((20 * KB, 1.0),),
                concurrency=10),),
        time_limit=60 if quick else 900, drain_limit=60 if quick else 600,
    )


def mixed(quick: bool) -> Scenario:
    farm = layout(domains=100 if quick else 1_000, sites=10 if quick else 50)
    domains = _domains(farm)
    bulk_messages = 50 if quick else 500
    probes = 50 if quick else 300
    return Scenario(
        "mixed", "bulk (100 rcpt, 20 KB) while transactional probes (1 rcpt, 2 KB, 5/s) measure latency",
        farm,
        (
            # Marked bulk (Postfix ignores the header): the relay's lanes keep probes ahead.
            Stream("bulk", bulk_messages, domains, recipients=100, sizes=((20 * KB, 1.0),),
                   concurrency=10, headers=("X-Relay-Class: bulk",)),
            Stream("probe", probes, domains, concurrency=4, rate=5.0),
        ),
        time_limit=60 if quick else 900, drain_limit=60 if quick else 600,
    )


def mixed_campaigns(quick: bool) -> Scenario:
    """Issue 10: a campaign of 50,000 recipients injected first, one of 500
    after; campaigns take turns in each site, so the small one finishes long
    before the big one (each stream's finish time is reported)."""
    farm = layout(domains=100 if quick else 1_000, sites=10 if quick else 50)
    domains = _domains(farm)
    big = 50 if quick else 500  # x 100 recipients
    return Scenario(
        "mixed-campaigns", "campaign big (50,000 rcpt) then campaign small (500 rcpt) 5 s later",
        farm,
        (
            Stream("big", big, domains, recipients=100, sizes=((20 * KB, 1.0),), concurrency=10,
                   headers=("X-Relay-Campaign: big",)),
            Stream("small", 5, domains, recipients=100, sizes=((20 * KB, 1.0),), concurrency=1,
                   headers=("X-Relay-Campaign: small",), start_after=1.0 if quick else 5.0),
        ),
        time_limit=60 if quick else 900, drain_limit=60 if quick else 600,
    )


def slow_receivers(quick: bool) -> Scenario:
    # 4 of 20 MX hosts wait 2 s before every reply: 20 of the 100 domains.
    farm = layout(domains=100, sites=20, slow_sites=4, slow_delay=2.0)
    messages = 500 if quick else 2_000
    return Scenario(
        "slow-receivers", "1 recipient, 2 KB; 4 of 20 MX hosts take 2 s per reply",
        farm,
        (Stream("transactional", messages, _domains(farm), zipf=0.0, concurrency=50),),
        time_limit=60 if quick else 600, drain_limit=90 if quick else 240,
    )


def throttling(quick: bool) -> Scenario:
    farm = layout(domains=100, sites=20, max_messages=10)
    messages = 1_000 if quick else 10_000
    return Scenario(
        "throttling", "1 recipient, 2 KB; every MX host answers 421 after 10 messages on a connection",
        farm,
        (Stream("transactional", messages, _domains(farm), concurrency=50),),
        time_limit=60 if quick else 600, drain_limit=60 if quick else 300,
    )


def large(quick: bool) -> Scenario:
    farm = layout(domains=100, sites=20)
    messages = 300 if quick else 5_000
    return Scenario(
        "large", "1 recipient, 100 KB",
        farm,
        (Stream("large", messages, _domains(farm), sizes=((100 * KB, 1.0),), concurrency=20),),
        time_limit=60 if quick else 600, drain_limit=60 if quick else 300,
    )


def deferred_1m(quick: bool) -> Scenario:
    farm = layout(domains=100, sites=20)
    messages = 2_000 if quick else 10_000
    return Scenario(
        "deferred-1m", "transactional intake with 1,000,000 deferred messages in the spool vs an empty spool",
        farm,
        (Stream("transactional", messages, _domains(farm), concurrency=50),),
        time_limit=60 if quick else 600, drain_limit=60 if quick else 120,
        deferred=100_000 if quick else 1_000_000,
    )


def http_inject(quick: bool) -> Scenario:
    # The delivery farm of transactional.  Two streams, run one at a time:
    # 1 recipient per request and 100 per request, each against SMTP with
    # the same messages (a 100-recipient message for a 100-recipient request).
    farm = layout(domains=100, sites=20)
    domains = _domains(farm)
    return Scenario(
        "http-inject", "POST /api/inject/v1 vs SMTP, the same messages (2 KB): 1 recipient per"
        " request/message with 50 in flight, then 100 with 10 in flight; 100 domains on 20 MX hosts",
        farm,
        (Stream("batch-1", 1_000 if quick else 20_000, domains, concurrency=50),
         Stream("batch-100", 50 if quick else 1_000, domains, recipients=100, concurrency=10)),
        time_limit=30 if quick else 600, drain_limit=30 if quick else 300,
        intake="http",
    )


def amqp_intake(quick: bool) -> Scenario:
    farm = layout(domains=100, sites=20)
    messages = 2_000 if quick else 20_000
    return Scenario(
        "amqp-intake", f"{messages:,} PostmanQ messages (1 rcpt, 2 KB) pre-published persistent,"
        " consumed by 2 workers, vs SMTP with the same messages (50 connections)",
        farm,
        (Stream("transactional", messages, _domains(farm), concurrency=50),),
        time_limit=30 if quick else 600, drain_limit=30 if quick else 120,
        intake="amqp", workers=2,
    )


def cluster(quick: bool) -> Scenario:
    farm = layout(domains=100, sites=20)
    messages = 1_500 if quick else 12_000
    return Scenario(
        "cluster", "1 recipient, 2 KB, 100 domains on 20 MX hosts, 60 connections spread over"
        " 1, 2 and 3 relay instances ([cluster] on the local RabbitMQ, 1 worker each)",
        farm,
        (Stream("transactional", messages, _domains(farm), concurrency=60),),
        time_limit=60 if quick else 600, drain_limit=60 if quick else 180,
        cluster=3, workers=1,
    )


SCENARIOS = {
    "transactional": transactional,
    "hot-domain": hot_domain,
    "hot-domain-spread": hot_domain_spread,
    "intake": intake,
    "bulk": bulk,
    "mixed": mixed,
    "mixed-campaigns": mixed_campaigns,
    "slow-receivers": slow_receivers,
    "throttling": throttling,
    "large": large,
    "deferred-1m": deferred_1m,
    "http-inject": http_inject,
    "amqp-intake": amqp_intake,
    "cluster": cluster,
}

# Not a Scenario: a flow of its own (perf.idle).
IDLE = "idle-connections"
NAMES = tuple(SCENARIOS) + (IDLE,)


def build(name: str, quick: bool) -> Scenario:
    return SCENARIOS[name](quick)
