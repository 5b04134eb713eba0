"""DKIM private keys: load them at start, generate new ones for `relayctl dkim keygen`.

Input: a PEM file (PKCS#8 or traditional "RSA PRIVATE KEY", unencrypted)
and the algorithm its [[dkim]] identity declares.
Output: a ``cryptography`` private key object ready to sign, or a
``ConfigError`` naming the key file; for keygen, the PEM bytes and the DNS
TXT value to publish (RFC 6376 section 3.6.1, RFC 8463 section 4).
"""

from __future__ import annotations

import base64

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "RSA_MIN_BITS",
    "RSA_MAX_BITS",
    "PrivateKey",
    "generate",
    "load_private_key",
    "public_key_txt",
]

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
# RFC 8301 section 3.2: signers MUST use at least 1024 bits, SHOULD use
# 2048; verifiers need not accept more than 4096.
RSA_MIN_BITS = 1024
RSA_MAX_BITS = 4096

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def load_private_key(path: str, algorithm: str) -> PrivateKey:
    """Read the PEM private key at ``path`` for ``algorithm``, or raise ConfigError."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"[[dkim]] algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    try:
        with open(path, "rb") as file:
            pem = file.read()
    except OSError as exc:
        raise ConfigError(f"[[dkim]] key_file {path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(
            f"[[dkim]] key_file {path}: the key is encrypted; DKIM keys must be stored"
            " without a passphrase (protect the file with mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # The exception text may quote the file; never echo key material.
        raise ConfigError(f"[[dkim]] key_file {path}: not a PEM private key") from None
    _check_type(path, key, algorithm)
    return key


def _check_type(path: str, key: object, algorithm: str) -> None:
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(
                f"[[dkim]] key_file {path}: algorithm rsa-sha256 needs an RSA key,"
                f" this is {_kind(key)}"
            )
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            raise ConfigError(
                f"[[dkim]] key_file {path}: RSA key of {key.key_size} bits; expected"
                f" {RSA_MIN_BITS} to {RSA_MAX_BITS} (2048 recommended)"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(
            f"[[dkim]] key_file {path}: algorithm ed25519-sha256 needs an Ed25519 key,"
            f" this is {_kind(key)}"
        )


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a {type(key).__name__.lstrip('_')}"


def public_key_txt(key: PrivateKey) -> str:
    """The DKIM key record to publish for ``key``: ``v=DKIM1; k=...; p=...``.

    RSA: p= is the DER SubjectPublicKeyInfo in base64, as every verifier
    accepts (RFC 6376 section 3.6.1).  Ed25519: p= is the raw 32-byte public
    key in base64, not wrapped in ASN.1 (RFC 8463 section 4).
    """
    public = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"


def generate(algorithm: str = "rsa-sha256", bits: int = 2048) -> tuple[bytes, str]:
    """A new key: (unencrypted PKCS#8 PEM, DNS TXT value).  ``bits`` is for RSA only."""
    if algorithm == "rsa-sha256":
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise ConfigError(
                f"RSA key size {bits}: expected {RSA_MIN_BITS} to {RSA_MAX_BITS} bits"
            )
        key: PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ConfigError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, public_key_txt(key)
