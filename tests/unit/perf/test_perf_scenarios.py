"""perf.scenarios: the shape of each scenario (pure data, no processes)."""

from __future__ import annotations

import pytest

from perf import scenarios

KB = 1024


@pytest.mark.parametrize("quick, messages", [(True, 1_000), (False, 20_000)])
def test_hot_domain_sends_everything_to_one_domain(quick, messages):
    scenario = scenarios.build("hot-domain", quick)
    assert scenario.name == "hot-domain"
    assert len(scenario.layout.domains) == 1 and len(scenario.layout.sites) == 1
    (stream,) = scenario.streams
    assert stream.domains == (scenario.layout.domains[0][0],)
    assert stream.messages == messages
    assert stream.recipients == 1
    assert stream.sizes == ((10 * KB, 1.0),)
    assert stream.concurrency == 50
    assert not (scenario.intake or scenario.cluster or scenario.deferred)


def test_hot_domain_spread_differs_only_in_the_relays_spread_domains():
    plain, spread = scenarios.build("hot-domain", False), scenarios.build("hot-domain-spread", False)
    assert (spread.layout, spread.streams) == (plain.layout, plain.streams)
    assert spread.relay_overrides == {"relay": {"spread_domains": [plain.layout.domains[0][0]]}}
    assert not plain.relay_overrides


def test_hot_domain_is_listed():
    assert "hot-domain" in scenarios.NAMES


@pytest.mark.parametrize("name", sorted(scenarios.SCENARIOS))
def test_every_scenario_builds_both_variants(name):
    for quick in (True, False):
        scenario = scenarios.build(name, quick)
        assert scenario.name == name
        assert scenario.streams and all(s.messages > 0 for s in scenario.streams)
        domains = {domain for domain, _ in scenario.layout.domains}
        assert all(set(s.domains) <= domains for s in scenario.streams)


def test_intake_holds_delivery_and_sends_10_kb_to_several_domains():
    scenario = scenarios.build("intake", False)
    assert scenario.held and scenario.drain_limit == 0
    (stream,) = scenario.streams
    assert stream.sizes == ((10 * KB, 1.0),) and stream.recipients == 1
    assert len(stream.domains) == 20  # spread over both workers' shards
    assert not any(other.held for name, other in
                   ((n, scenarios.build(n, False)) for n in scenarios.SCENARIOS) if name != "intake")
