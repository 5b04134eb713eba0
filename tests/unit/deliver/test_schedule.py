"""relay.deliver.schedule: retry steps, the repeating last delay, lifetime, jitter."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.deliver.schedule import RetrySchedule

M, H, D = 60.0, 3600.0, 86400.0
DEFAULT = (1 * M, 5 * M, 10 * M, 20 * M, 30 * M, 40 * M, 50 * M, 1 * H, 6 * H)
T0 = 1_700_000_000.0  # received_at


def exact(delays=DEFAULT, lifetime=5 * D) -> RetrySchedule:
    return RetrySchedule(delays, lifetime)  # no rng: no jitter


def test_steps_follow_the_delays():
    schedule = exact()
    now = T0
    for attempts, delay in enumerate(DEFAULT, start=1):
        assert schedule.next_attempt(attempts, T0, now) == now + delay
        now += delay


def test_the_last_delay_repeats():
    schedule = exact()
    for attempts in (len(DEFAULT), len(DEFAULT) + 1, 50, 10_000):
        assert schedule.delay(attempts) == 6 * H
        assert schedule.next_attempt(attempts, T0, T0 + D) == T0 + D + 6 * H


def test_a_single_delay_repeats_from_the_start():
    schedule = exact(delays=(300.0,), lifetime=D)
    assert [schedule.next_attempt(n, T0, T0) for n in (1, 2, 3)] == [T0 + 300] * 3


def test_next_attempt_is_measured_from_now_not_from_arrival():
    # A recipient tried late (a busy queue) still waits its full step.
    assert exact().next_attempt(2, T0, T0 + 3 * H) == T0 + 3 * H + 5 * M


def test_give_up_at_max_lifetime():
    schedule = exact()
    assert schedule.next_attempt(30, T0, T0 + 5 * D) is None
    assert schedule.next_attempt(30, T0, T0 + 5 * D + 1) is None
    assert schedule.next_attempt(1, T0, T0 + 6 * D) is None  # however few attempts


def test_the_last_wait_is_cut_to_the_deadline():
    # 6h steps would overshoot a 5-day lifetime; the final attempt happens
    # at the deadline instead, and after it the message is given up.
    schedule = exact()
    deadline = T0 + 5 * D
    assert schedule.next_attempt(20, T0, deadline - 2 * H) == deadline
    assert schedule.next_attempt(21, T0, deadline) is None


def test_zero_lifetime_never_retries():
    assert exact(lifetime=0).next_attempt(1, T0, T0) is None


def test_simulated_queue_life_with_the_default_schedule():
    """Walk one always-deferred message through its whole life."""
    schedule, now, attempts, times = exact(), T0, 0, []
    while True:
        attempts += 1  # an attempt at `now` fails
        when = schedule.next_attempt(attempts, T0, now)
        if when is None:
            break
        assert when > now
        times.append(when)
        now = when
    assert times[:3] == [T0 + 1 * M, T0 + 6 * M, T0 + 16 * M]
    assert times[-1] == T0 + 5 * D
    # 4h36m of short steps, then 6h steps until the 5 days are up.
    short = sum(DEFAULT[:-1])
    assert len(times) == len(DEFAULT) - 1 + -(-(5 * D - short) // (6 * H))


@pytest.mark.parametrize("seed", range(5))
def test_jitter_stays_within_ten_percent(seed):
    schedule = RetrySchedule(DEFAULT, 5 * D, rng=random.Random(seed))
    for attempts in range(1, 12):
        delay = schedule.delay(attempts)
        for _ in range(50):
            wait = schedule.next_attempt(attempts, T0, T0) - T0
            assert 0.9 * delay <= wait <= 1.1 * delay


def test_jitter_spreads_retries():
    # Many messages deferred in the same second must not come back together.
    schedule = RetrySchedule(DEFAULT, 5 * D, rng=random.Random(1))
    times = [schedule.next_attempt(8, T0, T0) for _ in range(1000)]
    assert len(set(times)) == 1000
    assert max(times) - min(times) > 0.15 * H  # most of the +-6 minutes around 1h


def test_jitter_is_reproducible_from_the_injected_source():
    a = RetrySchedule(DEFAULT, 5 * D, rng=random.Random(42))
    b = RetrySchedule(DEFAULT, 5 * D, rng=random.Random(42))
    assert [a.next_attempt(n, T0, T0) for n in range(1, 10)] == [b.next_attempt(n, T0, T0) for n in range(1, 10)]


def test_jitter_never_passes_the_deadline():
    schedule = RetrySchedule((6 * H,), 6 * H, rng=random.Random(3))
    for _ in range(100):
        assert schedule.next_attempt(1, T0, T0) <= T0 + 6 * H


def test_jitter_can_be_switched_off():
    assert RetrySchedule(DEFAULT, 5 * D, rng=random.Random(0), jitter=0).next_attempt(1, T0, T0) == T0 + M


@pytest.mark.parametrize(
    "delays, lifetime, jitter",
    [((), D, 0.1), ((0.0,), D, 0.1), ((-1.0,), D, 0.1), ((float("inf"),), D, 0.1),
     ((60.0,), -1.0, 0.1), ((60.0,), float("nan"), 0.1), ((60.0,), D, 1.0), ((60.0,), D, -0.1)],
)
def test_bad_schedules_are_refused(delays, lifetime, jitter):
    with pytest.raises(ValueError):
        RetrySchedule(delays, lifetime, jitter=jitter)


def test_attempts_start_at_one():
    with pytest.raises(ValueError):
        exact().next_attempt(0, T0, T0)


def test_delays_are_stored_as_a_tuple_of_floats():
    schedule = RetrySchedule([60, 300], D)
    assert schedule.delays == (60.0, 300.0)
    assert schedule == RetrySchedule((60.0, 300.0), D, rng=random.Random())  # rng is not compared


@settings(max_examples=200, deadline=None)
@given(
    delays=st.lists(st.floats(1, 1e6), min_size=1, max_size=12),
    lifetime=st.floats(0, 1e7),
    attempts=st.integers(1, 100),
    elapsed=st.floats(0, 2e7),
    seed=st.integers(0, 2**32),
)
def test_next_attempt_is_in_the_future_and_never_past_the_deadline(delays, lifetime, attempts, elapsed, seed):
    schedule = RetrySchedule(tuple(delays), lifetime, rng=random.Random(seed))
    now = T0 + elapsed
    when = schedule.next_attempt(attempts, T0, now)
    if now >= T0 + lifetime:  # on the clock's own floats, as next_attempt sees it
        assert when is None
    else:
        assert now < when <= T0 + lifetime
        assert when <= now + 1.1 * schedule.delay(attempts) + 1e-6
