"""relay.dkim.sign: what we sign verifies with dkimpy, and the right identities sign.

Keys are made once per module (RSA 1024 and 2048, Ed25519); dkimpy reads
their public halves through a ``dnsfunc`` (no network).  Each signature is
verified on its own: dkimpy checks the topmost DKIM-Signature only.
"""

from __future__ import annotations

import base64
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay import accel
from relay.config import DkimIdentity
from relay.dkim import sign as sign_module
from relay.dkim.keys import public_key_txt
from relay.dkim.sign import Signer, split_header
from relay.errors import ConfigError
from support import dkimpy_verify

NOW = 1_700_000_000.0
CANONICALIZATIONS = ("relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed")


# -- keys and a fake DNS -------------------------------------------------------


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """{name: (algorithm, key file, private key)} for rsa1024, rsa2048, ed25519."""
    directory = tmp_path_factory.mktemp("dkim")
    made = {
        "rsa1024": ("rsa-sha256", rsa.generate_private_key(65537, 1024)),
        "rsa2048": ("rsa-sha256", rsa.generate_private_key(65537, 2048)),
        "ed25519": ("ed25519-sha256", ed25519.Ed25519PrivateKey.generate()),
    }
    out = {}
    for name, (algorithm, key) in made.items():
        path = directory / f"{name}.pem"
        path.write_bytes(_pem(key))
        out[name] = (algorithm, str(path), key)
    return out


class FakeDns:
    """TXT records by name, in the form dkimpy's dnsfunc returns them."""

    def __init__(self):
        self.records: dict[bytes, bytes] = {}

    def publish(self, selector: str, domain: str, key) -> None:
        name = f"{selector}._domainkey.{domain}.".encode()
        self.records[name] = public_key_txt(key).encode()

    def __call__(self, name, timeout=5):
        return self.records.get(name)


def identity(keys, name, domain="example.com", selector=None, **extra) -> DkimIdentity:
    algorithm, path, _ = keys[name]
    return DkimIdentity(domain, selector or name, path, algorithm, **extra)


def signer_and_dns(keys, *identities: DkimIdentity) -> tuple[Signer, FakeDns]:
    dns = FakeDns()
    by_path = {path: key for _, path, key in keys.values()}
    for ident in identities:
        dns.publish(ident.selector, sign_module.normalize_domain(ident.domain), by_path[ident.key_file])
    return Signer.from_identities(identities, clock=lambda: NOW), dns


def signatures(prefix: bytes) -> list[bytes]:
    """Each DKIM-Signature field of the signer's output, with its CRLF."""
    fields, _ = split_header(prefix + b"\r\n")
    assert prefix == b"".join(name + b":" + value + b"\r\n" for name, value in fields)
    return [name + b":" + value + b"\r\n" for name, value in fields]


def tags(field: bytes) -> dict[str, str]:
    value = field.partition(b":")[2]
    unfolded = re.sub(rb"\s+", b"", value).decode()
    return dict(tag.split("=", 1) for tag in unfolded.split(";") if tag)


def verify_each(prefix: bytes, message: bytes, dns: FakeDns) -> None:
    fields = signatures(prefix)
    assert fields
    for field in fields:
        assert dkimpy_verify(field + message, dns), field


# -- the corpus --------------------------------------------------------------

HEADER = (
    b"From: Joe SixPack <joe@example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@example.com>\r\n"
)

