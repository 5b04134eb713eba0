"""API tokens (pure): make one, hash it, check a bearer token and its scope.

Input: ``[[http.tokens]]`` (name, token_hash, scopes) and the
``Authorization`` header of a request.  Output: the token's name and
scopes, or the reason it is refused.

A token is 256 random bits (``rly_`` + 43 URL-safe characters), so the
hash is plain SHA-256: nobody can guess such a token, and a slow hash
(scrypt, as for the people-chosen AUTH passwords) would only cost every
API request tens of milliseconds of CPU.  The hash is looked up in a
dict, so checking costs one SHA-256 whatever the number of tokens.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

PREFIX = "rly_"


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Grant:
    name: str
    scopes: frozenset[str]


class Tokens:
    def __init__(self, tokens) -> None:
        self._by_hash = {t.token_hash: Grant(t.name, frozenset(t.scopes)) for t in tokens}

    def check(self, authorization: str | None) -> Grant | None:
        """The grant of a ``Bearer`` header, or None (absent, malformed, unknown)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 256:
            return None
        return self._by_hash.get(hash_token(token))
