"""DKIM signing at intake (RFC 6376 sections 3.5, 3.7, 5; RFC 8463 for Ed25519).

Input: a whole message as bytes -- header, blank line, body -- already
CRLF-normalised by intake (no bare CR or LF, no NUL), and the envelope
sender (``MAIL FROM``, "" for the null sender).
Output: the DKIM-Signature header fields to prepend to the message, each
folded and ending with CRLF; ``b""`` when no configured identity applies.

Which identities sign (first rule that finds one wins):
  1. the domain of the (first) From: address: an identity for exactly that
     domain, else for its closest parent domain, so an identity for
     example.com signs mail from news.example.com.  d= is then the
     organizational or a parent domain of the From domain, which keeps the
     DMARC relaxed alignment that nearly every domain publishes;
  2. the envelope sender's domain, by the same exact-then-parent rule (no
     DMARC alignment, but the mail still carries the sender's reputation);
  3. the identities marked ``default = true``.
Every identity of the chosen domain signs, in configuration order: an RSA
and an Ed25519 key for one domain give two signatures (RFC 8463 section 1
expects both during the transition).  Domains are compared lower-case, in
A-label (IDNA) form.

Signed header fields: the identity's ``headers``, or ``DEFAULT_HEADERS``;
only the names present are listed, once per instance, so every instance is
signed (RFC 6376 section 5.4.2 takes them from the bottom up), and From is
listed once more than present ("over-signed") so that a From added later
breaks the signature.  From is always signed (section 5.4: it MUST be).

Every signature carries t= (signing time).  ``l=`` (body length, section 3.5)
is added only on request: it lets anyone append to the body, so it is off
by default.

Canonicalization and the body hash come from relay.accel (the Cython hot
path); the body is fed to the hasher as a memoryview slice of the message,
never copied, and hashed once per body canonicalization however many keys
sign.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Callable, Iterable

import idna
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay import accel
from relay.config import DkimIdentity
from relay.dkim.keys import ALGORITHMS, PrivateKey, load_private_key
from relay.errors import ConfigError

__all__ = ["DEFAULT_HEADERS", "Signer", "is_dns_name", "normalize_domain", "split_header"]

DEFAULT_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "in-reply-to",
    "references",
    "sender",
)

CANONICALIZATIONS = ("simple", "relaxed")
_FIELD_NAME = b"DKIM-Signature"
_LINE_WIDTH = 78  # RFC 5322 section 2.1.1: SHOULD fit in 78 characters
_B64_PER_LINE = 72
_WSP = b" \t"
_CANON = {
    "simple": accel.canon_header_simple,
    "relaxed": accel.canon_header_relaxed,
}


# -- parsing the header ------------------------------------------------------


def split_header(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """The header fields as (name, value) and the offset where the body starts.

    ``name`` is as it appears (whitespace before the colon kept, for
    "simple"), ``value`` is everything after the colon, folds included, final
    CRLF excluded.  A line without a colon (an mbox "From " line, junk) is
    not a field and cannot be signed; it is skipped.  A message without the
    blank line is all header and has an empty body.
    """
    if message.startswith(b"\r\n"):
        return [], 2
    end = message.find(b"\r\n\r\n")
    if end < 0:
        header = message[:-2] if message.endswith(b"\r\n") else message
        body_start = len(message)
    else:
        header = message[:end]
        body_start = end + 4
    raw: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and raw:
            raw[-1] += b"\r\n" + line  # a continuation line (a fold)
        else:
            raw.append(line)
    fields = []
    for field in raw:
        colon = field.find(b":")
        if colon > 0:
            fields.append((field[:colon], field[colon + 1 :]))
    return fields, body_start


def _index(fields: list[tuple[bytes, bytes]]) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Fields by lower-case name (no WSP), top to bottom."""
    index: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for name, value in fields:
        index.setdefault(name.rstrip(_WSP).lower(), []).append((name, value))
    return index


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form, no trailing dot: the form domains are compared in."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            pass  # not a valid IDN: compare it as it is, it will match nothing
    return domain


def _address_domain(address: str) -> str:
    local, at, domain = address.strip().strip("<>").rpartition("@")
    return normalize_domain(domain) if at else ""


# The usual From: forms, "Name <addr>" and "addr", with nothing a full
# RFC 5322 parser is needed for (quotes, comments, groups, lists); anything
# else goes through email.utils.getaddresses, which costs ~5 us a message.
_PLAIN_FROM = re.compile(
    rb"[^\"(),;:<>@\\]*<([^<>\"()\s,;:\\]+)>\s*|\s*([^<>\"()\s,;:\\]+@[^<>\"()\s,;:\\]+)\s*"
)