CORPUS = {
    "plain": HEADER + b"\r\nHi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n",
    "folded and long headers": (
        b"From: Joe SixPack\r\n <joe@example.com>\r\n"
        b"To: a@example.net,\r\n\tb@example.net,  \r\n   c@example.net\r\n"
        b"Subject: " + b"long " * 180 + b"\r\n"
        b"Subject2: " + b"\r\n ".join([b"folded"] * 40) + b"\r\n"
        b"X-Long: " + b"y" * 900 + b"\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain;\r\n\tcharset=utf-8\r\n"
        b"\r\nbody\r\n"
    ),
    "duplicated headers": (
        b"Received: from a by b\r\nReceived: from c by d\r\n"
        + HEADER
        + b"To: second@example.net\r\nCc: x@example.org\r\nCc: y@example.org\r\n"
        + b"Subject: a second subject\r\n\r\nbody\r\n"
    ),
    "8-bit body": HEADER + b"\r\ncaf\xe9 \xff\xfe\x80 na\xefve\r\n",
    "utf-8 header and body": (
        b"From: =?utf-8?q?J=C3=B6rg?= <j\xc3\xb6rg@example.com>\r\n"
        b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n\r\n"
        b"Gr\xc3\xbc\xc3\x9fe \xe2\x82\xac \xf0\x9f\x93\xa7\r\n"
    ),
    "trailing blank lines": HEADER + b"\r\nbody\r\n\r\n\r\n\r\n  \r\n\r\n",
    "empty body": HEADER + b"\r\n",
    "no body at all": HEADER,
    "body without final CRLF": HEADER + b"\r\nline one\r\nno newline at the end",
    "very long lines": HEADER + b"\r\n" + b"x" * 20_000 + b"\r\n" + b"y z " * 5000 + b"\r\n",
    "whitespace": HEADER + b"\r\n \t lead\r\nmid \t\t run\r\ntrail \t \r\n\t\r\nend\r\n",
    "list headers": (
        HEADER + b"List-Id: News <news.example.com>\r\n"
        b"List-Unsubscribe: <https://example.com/u/1>, <mailto:u@example.com>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nnews\r\n"
    ),
}


@pytest.mark.parametrize("key_name", ["rsa1024", "rsa2048", "ed25519"])
@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
def test_corpus_verifies_with_dkimpy(keys, key_name, canonicalization):
    ident = identity(keys, key_name, canonicalization=canonicalization)
    signer, dns = signer_and_dns(keys, ident)
    for label, message in CORPUS.items():
        prefix = signer.sign(message, "bounces@example.com")
        (field,) = signatures(prefix)
        assert dkimpy_verify(field + message, dns), label
        # Tampering with a signed header or the body breaks it.
        tampered = message.replace(b"example.com>", b"example.org>", 1)
        assert tampered != message
        assert not dkimpy_verify(field + tampered, dns), label


def test_signature_field_shape(keys):
    signer, _ = signer_and_dns(keys, identity(keys, "rsa2048"))
    prefix = signer.sign(CORPUS["duplicated headers"], "")
    assert prefix.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;")
    assert prefix.endswith(b"\r\n")
    lines = prefix[:-2].split(b"\r\n")
    assert all(len(line) <= 78 for line in lines)
    assert all(line[:1] == b" " for line in lines[1:])  # folded, never a new field
    found = tags(prefix)
    assert found["s"] == "rsa2048" and found["t"] == str(int(NOW))
    # Present names only, once per instance; From once more (over-signed).
    assert found["h"] == "from:from:to:to:cc:cc:subject:subject:date:message-id"
    assert "l" not in found


def test_custom_header_list_always_signs_from(keys):
    ident = identity(keys, "ed25519", headers=("Subject", "X-Mailer", "subject"))
    signer, dns = signer_and_dns(keys, ident)
    message = HEADER + b"X-Mailer: relay\r\n\r\nbody\r\n"
    prefix = signer.sign(message, "")
    assert tags(prefix)["h"] == "from:from:subject:x-mailer"
    verify_each(prefix, message, dns)


def test_message_without_from_still_signs_from(keys):
    signer, dns = signer_and_dns(keys, identity(keys, "ed25519", default=True))
    message = b"To: a@example.net\r\nSubject: no from\r\n\r\nbody\r\n"
    prefix = signer.sign(message, "")
    assert tags(prefix)["h"] == "from:to:subject"  # an absent From is still signed (as null)


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_body_length_tag(keys, canonicalization):
    signer, dns = signer_and_dns(keys, identity(keys, "ed25519", canonicalization=canonicalization))
    message = HEADER + b"\r\nbody  text\r\n\r\n"
    prefix = signer.sign(message, "", body_length=True)
    expected = {"relaxed/relaxed": len(b"body text\r\n"), "simple/simple": len(b"body  text\r\n")}
    assert tags(prefix)["l"] == str(expected[canonicalization])
    verify_each(prefix, message, dns)
    # l= lets text be appended to the body (why it is off by default).
    verify_each(prefix, message + b"appended by a list\r\n", dns)
    plain = signer.sign(message, "")
    assert not dkimpy_verify(plain + message + b"appended\r\n", dns)


