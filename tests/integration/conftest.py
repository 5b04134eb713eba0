"""Fixtures of the integration tests that talk to the local RabbitMQ."""

from __future__ import annotations

import pytest

from amqp_support import Broker, leftovers


@pytest.fixture
def broker():
    """This test's queue names on the local broker (it fails, saying so,
    when RabbitMQ cannot be reached); every queue and exchange it made is
    deleted afterwards, and none may be left."""
    broker = Broker()
    broker.declare()
    yield broker
    broker.cleanup()
    assert leftovers(broker.prefix) == []
