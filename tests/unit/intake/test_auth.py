"""relay.intake.auth: scrypt hashes, the authenticator, the failure lockout."""

from __future__ import annotations

import base64

import pytest

from relay.config import User
from relay.intake import auth
from relay.intake.auth import Authenticator, FailureLockout, hash_password, verify_password


@pytest.fixture(scope="module")
def encoded() -> str:
    return hash_password("s3cret pässword")


def test_hash_format(encoded):
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert scheme == "scrypt"
    assert (int(n), int(r), int(p)) == (auth.SCRYPT_N, auth.SCRYPT_R, auth.SCRYPT_P)
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 64


def test_round_trip(encoded):
    assert verify_password("s3cret pässword".encode(), encoded) is True


def test_wrong_password(encoded):
    assert verify_password(b"s3cret password", encoded) is False
    assert verify_password(b"", encoded) is False


def test_salt_is_random():
    a, b = hash_password("x"), hash_password("x")
    assert a != b
    assert verify_password(b"x", a) and verify_password(b"x", b)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "scrypt",
        "scrypt$16384$8$1$c2FsdA==",  # digest missing
        "scrypt$16384$8$1$c2FsdA==$aGFzaA==$extra",
        "scrypt$a$b$c$c2FsdA==$aGFzaA==",
        "scrypt$3$8$1$c2FsdA==$aGFzaA==",  # n not a power of two
        "scrypt$-2$8$1$c2FsdA==$aGFzaA==",
        "scrypt$16384$8$0$c2FsdA==$aGFzaA==",
        "scrypt$16384$8$1$c2FsdA==$",  # empty digest
        "scrypt$16384$8$1$c2FsdA=$aGFzaA==",  # bad padding
        "scrypt$99999999999999999999$8$1$c2FsdA==$aGFzaA==",
        "scrypt$1048576$8$1$c2FsdA==$aGFzaA==",  # beyond scrypt's memory limit
        "plain-text-password",
    ],
)
def test_malformed_hash_is_false_not_an_error(bad):
    assert verify_password(b"pw", bad) is False


def test_password_as_str_is_refused_not_raised(encoded):
    assert verify_password("s3cret pässword", encoded) is False  # type: ignore[arg-type]


# -- Authenticator ------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Count the scrypt verifications the authenticator runs."""
    calls = []
    real = auth.verify_password

    def spy(password, encoded):
        calls.append(password)
        return real(password, encoded)

    monkeypatch.setattr(auth, "verify_password", spy)
    return calls


def test_check_known_user(encoded, counted):
    authenticator = Authenticator((User("app", encoded),))
    assert authenticator.check(b"app", "s3cret pässword".encode()) is True
    assert authenticator.check(b"app", b"wrong") is False


def test_check_unknown_user_does_not_run_scrypt(encoded, counted):
    authenticator = Authenticator((User("app", encoded),))
    assert authenticator.check(b"nobody", "s3cret pässword".encode()) is False
    assert authenticator.check(b"\xff\xfe", b"x") is False  # not UTF-8
    assert counted == []


def test_success_is_cached(encoded, counted):
    authenticator = Authenticator((User("app", encoded),))
    password = "s3cret pässword".encode()
    for _ in range(5):
        assert authenticator.check(b"app", password) is True
    assert len(counted) == 1


def test_failures_are_not_cached(encoded, counted):
    authenticator = Authenticator((User("app", encoded),))
    assert authenticator.check(b"app", b"wrong") is False
    assert authenticator.check(b"app", b"wrong") is False
    assert len(counted) == 2


def test_cached_success_does_not_admit_another_password(encoded, counted):
    authenticator = Authenticator((User("app", encoded),))
    assert authenticator.check(b"app", "s3cret pässword".encode()) is True
    assert authenticator.check(b"app", b"other") is False


def test_cache_is_per_hash(encoded):
    """A success for one user's hash is not a success for another user."""
    other = hash_password("different")
    authenticator = Authenticator((User("app", encoded), User("bob", other)))
    assert authenticator.check(b"app", "s3cret pässword".encode()) is True
    assert authenticator.check(b"bob", "s3cret pässword".encode()) is False


def test_cache_does_not_hold_the_password(encoded):
    authenticator = Authenticator((User("app", encoded),))
    password = "s3cret pässword".encode()
    authenticator.check(b"app", password)
    assert all(password not in token for token in authenticator._verified)
    assert all(password != item for token in authenticator._verified for item in token)


class ExecutorLoop:
    """Stands in for the event loop: records what goes to its executor."""

    def __init__(self) -> None:
        self.ran: list = []

    async def run_in_executor(self, executor, fn, *args):
        self.ran.append(fn)
        return fn(*args)


def run_coroutine(coro):
    """Drive a coroutine that never suspends, with no event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine suspended")


def test_check_async_runs_scrypt_on_the_executor_once(encoded):
    authenticator = Authenticator((User("app", encoded),))
    loop = ExecutorLoop()
    password = "s3cret pässword".encode()
    assert run_coroutine(authenticator.check_async(b"app", password, loop)) is True
    assert loop.ran == [verify_password]
    assert run_coroutine(authenticator.check_async(b"app", password, loop)) is True
    assert loop.ran == [verify_password]  # remembered: no second scrypt
    assert run_coroutine(authenticator.check_async(b"app", b"nope", loop)) is False
    assert loop.ran == [verify_password, verify_password]


def test_check_async_unknown_user_needs_no_executor(encoded):
    authenticator = Authenticator((User("app", encoded),))
    loop = ExecutorLoop()
    assert run_coroutine(authenticator.check_async(b"nobody", b"x", loop)) is False
    assert run_coroutine(authenticator.check_async(b"\xff", b"x", loop)) is False
    assert loop.ran == []


# -- FailureLockout -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_locks_after_max_failures():
    clock = Clock()
    lockout = FailureLockout(3, 600.0, clock=clock)
    for _ in range(2):
        lockout.failed("192.0.2.1")
        assert not lockout.is_locked("192.0.2.1")
    lockout.failed("192.0.2.1")
    assert lockout.is_locked("192.0.2.1")
    assert not lockout.is_locked("192.0.2.2")  # per address


def test_unlocks_after_the_lockout_period():
    clock = Clock()
    lockout = FailureLockout(2, 600.0, clock=clock)
    lockout.failed("ip")
    lockout.failed("ip")
    clock.now += 600.0
    assert lockout.is_locked("ip")  # not yet: exactly the period
    clock.now += 0.001
    assert not lockout.is_locked("ip")
    lockout.failed("ip")  # the count started over
    assert not lockout.is_locked("ip")


def test_old_failures_expire():
    clock = Clock()
    lockout = FailureLockout(2, 60.0, clock=clock)
    lockout.failed("ip")
    clock.now += 61
    lockout.failed("ip")
    assert not lockout.is_locked("ip")


def test_failure_while_locked_extends_the_lock():
    clock = Clock()
    lockout = FailureLockout(1, 60.0, clock=clock)
    lockout.failed("ip")
    clock.now += 50
    lockout.failed("ip")
    clock.now += 50
    assert lockout.is_locked("ip")
    clock.now += 11
    assert not lockout.is_locked("ip")


def test_unknown_address_is_not_locked_and_not_remembered():
    lockout = FailureLockout(1, 60.0, clock=Clock())
    assert not lockout.is_locked("203.0.113.9")
    assert lockout._failures == {}


def test_expired_entries_are_forgotten():
    clock = Clock()
    lockout = FailureLockout(5, 10.0, clock=clock)
    lockout.failed("ip")
    clock.now += 11
    lockout.is_locked("ip")
    assert "ip" not in lockout._failures