def test_same_signature_with_ref_and_fast(keys, monkeypatch):
    """The signer only uses relay.accel: both implementations give the same bytes."""
    from relay._ref import bodyhash as ref_bodyhash
    from relay._ref import canon as ref_canon

    idents = [
        identity(keys, "rsa2048", canonicalization=c, selector=f"s{i}")
        for i, c in enumerate(CANONICALIZATIONS)
    ]
    idents.append(identity(keys, "ed25519"))
    signer, dns = signer_and_dns(keys, *idents)
    outputs = []
    for use_ref in (False, True):
        if use_ref:
            monkeypatch.setattr(accel, "BodyHasher", ref_bodyhash.BodyHasher)
            monkeypatch.setattr(
                sign_module,
                "_CANON",
                {"simple": ref_canon.canon_header_simple, "relaxed": ref_canon.canon_header_relaxed},
            )
        outputs.append([signer.sign(m, "") for m in CORPUS.values()])
    assert outputs[0] == outputs[1]
    verify_each(outputs[1][0], CORPUS["plain"], dns)


# -- which identities sign -----------------------------------------------------


def test_two_identities_for_one_domain_give_two_signatures(keys):
    idents = (identity(keys, "rsa2048"), identity(keys, "ed25519"))
    signer, dns = signer_and_dns(keys, *idents)
    prefix = signer.sign(CORPUS["plain"], "")
    fields = signatures(prefix)
    assert [tags(f)["a"] for f in fields] == ["rsa-sha256", "ed25519-sha256"]
    assert len({tags(f)["bh"] for f in fields}) == 1  # one body hash for both
    verify_each(prefix, CORPUS["plain"], dns)


def from_message(address: str) -> bytes:
    return f"From: Someone <{address}>\r\nSubject: x\r\n\r\nbody\r\n".encode()


@pytest.fixture
def chooser(keys):
    idents = (
        identity(keys, "rsa2048", domain="example.com", selector="org"),
        identity(keys, "ed25519", domain="news.example.com", selector="news"),
        identity(keys, "rsa1024", domain="other.example", selector="other"),
        identity(keys, "ed25519", domain="fallback.example", selector="fb", default=True),
        identity(keys, "rsa1024", domain="b\u00fccher.example", selector="idn"),
    )
    return signer_and_dns(keys, *idents)


@pytest.mark.parametrize(
    "from_address,envelope,expected",
    [
        ("joe@example.com", "", ["example.com"]),  # exact
        ("joe@EXAMPLE.com", "", ["example.com"]),  # case-insensitive
        ("joe@news.example.com", "", ["news.example.com"]),  # exact beats parent
        ("joe@a.b.news.example.com", "", ["news.example.com"]),  # closest parent
        ("joe@shop.example.com", "", ["example.com"]),  # parent
        ("joe@unknown.example", "x@other.example", ["other.example"]),  # envelope sender
        ("joe@unknown.example", "x@sub.other.example", ["other.example"]),  # its parent
        ("joe@unknown.example", "", ["fallback.example"]),  # default
        ("joe@unknown.example", "<>", ["fallback.example"]),
        ("joe@xn--bcher-kva.example", "", ["xn--bcher-kva.example"]),  # IDN, A-label d=
        ("joe@b\u00fccher.example", "", ["xn--bcher-kva.example"]),  # U-label From
    ],
)
def test_identity_choice(chooser, from_address, envelope, expected):
    signer, dns = chooser
    message = from_message(from_address)
    prefix = signer.sign(message, envelope)
    assert [tags(f)["d"] for f in signatures(prefix)] == expected
    verify_each(prefix, message, dns)


def test_from_with_display_name_and_several_addresses(chooser):
    signer, _ = chooser
    message = b'From: "a@other.example" <joe@news.example.com>, x@other.example\r\n\r\nb\r\n'
    assert tags(signer.sign(message, ""))["d"] == "news.example.com"
    assert signer.choose("shop.example.com", "") == tuple(
        i for i in signer.identities if i.selector == "org"
    )


