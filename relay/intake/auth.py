"""SMTP AUTH (PLAIN, LOGIN): users from the config, passwords stored hashed.

Input: the credentials a client sends.  Output: accepted or not, and per
client IP a count of failures that locks the address out for a while.

Passwords are stored as scrypt hashes (``scrypt$n$r$p$salt$hash``, made
by ``relayctl hash-password``).  A successful check is remembered by a
keyed digest of the password, so an application that authenticates on
every connection pays for scrypt once, not per session; the scrypt itself
runs in an executor (``check_async``), never on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

from relay.config import User

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: bytes, encoded: str) -> bool:
    try:
        _, n, r, p, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class Authenticator:
    """Checks credentials against the configured users."""

    def __init__(self, users: tuple[User, ...]) -> None:
        self._users = {user.name: user.password_hash for user in users}
        self._key = os.urandom(32)
        self._verified: set[tuple[str, bytes]] = set()

    def check(self, login: bytes, password: bytes) -> bool:
        step = self._lookup(login, password)
        if isinstance(step, bool):
            return step
        return self._remember(step, verify_password(password, step[0]))

    async def check_async(self, login: bytes, password: bytes, loop) -> bool:
        """``check`` with the scrypt (tens of ms) on the loop's executor."""
        step = self._lookup(login, password)
        if isinstance(step, bool):
            return step
        return self._remember(step, await loop.run_in_executor(None, verify_password, password, step[0]))

    def _lookup(self, login: bytes, password: bytes) -> bool | tuple[str, bytes]:
        """True/False when known without scrypt, else what scrypt must check."""
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            return False
        encoded = self._users.get(name)
        if encoded is None:
            return False
        token = (encoded, hmac.digest(self._key, password, "sha256"))
        return True if token in self._verified else token

    def _remember(self, token: tuple[str, bytes], ok: bool) -> bool:
        if ok:
            self._verified.add(token)
        return ok


class FailureLockout:
    """Failed authentications per client IP; too many locks the IP out.
    With ``shared`` (intake.clients.ClientView) the failures counted by the
    other workers count too, so the limit holds for the whole relay."""

    def __init__(self, max_failures: int, lockout: float, clock=time.monotonic, shared=None) -> None:
        self.max_failures = max_failures
        self.lockout = lockout
        self._clock = clock
        self._shared = shared
        self._failures: dict[str, tuple[int, float]] = {}  # ip -> (count, last failure)

    def failed(self, ip: str) -> None:
        count, _ = self._current(ip)
        now = self._clock()
        self._failures[ip] = (count + 1, now)
        if self._shared is not None:
            self._shared.set_failures(ip, count + 1, now)
        if len(self._failures) > 10000:  # addresses that never came back
            for old in [k for k, v in self._failures.items() if now - v[1] > self.lockout]:
                self._forget(old)

    def is_locked(self, ip: str) -> bool:
        count = self._current(ip)[0]
        if self._shared is not None:
            count += self._shared.other_failures(ip, self._clock() - self.lockout)
        return count >= self.max_failures

    def _current(self, ip: str) -> tuple[int, float]:
        count, last = self._failures.get(ip, (0, 0.0))
        if count and self._clock() - last > self.lockout:
            self._forget(ip)
            return 0, 0.0
        return count, last

    def _forget(self, ip: str) -> None:
        del self._failures[ip]
        if self._shared is not None:
            self._shared.set_failures(ip, 0, 0.0)