def _from_domain(index: dict[bytes, list[tuple[bytes, bytes]]]) -> str:
    """The domain of the first address of the first From: field, or ""."""
    fields = index.get(b"from")
    if not fields:
        return ""
    value = fields[0][1].replace(b"\r\n", b"")
    match = _PLAIN_FROM.fullmatch(value)
    if match:
        return _address_domain((match.group(1) or match.group(2)).decode("utf-8", "replace"))
    for _name, address in getaddresses([value.decode("utf-8", "replace")]):
        domain = _address_domain(address)
        if domain:
            return domain
    return ""


# -- the signer --------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    """One identity, checked and ready: everything per-signature work needs."""

    identity: DkimIdentity
    domain: str  # normalized, for matching
    private_key: PrivateKey
    header_canon: str
    body_canon: str
    headers: tuple[tuple[bytes, str], ...]  # lower-case names to sign if present, "from" first
    head: str  # "DKIM-Signature: v=1; a=...; c=...; d=...; s=...;" (folded if long)


def _prepare(identity: DkimIdentity) -> _Key:
    label = f"[[dkim]] {identity.domain or '?'}/{identity.selector or '?'}"
    if identity.algorithm not in ALGORITHMS:
        raise ConfigError(f"{label} algorithm: expected one of {ALGORITHMS}, got {identity.algorithm!r}")
    header_canon, slash, body_canon = identity.canonicalization.partition("/")
    if not slash or header_canon not in CANONICALIZATIONS or body_canon not in CANONICALIZATIONS:
        raise ConfigError(
            f"{label} canonicalization: expected header/body, each simple or relaxed,"
            f" got {identity.canonicalization!r}"
        )
    domain = normalize_domain(identity.domain)
    if not domain or not is_dns_name(domain):
        raise ConfigError(f"{label} domain: expected a domain name, got {identity.domain!r}")
    if not is_dns_name(identity.selector):
        raise ConfigError(f"{label} selector: expected a DNS label, got {identity.selector!r}")
    names = []
    for name in ("from",) + tuple(n.strip().lower() for n in identity.headers or DEFAULT_HEADERS):
        if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
            raise ConfigError(f"{label} headers: {name!r} is not a header field name")
        if name == "dkim-signature":
            raise ConfigError(f"{label} headers: DKIM-Signature cannot sign itself")
        if (name.encode(), name) not in names:
            names.append((name.encode(), name))
    key = load_private_key(identity.key_file, identity.algorithm)
    tags = [
        "v=1;",
        f"a={identity.algorithm};",
        f"c={header_canon}/{body_canon};",
        f"d={domain};",
        f"s={identity.selector};",
    ]
    head = "DKIM-Signature: " + _fold_tags(tags, len("DKIM-Signature: "))
    return _Key(identity, domain, key, header_canon, body_canon, tuple(names), head)


def is_dns_name(name: str) -> bool:
    """Dot-separated labels of letters, digits, "-" and "_" (selectors use "_" too)."""
    labels = name.split(".")
    return all(
        0 < len(label) <= 63 and label.isascii() and all(c.isalnum() or c in "-_" for c in label)
        for label in labels
    )