def test_no_identity_applies(keys):
    signer, _ = signer_and_dns(keys, identity(keys, "ed25519", domain="example.com"))
    assert signer.sign(from_message("joe@elsewhere.example"), "bounce@elsewhere.example") == b""
    assert Signer.from_identities(()).sign(CORPUS["plain"], "") == b""


# -- startup errors ------------------------------------------------------------


def test_missing_key_file_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "nope" / "example.com.s1.pem"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        Signer.from_identities((DkimIdentity("example.com", "s1", str(missing)),))


def test_wrong_key_type_is_a_config_error(keys):
    _, rsa_path, _ = keys["rsa2048"]
    with pytest.raises(ConfigError, match=r"needs an Ed25519 key.*RSA key"):
        Signer.from_identities((DkimIdentity("example.com", "s1", rsa_path, "ed25519-sha256"),))
    _, ed_path, _ = keys["ed25519"]
    with pytest.raises(ConfigError, match=re.escape(ed_path)):
        Signer.from_identities((DkimIdentity("example.com", "s1", ed_path, "rsa-sha256"),))


def test_bad_key_files_are_config_errors(tmp_path, keys):
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM private key") as info:
        Signer.from_identities((DkimIdentity("example.com", "s1", str(garbage)),))
    assert "c2VjcmV0" not in str(info.value)  # never echo key material
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        keys["rsa1024"][2].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="encrypted"):
        Signer.from_identities((DkimIdentity("example.com", "s1", str(encrypted)),))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"canonicalization": "relaxed"}, "canonicalization"),
        ({"canonicalization": "loose/simple"}, "canonicalization"),
        ({"algorithm": "rsa-sha1"}, "algorithm"),
        ({"domain": "not a domain"}, "domain"),
        ({"selector": "s1; x=y"}, "selector"),
        ({"headers": ("subject", "bad name")}, "headers"),
        ({"headers": ("dkim-signature",)}, "headers"),
    ],
)
def test_bad_identities_are_config_errors(keys, change, message):
    fields = {"domain": "example.com", "selector": "s1", "key_file": keys["rsa1024"][1]}
    fields.update(change)
    with pytest.raises(ConfigError, match=message):
        Signer.from_identities((DkimIdentity(**fields),))


def test_ed25519_signs_the_sha256_of_the_header_data(keys):
    """RFC 8463 section 3: Ed25519 over sha256(data), checked independently of dkimpy."""
    import hashlib

    _, _, key = keys["ed25519"]
    signer, _ = signer_and_dns(keys, identity(keys, "ed25519"))
    message = CORPUS["plain"]
    prefix = signer.sign(message, "")
    fields, _ = split_header(message)
    by_name = {name.lower(): (name, value) for name, value in fields}
    data = b""
    for name in dict.fromkeys(tags(prefix)["h"].split(":")):  # the second "from" adds nothing
        data += accel.canon_header_relaxed(*by_name[name.encode()]) + b"\r\n"
    sig_value = prefix.partition(b":")[2]
    emptied = re.sub(rb"b=[^;]*$", b"b=", sig_value.rstrip(b"\r\n"))
    data += accel.canon_header_relaxed(b"DKIM-Signature", emptied)
    key.public_key().verify(base64.b64decode(tags(prefix)["b"]), hashlib.sha256(data).digest())


@pytest.mark.parametrize(
    "value,domain",
    [
        (b" Joe <joe@Example.COM>", "example.com"),  # the quick path
        (b" joe@example.com.", "example.com"),
        (b" Joe\r\n <joe@example.com>", "example.com"),
        (b' "Doe, Joe" <joe@example.com>', "example.com"),  # the full parser
        (b" joe@example.com (Joe Doe)", "example.com"),
        (b" Team: a@one.example, b@two.example;", "one.example"),
        (b" undisclosed-recipients:;", ""),
        (b" <>", ""),
        (b" Joe <joe>", ""),
        (b" =?utf-8?q?J=C3=B6rg?= <j\xc3\xb6rg@b\xc3\xbccher.example>", "xn--bcher-kva.example"),
    ],
)
def test_from_domain(value, domain):
    assert sign_module._from_domain({b"from": [(b"From", value)]}) == domain
