"""Lanes and campaigns in the scheduler core, with a fake clock: transactional
first, a share of connections kept for it (and lent to bulk while it is
idle), campaigns served in turn.  No sockets, no sleeps."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.deliver.lanes import CampaignRing, SiteQueue
from relay.deliver.scheduler import Open, Send
from tests.unit.deliver.test_scheduler import KEY, MX, OK, Clock, FakeJob, of, open_all, scheduler


def job(queue_id: str, lane: str = "transactional", campaign: str = "") -> FakeJob:
    return FakeJob(queue_id, lane=lane, campaign=campaign)


def bulk(i, campaign="big"):
    return job(f"b{i}", "bulk", campaign)


# -- the queue (pure) ---------------------------------------------------------------

OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("push"), st.sampled_from(["transactional", "bulk"]), st.sampled_from(["", "a", "b"]),
              st.booleans()),
    st.tuples(st.just("pop"), st.sampled_from(["transactional", "bulk"])),
    st.tuples(st.just("take"), st.sampled_from(["", "a", "b"])),
), max_size=60)


@given(OPERATIONS)
def test_the_queue_s_length_is_what_it_holds(operations):
    # SiteQueue keeps its length as a counter (asked for every site at each pass).
    queue, ids = SiteQueue(), iter(range(10**6))
    for operation in operations:
        if operation[0] == "push":
            queue.push(job(f"j{next(ids)}", operation[1], operation[2]), front=operation[3])
        elif operation[0] == "pop" and queue.count(operation[1]):
            queue.pop(operation[1])
        elif operation[0] == "take":
            queue.take(lambda kept, campaign=operation[1]: kept.campaign != campaign)
        assert len(queue) == len(list(queue)) == sum(queue.count(lane) for lane in ("transactional", "bulk"))
        assert bool(queue) is (len(queue) > 0)


def test_a_small_campaign_interleaves_with_a_big_one_pushed_first():
    ring = CampaignRing()
    for i in range(1000):
        ring.push(bulk(i, "big"))
    for i in range(3):
        ring.push(job(f"s{i}", "bulk", "small"))
    taken = [ring.pop().campaign for _ in range(6)]
    assert taken == ["big", "small", "big", "small", "big", "small"]
    assert ring.count == 997 and "small" not in ring.queues


def test_mail_without_a_campaign_takes_its_turn_too():
    ring = CampaignRing()
    for i in range(3):
        ring.push(bulk(i, "big"))
    ring.push(job("n", "bulk", ""))
    assert [ring.pop().queue_id for _ in range(4)] == ["b0", "n", "b1", "b2"]


def test_a_job_pushed_at_the_front_goes_next_with_its_campaign():
    ring = CampaignRing()
    for name in ("a", "b", "c"):
        ring.push(job(name, "bulk", name))
    first = ring.pop()  # a
    ring.push(first, front=True)  # its next MX: it was its turn
    assert ring.pop() is first and ring.pop().campaign == "b"


def test_taking_a_campaign_out_leaves_the_others_in_order():
    queue = SiteQueue()
    for i in range(4):
        queue.push(bulk(i, "big" if i % 2 else "paused"))
    queue.push(job("t"))
    taken = queue.take(lambda job: job.campaign != "paused")
    assert [j.queue_id for j in taken] == ["b0", "b2"]
    assert len(queue) == 3 and [j.queue_id for j in queue] == ["t", "b1", "b3"]
    assert queue.count("bulk") == 2


# -- the scheduler ---------------------------------------------------------------------


def test_a_free_connection_takes_a_transactional_job_before_older_bulk_ones():
    clock = Clock()
    s = scheduler(**{"example.net": {"connection_limit": 1}})
    for i in range(50):
        s.push(KEY, MX, "example.net", bulk(i), clock.now)
    clock.advance(1)
    s.push(KEY, MX, "example.net", job("signup"), clock.now)
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))
    assert send.job.queue_id == "signup"
    s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
    (send,) = of(Send, s.actions(clock.now))
    assert send.job.queue_id == "b0"


def test_bulk_leaves_the_transactional_share_while_transactional_mail_is_in_flight():
    clock = Clock()
    # 5 connections (the starting concurrency), 20%: one kept for transactional mail.
    s = scheduler(**{"example.net": {"connection_limit": 5, "transactional_share": 0.2}})
    s.push(KEY, MX, "example.net", job("t0"), clock.now)
    for i in range(500):
        s.push(KEY, MX, "example.net", bulk(i), clock.now)
    sends = of(Send, open_all(s, clock, s.actions(clock.now)))
    lanes = sorted(send.job.lane for send in sends)
    assert lanes == ["bulk"] * 4 + ["transactional"]
    # The transactional job ends, another arrives: it finds its connection
    # idle, while bulk still runs on four.
    t0 = next(send for send in sends if send.job.lane == "transactional")
    s.push(KEY, MX, "example.net", job("t1"), clock.now)
    s.on_sent(t0.conn, t0.job, clock.now, [OK], True, None)
    (send,) = of(Send, s.actions(clock.now))
    assert send.job.queue_id == "t1" and send.conn == t0.conn
    assert s.sites[KEY].busy_with("bulk") == 4


def test_idle_transactional_capacity_is_used_by_bulk():
    clock = Clock()
    s = scheduler(**{"example.net": {"connection_limit": 5, "transactional_share": 0.2}})
    for i in range(500):
        s.push(KEY, MX, "example.net", bulk(i), clock.now)
    sends = of(Send, open_all(s, clock, s.actions(clock.now)))
    assert len(sends) == 5 and all(send.job.lane == "bulk" for send in sends)


def test_a_transactional_job_behind_bulk_opens_a_connection_at_once():
    clock = Clock()
    s = scheduler(spawn_after=30.0, **{"example.net": {"connection_limit": 5}})
    for i in range(3):
        s.push(KEY, MX, "example.net", bulk(i), clock.now)
    sends = of(Send, open_all(s, clock, s.actions(clock.now)))
    assert len(sends) == 1  # three jobs, one connection carries them: no more
    clock.advance(0.01)
    s.push(KEY, MX, "example.net", job("signup"), clock.now)
    opens = of(Open, s.actions(clock.now))
    assert len(opens) == 1  # not after spawn_after: bulk holds the only connection
    (send,) = of(Send, open_all(s, clock, opens))
    assert send.job.queue_id == "signup"


def test_with_the_share_kept_and_bulk_at_its_part_a_bulk_job_waits():
    clock = Clock()
    s = scheduler(spawn_after=0.0, **{"example.net": {"connection_limit": 2, "transactional_share": 0.5}})
    s.push(KEY, MX, "example.net", job("t0"), clock.now)
    for i in range(10):
        s.push(KEY, MX, "example.net", bulk(i), clock.now)
    sends = of(Send, open_all(s, clock, s.actions(clock.now)))
    assert sorted(send.job.queue_id for send in sends) == ["b0", "t0"]
    bulk_send = next(send for send in sends if send.job.lane == "bulk")
    t0 = next(send for send in sends if send.job.lane == "transactional")
    s.on_sent(bulk_send.conn, bulk_send.job, clock.now, [OK], True, None)
    assert [a.job.queue_id for a in of(Send, s.actions(clock.now))] == ["b1"]
    s.on_sent(t0.conn, t0.job, clock.now, [OK], True, None)
    # Transactional mail is gone: bulk takes the kept connection too.
    assert [a.job.queue_id for a in of(Send, s.actions(clock.now))] == ["b2"]


def test_campaigns_are_served_in_turn_at_a_site():
    clock = Clock()
    s = scheduler(**{"example.net": {"connection_limit": 1}})
    for i in range(100):
        s.push(KEY, MX, "example.net", bulk(i, "big"), clock.now)
    for i in range(2):
        s.push(KEY, MX, "example.net", job(f"s{i}", "bulk", "small"), clock.now)
    order = []
    actions = open_all(s, clock, s.actions(clock.now))
    for _ in range(4):
        (send,) = of(Send, actions)
        order.append(send.job.campaign)
        s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
        clock.advance(0.1)
        actions = s.actions(clock.now)
    assert order == ["big", "small", "big", "small"]


def test_a_paused_campaign_leaves_the_scheduler():
    clock = Clock()
    s = scheduler()
    for i in range(3):
        s.push(KEY, MX, "example.net", bulk(i, "spring"), clock.now)
    s.push(KEY, MX, "example.net", bulk(9, "other"), clock.now)
    taken = s.take_campaign("spring")
    assert sorted(job.queue_id for job in taken) == ["b0", "b1", "b2"]
    assert s.pending_jobs() == 1
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))
    assert send.job.campaign == "other"
