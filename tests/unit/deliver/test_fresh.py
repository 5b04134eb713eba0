"""deliver.fresh: the budget of fresh bodies kept in memory."""

from __future__ import annotations

from relay.deliver.fresh import FreshBodies


def test_bodies_count_against_the_budget_until_their_last_holder_goes():
    bodies = FreshBodies(budget=100)
    assert bodies.reserve(60) and not bodies.reserve(50)  # 110 > 100: the old way
    holder = bodies.keep("Q1", b"x" * 60)
    jobs = [holder, holder]  # a message's jobs share one holder
    assert bodies.held == 60
    del holder, jobs  # no cycle: the reservation ends with the last reference
    assert bodies.held == 0 and bodies.reserve(100)
    bodies.unreserve(100)  # a store that failed gives its reservation back
    assert bodies.held == 0


def test_a_deleted_message_is_not_sent_from_memory():
    bodies = FreshBodies()
    assert bodies.reserve(5)
    holder = bodies.keep("Q1", b"hello")
    bodies.forget("Q1")
    bodies.forget("Q2")  # unknown ids are fine
    assert holder.body is None
