"""The scheduler core with a fake clock: limits, rates, reuse, adaptive
concurrency, next MX, rules, suspension and its expiry.  No sockets, no
sleeps: time moves when the test says so."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay import config
from relay.deliver.resolve import Destination
from relay.deliver.scheduler import (BOUNCE, DRAIN_HORIZON, INITIAL_CONCURRENCY, RECORD, RETRY, Close,
                                     Fail, Hold, Open, Scheduler, Send)
from relay.deliver.session import Hop
from relay.deliver.shaping import Effects
from relay.model import Reply, Stage

MX = Destination(("mx1.example.net", "mx2.example.net"),
                 (Hop("mx1.example.net", "192.0.2.1", 25), Hop("mx2.example.net", "192.0.2.2", 25)))
KEY = (MX.key, "none")
OK = Reply(250, "2.0.0", "ok", "mx1.example.net")


@dataclass
class FakeJob:
    queue_id: str
    domain: str = "example.net"
    recipients: list = field(default_factory=lambda: ["r"])
    trace: bool = False
    queued: float = 0.0
    size: int = 100
    site_key: tuple = None
    destination: object = None
    lane: str = "transactional"
    campaign: str = ""


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


def shaping(**sections) -> config.ShapingSettings:
    return config.from_dict({"shaping": sections}).shaping


def scheduler(workers=1, spawn_after=0.25, **sections) -> Scheduler:
    settings = shaping(**sections)
    return Scheduler(settings, workers, Effects(settings.rules), idle_timeout=10.0,
                     spawn_after=spawn_after)


def of(kind, actions):
    return [a for a in actions if isinstance(a, kind)]


def open_all(s, clock, actions):
    """The driver opens every requested connection successfully."""
    for action in of(Open, actions):
        s.on_opened(action.conn, action.hops[0], clock.now)
    return s.actions(clock.now)


def test_connections_never_exceed_the_limit_and_idle_ones_are_reused():
    clock = Clock()
    s = scheduler(**{"example.net": {"connection_limit": 3}})
    for i in range(400):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    opens = of(Open, s.actions(clock.now))
    assert len(opens) == 3  # 400 jobs, more than 3 connections carry: the limit
    sends = of(Send, open_all(s, clock, opens))
    assert len(sends) == 3 and not of(Open, s.actions(clock.now))
    verdict = s.on_sent(sends[0].conn, sends[0].job, clock.now, [OK], True, None)
    assert verdict == RECORD
    again = s.actions(clock.now)
    assert of(Send, again)[0].conn == sends[0].conn  # the same connection, reused
    assert s.connection_count() == 3


def test_shared_site_limit_is_split_between_workers():
    s = scheduler(workers=2, default={"connection_limit": 6})
    clock = Clock()
    for i in range(1000):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    opens = of(Open, s.actions(clock.now))
    assert len(opens) == 3  # the site's 6, this worker's half
    # A domain's own limit is this worker's whole (the domain lives here only).
    s2 = scheduler(workers=2, **{"example.net": {"connection_limit": 4}})
    for i in range(1000):
        s2.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    assert len(of(Open, s2.actions(clock.now))) == 4


def test_a_spread_domains_own_limits_are_split_between_its_hosts_workers():
    # [relay] spread_domains: every worker of the host sends the domain's mail.
    settings = shaping(**{"example.net": {"connection_limit": 8, "max_message_rate": "10/s"}},
                       default={"connection_limit": 12})
    s = Scheduler(settings, 4, Effects(settings.rules), idle_timeout=10.0, spawn_after=0.25,
                  spread=frozenset({"example.net"}), host_workers=2)
    clock = Clock()
    for i in range(1000):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    s.actions(clock.now)
    [site] = s.sites.values()
    assert site.limits.connection_limit == 4  # 8 over this host's 2 workers
    assert site.limits.max_message_rate == 0.2  # 10/s over 2: one every 0.2 s
    other = Scheduler(settings, 4, Effects(settings.rules), idle_timeout=10.0,
                      spawn_after=0.25, spread=frozenset({"example.org"}), host_workers=2)
    other.push(KEY, MX, "example.net", FakeJob("m"), clock.now)
    other.actions(clock.now)
    assert [site.limits.connection_limit for site in other.sites.values()] == [8]


def test_chunking_is_chosen_per_site_and_rides_on_each_send():
    clock = Clock()
    for sections, expected in [
        ({}, False),  # off by default
        ({"default": {"chunking": True}}, True),
        ({"mx:.example.net": {"chunking": True}}, True),  # the MX hosts' suffix
        ({"mx:.example.org": {"chunking": True}}, False),  # another site's
        ({"default": {"chunking": True}, "example.net": {"chunking": False}}, False),
    ]:
        s = scheduler(**sections)
        s.push(KEY, MX, "example.net", FakeJob("m"), clock.now)
        [sent] = of(Send, open_all(s, clock, s.actions(clock.now)))
        assert sent.chunking is expected, sections
        [site] = s.sites.values()
        assert site.status(clock.now)["chunking"] is expected  # relayctl's view of the site


def test_a_reload_turns_chunking_off_for_connections_already_open():
    clock = Clock()
    s = scheduler(default={"chunking": True})
    s.push(KEY, MX, "example.net", FakeJob("m1"), clock.now)
    [first] = of(Send, open_all(s, clock, s.actions(clock.now)))
    assert first.chunking
    s.on_sent(first.conn, first.job, clock.now, [OK], True, None)
    s.apply(shaping(default={"chunking": False}), 10.0, 0.25, clock.now)
    s.push(KEY, MX, "example.net", FakeJob("m2"), clock.now)
    [second] = of(Send, s.actions(clock.now))
    assert second.conn == first.conn and not second.chunking  # the same pooled connection


def test_message_rate_wakes_the_queue_when_a_token_is_due():
    clock = Clock()
    s = scheduler(**{"example.net": {"max_message_rate": "20/s", "connection_limit": 1}})
    for i in range(5):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    sends = of(Send, open_all(s, clock, s.actions(clock.now)))
    assert len(sends) == 1
    s.on_sent(sends[0].conn, sends[0].job, clock.now, [OK], True, None)
    assert of(Send, s.actions(clock.now)) == []  # no token yet
    assert abs(s.next_wake() - (clock.now + 0.05)) < 1e-6
    clock.advance(0.05)
    assert len(of(Send, s.actions(clock.now))) == 1


def test_connection_rate_spaces_new_connections():
    clock = Clock()
    s = scheduler(**{"example.net": {"max_connection_rate": "2/s"}})
    for i in range(1000):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    assert len(of(Open, s.actions(clock.now))) == 1
    assert s.next_wake() == clock.now + 0.5
    clock.advance(0.5)
    assert len(of(Open, s.actions(clock.now))) == 1


def test_failed_opens_lower_concurrency_and_other_connections_keep_the_jobs():
    clock = Clock()
    s = scheduler(**{"example.net": {"connection_limit": 8}})
    for i in range(1000):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    opens = of(Open, s.actions(clock.now))
    assert len(opens) == 5  # slow start
    s.on_opened(opens[0].conn, opens[0].hops[0], clock.now)
    s.on_opened(opens[1].conn, opens[1].hops[0], clock.now)
    busy = Reply(421, "4.7.0", "too many connections", "mx1.example.net")
    for action in opens[2:]:
        assert s.on_open_failed(action.conn, busy, Stage.GREETING, clock.now) == []
    site = s.sites[KEY]
    assert site.concurrency.allowed == 1  # 5 -> 2.5 -> 1.25 -> 1
    assert not of(Open, s.actions(clock.now))  # two open, one allowed: no more
    assert site.jobs  # nothing failed: the open connections carry it


def test_successes_raise_concurrency_back_to_the_limit():
    clock = Clock()
    s = scheduler(**{"example.net": {"connection_limit": 8}})
    s.push(KEY, MX, "example.net", FakeJob("m0"), clock.now)
    sends = of(Send, open_all(s, clock, s.actions(clock.now)))
    site = s.sites[KEY]
    assert site.concurrency.allowed == 5  # a new site starts at 5
    for i in range(3):  # ... and gains one connection per success (slow start)
        s.push(KEY, MX, "example.net", FakeJob(f"s{i}"), clock.now)
        s.on_sent(sends[0].conn, sends[0].job, clock.now, [OK], True, None)
        sends = of(Send, s.actions(clock.now)) or sends
    assert site.concurrency.allowed == 8  # 5 + 3, the limit
    site.concurrency.value = 2.0
    site.concurrency.decrease()  # pushed back: 1, and careful from now on
    for i in range(9):  # one more connection takes ten windows of one: not yet
        s.push(KEY, MX, "example.net", FakeJob(f"n{i}"), clock.now)
        s.on_sent(sends[0].conn, sends[0].job, clock.now, [OK], True, None)
        sends = of(Send, s.actions(clock.now)) or sends
    assert site.concurrency.allowed == 1
    for i in range(400):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
        s.on_sent(sends[0].conn, sends[0].job, clock.now, [OK], True, None)
        sends = of(Send, s.actions(clock.now)) or sends
    assert site.concurrency.allowed == 8


def test_last_connection_failing_defers_the_site_jobs():
    clock = Clock()
    s = scheduler()
    s.push(KEY, MX, "example.net", FakeJob("m0"), clock.now)
    s.push(KEY, MX, "example.net", FakeJob("m1"), clock.now)
    (opened,) = of(Open, s.actions(clock.now))
    refused = Reply(0, "4.4.1", "connection refused", "mx2.example.net")
    (fail,) = s.on_open_failed(opened.conn, refused, Stage.CONNECT, clock.now)
    assert isinstance(fail, Fail) and [j.queue_id for j in fail.jobs] == ["m0", "m1"]
    assert not fail.bounce


def test_421_after_greeting_sends_the_job_to_the_next_mx_and_rests_the_host():
    clock = Clock()
    s = scheduler()
    job = FakeJob("m0")
    s.push(KEY, MX, "example.net", job, clock.now)
    (opened,) = of(Open, s.actions(clock.now))
    s.on_opened(opened.conn, MX.hops[0], clock.now)
    (send,) = of(Send, s.actions(clock.now))
    closing = Reply(421, "4.3.2", "closing", "mx1.example.net")
    assert s.on_sent(send.conn, job, clock.now, [closing], False, closing) == RETRY
    (reopen,) = of(Open, s.actions(clock.now))
    assert reopen.hops[0].host == "mx2.example.net"  # mx1 rests after its 421
    s.on_opened(reopen.conn, reopen.hops[0], clock.now)
    (send2,) = of(Send, s.actions(clock.now))
    assert send2.job is job
    # Every host tried: now the replies are the outcome.
    assert s.on_sent(send2.conn, job, clock.now, [closing], False, closing) == RECORD


def test_max_deliveries_per_connection_closes_it():
    clock = Clock()
    s = scheduler(**{"example.net": {"max_deliveries_per_connection": 2, "connection_limit": 1}})
    for i in range(3):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))
    s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
    (send,) = of(Send, s.actions(clock.now))
    s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
    actions = s.actions(clock.now)
    # The closing connection still counts (its QUIT is in flight) ...
    assert Close(send.conn) in actions and not of(Open, actions)
    s.on_closed(send.conn)
    # ... and once closed, the next job gets a new one.
    assert len(of(Open, s.actions(clock.now))) == 1


def test_idle_connections_close_after_the_idle_timeout():
    clock = Clock()
    s = scheduler()
    s.push(KEY, MX, "example.net", FakeJob("m0"), clock.now)
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))
    s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
    assert s.actions(clock.now) == [] and s.next_wake() == clock.now + 10.0
    clock.advance(10.0)
    assert s.actions(clock.now) == [Close(send.conn)]


def test_slow_receiver_gets_another_connection_after_spawn_after():
    clock = Clock()
    s = scheduler(spawn_after=0.25)
    s.push(KEY, MX, "example.net", FakeJob("m0"), clock.now)
    s.push(KEY, MX, "example.net", FakeJob("m1"), clock.now)
    assert len(of(Open, s.actions(clock.now))) == 1  # one connection carries two jobs
    assert s.next_wake() == clock.now + 0.25
    clock.advance(0.25)
    assert len(of(Open, s.actions(clock.now))) == 1


RULE = {"regex": "(?i)rate.?limit", "action": "suspend", "duration": "10m"}


def test_rule_suspends_the_site_holds_its_jobs_without_an_attempt_and_expires():
    clock = Clock()
    s = scheduler(rules=[RULE])
    for i in range(3):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))
    limited = Reply(451, "4.7.1", "Rate limit exceeded, try again later", "mx1.example.net")
    assert s.on_sent(send.conn, send.job, clock.now, [limited], False, None) == RECORD
    (effect,) = s.effects.all(clock.now)
    assert effect.kind == "suspend" and "rule 1" in effect.reason and "Rate limit" in effect.reason
    actions = s.actions(clock.now)
    assert Close(send.conn) in actions
    (hold,) = of(Hold, actions)
    assert hold.until == clock.now + 600 and len(hold.jobs) == 2
    clock.advance(600)
    assert s.effects.all(clock.now) == []
    started, ended = s.effects.drain_changes()
    assert started == [effect] and ended == [effect]


def test_rule_with_a_threshold_fires_after_n_matches_in_the_window():
    clock = Clock()
    s = scheduler(rules=[{**RULE, "action": "throttle", "connection_limit": 1, "trigger": "3/10m"}])
    reply = Reply(421, "4.7.0", "rate limited", "mx1.example.net")
    assert s.effects.on_reply(MX.name, reply, clock.now) is None
    clock.advance(60)
    assert s.effects.on_reply(MX.name, reply, clock.now) is None
    clock.advance(600)  # the first match left the window
    assert s.effects.on_reply(MX.name, reply, clock.now) is None
    effect = s.effects.on_reply(MX.name, reply, clock.now)
    assert effect is not None and effect.overrides == {"connection_limit": 1}


def test_throttle_changes_the_limits_and_cancel_restores_them():
    clock = Clock()
    s = scheduler(rules=[{**RULE, "action": "throttle", "max_message_rate": "1/min",
                          "connection_limit": 1}])
    for i in range(500):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
    s.actions(clock.now)
    assert s.sites[KEY].limits.connection_limit == 20
    s.effects.on_reply(MX.name, Reply(421, None, "rate limit", None), clock.now)
    s.actions(clock.now)
    limits = s.sites[KEY].limits
    assert limits.connection_limit == 1 and limits.max_message_rate == 60.0
    (effect,) = s.effects.all(clock.now)
    assert s.effects.cancel(effect.id, clock.now) is effect
    s.actions(clock.now)
    assert s.sites[KEY].limits.connection_limit == 20


def test_internal_replies_never_match_a_rule():
    s = scheduler(rules=[{**RULE, "regex": "timeout"}])
    assert s.effects.on_reply(MX.name, Reply(0, "4.4.2", "timeout at mail", None), 0.0) is None


def test_bounce_rule_fails_queued_jobs_as_bounces():
    clock = Clock()
    s = scheduler(rules=[{**RULE, "action": "bounce", "regex": "blocked"}])
    job = FakeJob("m0")
    s.push(KEY, MX, "example.net", job, clock.now)
    s.push(KEY, MX, "example.net", FakeJob("m1"), clock.now)
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))
    blocked = Reply(554, "5.7.1", "you are blocked", "mx1.example.net")
    assert s.on_sent(send.conn, send.job, clock.now, [blocked], False, None) == BOUNCE
    (fail,) = of(Fail, s.actions(clock.now))
    assert fail.bounce and [j.queue_id for j in fail.jobs] == ["m1"]


def test_consecutive_connection_failures_suspend_with_a_growing_hold():
    clock = Clock()
    s = scheduler(**{"example.net": {"consecutive_connection_failures": 2}})
    refused = Reply(0, "4.4.1", "connection refused", None)
    holds = []
    # Two failures in a row suspend; after the hold, the next failure (still
    # no success in between) suspends again, twice as long.
    for failures in (2, 1):
        for i in range(failures):
            s.push(KEY, MX, "example.net", FakeJob(f"m{clock.now}{i}"), clock.now)
            (opened,) = of(Open, s.actions(clock.now))
            s.on_open_failed(opened.conn, refused, Stage.CONNECT, clock.now)
        (effect,) = s.effects.all(clock.now)
        holds.append(effect.expires - clock.now)
        clock.advance(effect.expires - clock.now)
        assert s.effects.all(clock.now) == []
    assert holds == [60.0, 120.0]
    # A connection that opens ends the ban: the next threshold starts at 1 min.
    s.push(KEY, MX, "example.net", FakeJob("ok"), clock.now)
    (opened,) = of(Open, s.actions(clock.now))
    s.on_opened(opened.conn, MX.hops[0], clock.now)
    assert s.sites[KEY].failures == 0


def test_effects_survive_a_restart_through_their_json():
    from relay.deliver.shaping import Effect

    clock = Clock()
    s = scheduler(rules=[{**RULE, "action": "throttle", "max_message_rate": "1/min"}])
    s.effects.on_reply(MX.name, Reply(421, None, "rate limit", None), clock.now)
    saved = [e.to_json() for e in s.effects.all(clock.now)]
    fresh = Effects()
    fresh.restore([Effect.from_json(e) for e in saved], clock.now)
    (effect,) = fresh.all(clock.now)
    assert effect.overrides == {"max_message_rate": (1, 60.0)}
    assert fresh.start(MX.name, "suspend", {}, "x", "operator", clock.now, 60).id > effect.id


def test_a_messages_recipients_at_domains_sharing_the_site_merge_until_started():
    clock = Clock()
    s = scheduler(**{"one.example": {"connection_limit": 1}})
    a1 = FakeJob("A", "one.example", ["a@one.example"])
    s.push(KEY, MX, "one.example", a1, clock.now)
    s.push(KEY, MX, "one.example", FakeJob("B", "one.example", ["b@one.example"]), clock.now)
    s.push(KEY, MX, "two.example", FakeJob("A", "two.example", ["c@two.example"]), clock.now)
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))
    assert send.job is a1 and a1.recipients == ["a@one.example", "c@two.example"]
    # A started job takes no more recipients: a later part goes on its own.
    s.push(KEY, MX, "three.example", FakeJob("A", "three.example", ["d@three.example"]), clock.now)
    assert [j.queue_id for j in s.take_all()] == ["B", "A"]


def test_shipped_rules_match_the_providers_throttling_replies():
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    settings = config.load(os.path.join(root, "conf", "relay.toml")).shaping
    effects = Effects(settings.rules)
    replies = {
        "suspend": Reply(421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due"
                         " to unexpected volume or user complaints", None),
        "throttle": Reply(421, "4.7.28", "Our system has detected an unusual rate of unsolicited"
                          " mail originating from your IP address", None),
    }
    for number, (kind, reply) in enumerate(replies.items()):
        assert effects.on_reply(f"site{number}", reply, 0.0) is not None
        assert kind in {e.kind for e in effects.active(f"site{number}", 0.0)}
    busy = Reply(451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]", None)
    assert effects.on_reply("site9", busy, 0.0).overrides["connection_limit"] == 1
    assert effects.on_reply("other", Reply(250, "2.0.0", "ok", None), 0.0) is None


def test_worker_caps_sessions_and_body_bytes_in_flight():
    clock = Clock()
    settings = shaping()
    s = Scheduler(settings, 1, Effects(), idle_timeout=10.0, spawn_after=0.25,
                  max_sessions=2, max_bytes_in_flight=1000)
    jobs = [FakeJob(f"m{i}") for i in range(300)]  # more than one connection carries
    for job in jobs:
        job.size = 600
        s.push(KEY, MX, "example.net", job, clock.now)
    opens = of(Open, s.actions(clock.now))
    assert len(opens) == 2  # the site allows more; the worker's cap is 2
    sends = of(Send, open_all(s, clock, opens))
    assert len(sends) == 1  # 600 + 600 > 1000: the second waits for room
    assert s.bytes_in_flight == 600
    s.on_sent(sends[0].conn, sends[0].job, clock.now, [OK], True, None)
    assert s.bytes_in_flight == 0
    (send,) = of(Send, s.actions(clock.now))
    # A Send whose connection turned out dead gives its bytes back and its
    # job goes first again.
    send.job.site_key, send.job.destination = KEY, MX
    s.on_not_sent(send.conn, send.job, clock.now)
    assert s.bytes_in_flight == 0 and next(iter(s.sites[KEY].jobs)) is send.job


def test_421_at_mail_after_n_messages_teaches_the_site_its_per_connection_limit():
    clock = Clock()
    s = scheduler(**{"example.net": {"connection_limit": 1}})
    for i in range(30):
        s.push(KEY, MX, "example.net", FakeJob(f"m{i}", site_key=KEY, destination=MX), clock.now)
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))
    for _ in range(10):
        s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
        (send,) = of(Send, s.actions(clock.now))
    s.on_connection_full(send.conn, send.job, clock.now)  # 421 at the 11th MAIL
    site = s.sites[KEY]
    assert next(iter(site.jobs)) is send.job and site.concurrency.allowed >= 1
    (send,) = of(Send, open_all(s, clock, s.actions(clock.now)))  # a fresh connection
    for _ in range(10):
        s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
        actions = s.actions(clock.now)
        sends = of(Send, actions)
        if sends:
            (send,) = sends
    assert Close(send.conn) in actions  # closed after 10, before the receiver's 421


def test_an_effect_of_a_site_that_left_ends_and_is_not_the_next_wake():
    clock = Clock()
    s = scheduler(rules=[RULE])
    s.effects.on_reply("gone.example", Reply(451, None, "rate limited", None), clock.now)
    s.actions(clock.now)
    assert s.next_wake() == clock.now + 600
    clock.advance(601)
    s.actions(clock.now)
    assert s.next_wake() is None  # not a past time: the driver would spin
    started, ended = s.effects.drain_changes()
    assert len(started) == 1 and ended == started


def test_an_operator_suspension_takes_every_waiting_job_of_the_sites_serving_the_domain():
    clock = Clock()
    s = scheduler()
    other = Destination(("mx.other.example",), (Hop("mx.other.example", "192.0.2.9", 25),))
    s.push(KEY, MX, "example.net", FakeJob("m1"), clock.now)
    s.push(KEY, MX, "alias.example", FakeJob("m2", domain="alias.example"), clock.now)
    s.push((other.key, "none"), other, "other.example", FakeJob("m3", domain="other.example"),
           clock.now)
    taken = s.take_domain("alias.example")
    # The whole shared site (the driver pushes back the jobs of its other domains).
    assert [j.queue_id for j in taken] == ["m1", "m2"]
    assert s.pending_jobs() == 1 and s.take_domain("alias.example") == []


def test_connections_follow_the_measured_transaction_time():
    """Little's law: as many connections as carry the waiting jobs within
    DRAIN_HORIZON — few for a fast receiver, up to the limit for a slow one."""
    def connections_after_timing(took: float, opening_takes: float = 0.0, jobs: int = 60) -> int:
        clock = Clock()
        # spawn_after out of the way: only the timed rule opens connections here
        s = scheduler(spawn_after=60.0, **{"example.net": {"connection_limit": 10}})
        for i in range(jobs):
            s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
        [opened] = of(Open, s.actions(clock.now))  # one connection until a transaction is timed
        clock.advance(opening_takes)
        s.on_opened(opened.conn, opened.hops[0], clock.now)
        [send] = of(Send, s.actions(clock.now))[:1]
        clock.advance(took)
        s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
        for _ in range(5):  # a few rounds of the driver performing what is asked
            for action in of(Open, s.actions(clock.now)):
                s.on_opened(action.conn, action.hops[0], clock.now)
        return s.connection_count()

    fast, slow = connections_after_timing(DRAIN_HORIZON / 100), connections_after_timing(2.0)
    assert fast == 1  # 59 jobs x a hundredth of the horizon: one connection carries them
    # 59 jobs x a twentieth of it: three connections carry them within the horizon
    assert connections_after_timing(DRAIN_HORIZON / 20) == 3
    # 59 jobs x 2 s: as many as the slow start allows so far (5, one more per success)
    assert slow == INITIAL_CONCURRENCY + 1
    # Connections that take a second to open: one opened now would be ready
    # only after the busy one had carried those three connections' worth.
    assert connections_after_timing(DRAIN_HORIZON / 20, opening_takes=1.0) == 1
    # A receiver at 0.3 s a transaction, two jobs waiting behind the one
    # sent next: one more connection when opening takes 0.5 s (2 x 0.3 s
    # > 0.5 s), none when it takes 1 s (the busy one carries both first).
    assert connections_after_timing(0.3, opening_takes=0.5, jobs=4) == 2
    assert connections_after_timing(0.3, opening_takes=1.0, jobs=4) == 1


def test_a_receiver_that_queues_gets_fewer_connections_and_one_at_its_pace_keeps_them():
    """Transactions taking many times the site's baseline mean the receiver
    queues them: the window shrinks (in-flight work falls, and with it every
    message's wait) and the spare connections idle.  A receiver slow at its
    own steady pace is not queueing: its window grows to the limit.  And one
    that became slower for good is measured against its new pace within
    minutes (the baseline ages)."""
    def run(first: float, later: float, steps: int) -> tuple[int, int]:
        """(transactions in flight at the last step, connections open)"""
        clock = Clock()
        s = scheduler(**{"example.net": {"connection_limit": 10}})
        for i in range(5_000):
            s.push(KEY, MX, "example.net", FakeJob(f"m{i}"), clock.now)
        took, sends = first, []
        for _ in range(steps):
            sends, actions = [], s.actions(clock.now)
            while actions:  # the driver performs everything asked, as dispatch does
                for close in of(Close, actions):
                    s.on_closed(close.conn)
                for opened in of(Open, actions):
                    s.on_opened(opened.conn, opened.hops[0], clock.now)
                sends += of(Send, actions)
                actions = s.actions(clock.now) if of(Open, actions) or of(Close, actions) else []
            clock.advance(took)
            for send in sends:
                s.on_sent(send.conn, send.job, clock.now, [OK], True, None)
            took = later
        return len(sends), s.connection_count()

    busy, opened = run(first=0.01, later=1.0, steps=8)
    assert busy == 1 and opened == 10  # 100 x its baseline: one in flight, the rest idle
    busy, _ = run(first=2.0, later=2.0, steps=8)
    assert busy == 10  # the slow receiver's own pace: the whole limit
    busy, _ = run(first=0.01, later=1.0, steps=600)
    assert busy > 1  # ten minutes on, 1 s is this receiver's pace: it grows again
