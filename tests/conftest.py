"""Shared fixtures: real relay processes that are always cleaned up."""

from __future__ import annotations

import pytest

from relay.testing.fakenet import FakeInternet
from support import RelayProcess, make_certificate


@pytest.fixture
def relay_factory(tmp_path):
    """Build (and later kill) relays: ``relay_factory(workers=2, intake={...})``."""
    started: list[RelayProcess] = []

    def build(workers: int = 2, directory=None, **overrides) -> RelayProcess:
        relay = RelayProcess(str(directory or tmp_path), workers=workers, overrides=overrides)
        started.append(relay)
        return relay

    yield build
    for relay in started:
        relay.kill()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    return make_certificate(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def net():
    """The fake internet (DNS server and SMTP sinks) in a background thread."""
    with FakeInternet() as internet:
        yield internet