class Signer:
    """Signs messages with the configured DKIM identities.  Immutable; share it."""

    def __init__(self, keys: Iterable[_Key], *, clock: Callable[[], float] = time.time):
        self._keys = tuple(keys)
        self._clock = clock
        self._by_domain: dict[str, tuple[_Key, ...]] = {}
        for key in self._keys:
            self._by_domain[key.domain] = self._by_domain.get(key.domain, ()) + (key,)
        self._defaults = tuple(key for key in self._keys if key.identity.default)

    @classmethod
    def from_identities(
        cls, identities: Iterable[DkimIdentity], *, clock: Callable[[], float] = time.time
    ) -> "Signer":
        """Check every identity and load its key now: a bad one is a startup ConfigError."""
        return cls((_prepare(identity) for identity in identities), clock=clock)

    @property
    def identities(self) -> tuple[DkimIdentity, ...]:
        return tuple(key.identity for key in self._keys)

    def choose(self, from_domain: str, envelope_domain: str) -> tuple[DkimIdentity, ...]:
        """The identities that sign mail with these From and envelope domains."""
        return tuple(key.identity for key in self._choose(from_domain, envelope_domain))

    def _choose(self, from_domain: str, envelope_domain: str) -> tuple[_Key, ...]:
        for domain in (from_domain, envelope_domain):
            while domain:
                keys = self._by_domain.get(domain)
                if keys:
                    return keys
                domain = domain.partition(".")[2]  # the parent domain
        return self._defaults

    def sign(self, message: bytes, envelope_sender: str, *, body_length: bool = False) -> bytes:
        """The DKIM-Signature fields to prepend to ``message`` (b"" if none applies).

        ``body_length=True`` adds l= with the canonical body length.
        """
        if not self._keys:
            return b""
        fields, body_start = split_header(message)
        index = _index(fields)
        keys = self._choose(_from_domain(index), _address_domain(envelope_sender))
        if not keys:
            return b""
        timestamp = int(self._clock())
        body = memoryview(message)[body_start:]
        body_hashes: dict[str, tuple[bytes, int]] = {}
        out = []
        for key in keys:
            if key.body_canon not in body_hashes:
                hasher = accel.BodyHasher("sha256", key.body_canon, None)
                hasher.update(body)
                body_hashes[key.body_canon] = (hasher.digest(), hasher.length)
            body_hash, length = body_hashes[key.body_canon]
            out.append(
                _signature(key, index, body_hash, length if body_length else None, timestamp)
            )
        return b"".join(out)


def _signature(
    key: _Key,
    index: dict[bytes, list[tuple[bytes, bytes]]],
    body_hash: bytes,
    length: int | None,
    timestamp: int,
) -> bytes:
    """One DKIM-Signature field, folded, ending with CRLF (RFC 6376 section 3.7).

    Layout (folding only between tags and after the colons of h=, where
    FWS is allowed, section 3.5, so a verifier rebuilds exactly the text that
    was hashed, under either canonicalization):

        DKIM-Signature: v=1; a=...; c=...; d=...; s=...;
         t=...; h=from:from:to:...;
         bh=...;[ l=...;]
         b=...
    """
    canon = _CANON[key.header_canon]
    names: list[str] = []
    signed: list[bytes] = []
    for name, text in key.headers:
        instances = index.get(name, ())
        # List each instance (bottom-up on verification, section 5.4.2);
        # From once more, so that adding a From breaks the signature.
        names.extend([text] * (len(instances) + (name == b"from")))
        for field_name, value in reversed(instances):
            signed.append(canon(field_name, value))
            signed.append(b"\r\n")
    stamp = f" t={timestamp}; "
    header = "".join(
        (
            key.head,
            "\r\n",
            stamp,
            _h_tag(tuple(names), len(stamp)),
            "\r\n bh=",
            base64.b64encode(body_hash).decode("ascii"),
            ";",
            "" if length is None else f" l={length};",
            "\r\n b=",
        )
    ).encode("ascii")
    # The field itself is hashed with an empty b= and without its CRLF
    # (section 3.7, step 2): header ends with "b=", the value comes next.
    signed.append(canon(_FIELD_NAME, header[len(_FIELD_NAME) + 1 :]))
    data = b"".join(signed)
    if key.identity.algorithm == "ed25519-sha256":
        # RFC 8463 section 3: Ed25519 (pure) signs the SHA-256 hash of the data.
        signature = key.private_key.sign(hashlib.sha256(data).digest())
    else:
        assert isinstance(key.private_key, rsa.RSAPrivateKey)
        signature = key.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    b64 = base64.b64encode(signature)
    # b= continues on folded lines; FWS inside the value is ignored (3.5).
    lines = [b64[i : i + _B64_PER_LINE] for i in range(0, len(b64), _B64_PER_LINE)]
    return header + b"\r\n ".join(lines) + b"\r\n"


def _fold_tags(pieces: list[str], column: int) -> str:
    """Tags joined by a space, folded before a tag that would pass the line width."""
    out = []
    for piece in pieces:
        if out and column + 1 + len(piece) > _LINE_WIDTH:
            out.append("\r\n ")
            column = 1
        elif out:
            out.append(" ")
            column += 1
        out.append(piece)
        column += len(piece)
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def _h_tag(names: tuple[str, ...], column: int) -> str:
    """``h=a:b:c;`` folded after a colon when a line would pass the width.

    Cached: bulk mail repeats the same header layout message after message.
    """
    out = ["h="]
    column += 2
    last = len(names) - 1
    for i, name in enumerate(names):
        piece = name + (";" if i == last else ":")
        if i and column + len(piece) > _LINE_WIDTH:
            out.append("\r\n ")
            column = 1
        out.append(piece)
        column += len(piece)
    return "".join(out)
