"""Golden vectors from the RFCs, against both implementations (Postfix .in/.ref style).

* rfc6376-3.4.5.eml -> rfc6376-3.4.5.{relaxed,simple}.ref: RFC 6376
  section 3.4.5, the canonicalization example.  A .ref holds the canonical
  header fields, each followed by CRLF (section 3.7 hashes them so), then
  the canonical body.
* rfc8463-a.eml -> rfc8463-a.ref: RFC 8463 appendix A.  The .eml is the
  message of A.3 without its signatures, the .ref the two DKIM-Signature
  fields as published; the keys are A.1 (rfc8463-a.ed25519.seed,
  rfc8463-a.rsa.pem: published test keys, not secrets) and the DNS records
  A.2 (rfc8463-a.dns).  Ed25519 and RSASSA-PKCS1-v1_5 are deterministic, so
  the published b= values must come out byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import os
import re

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding

from relay.config import DkimIdentity
from relay.dkim.sign import Signer, split_header
from support import dkimpy_verify

HERE = os.path.dirname(os.path.abspath(__file__))


def golden(name: str) -> bytes:
    with open(os.path.join(HERE, name), "rb") as file:
        return file.read()


@pytest.fixture(params=["_ref", "_fast"])
def impl(request):
    """(canon module, bodyhash module) of one implementation."""
    try:
        return tuple(
            importlib.import_module(f"relay.{request.param}.{name}") for name in ("canon", "bodyhash")
        )
    except ImportError:
        if request.param == "_ref" or os.environ.get("RELAY_REQUIRE_EXTENSIONS") == "1":
            raise
        pytest.skip("relay._fast is not built (python setup.py build_ext --inplace)")


def body_hash(bodyhash, canon: str, body: bytes, step: int | None = None) -> bytes:
    hasher = bodyhash.BodyHasher("sha256", canon, None)
    for start in range(0, len(body), step or max(1, len(body))):
        hasher.update(body[start : start + (step or len(body))])
    return hasher.digest()


# -- RFC 6376 section 3.4.5 ----------------------------------------------------


@pytest.mark.parametrize("algorithm", ["relaxed", "simple"])
@pytest.mark.parametrize("step", [None, 1, 3])
def test_rfc6376_canonicalization_example(impl, algorithm, step):
    canon, bodyhash = impl
    message = golden("rfc6376-3.4.5.eml")
    expected = golden(f"rfc6376-3.4.5.{algorithm}.ref")
    fields, body_start = split_header(message)
    header_fn = getattr(canon, f"canon_header_{algorithm}")
    headers = b"".join(header_fn(name, value) + b"\r\n" for name, value in fields)
    assert expected.startswith(headers)
    canonical_body = expected[len(headers) :]
    body = message[body_start:]
    assert body_hash(bodyhash, algorithm, body, step) == hashlib.sha256(canonical_body).digest()
    hasher = bodyhash.BodyHasher("sha256", algorithm, None)
    hasher.update(body)
    hasher.digest()
    assert hasher.length == len(canonical_body)


def test_rfc6376_empty_body(impl):
    # Section 3.4.3: an empty body is one CRLF under "simple" (2 octets);
    # section 3.4.4: under "relaxed" it stays empty.
    _, bodyhash = impl
    assert body_hash(bodyhash, "simple", b"") == hashlib.sha256(b"\r\n").digest()
    assert body_hash(bodyhash, "relaxed", b"") == hashlib.sha256(b"").digest()


# -- RFC 8463 appendix A -------------------------------------------------------


def rfc8463_keys():
    seed = base64.b64decode(golden("rfc8463-a.ed25519.seed"))
    ed_key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    rsa_key = serialization.load_pem_private_key(golden("rfc8463-a.rsa.pem"), password=None)
    return {"brisbane": ed_key, "test": rsa_key}


def rfc8463_dns() -> dict[bytes, bytes]:
    records = {}
    for line in golden("rfc8463-a.dns").decode().splitlines():
        name, _, txt = line.partition(" ")
        records[name.encode()] = txt.encode()
    return records


def dnsfunc(name, timeout=5):
    return rfc8463_dns().get(name if isinstance(name, bytes) else name.encode())


def published_signatures() -> list[tuple[bytes, bytes]]:
    """The .ref's DKIM-Signature fields as (name, value)."""
    fields, _ = split_header(golden("rfc8463-a.ref"))
    assert [name for name, _ in fields] == [b"DKIM-Signature"] * 2
    return fields


def tags(value: bytes) -> dict[bytes, bytes]:
    unfolded = re.sub(rb"\s+", b"", value)
    return dict(tag.split(b"=", 1) for tag in unfolded.split(b";") if tag)


def test_rfc8463_published_keys_match_their_dns_records():
    # Guards the transcription of A.1 against A.2.
    dns = rfc8463_dns()
    ed_public = rfc8463_keys()["brisbane"].public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert dns[b"brisbane._domainkey.football.example.com."].endswith(base64.b64encode(ed_public))
    rsa_public = rfc8463_keys()["test"].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert dns[b"test._domainkey.football.example.com."].endswith(base64.b64encode(rsa_public))


@pytest.mark.parametrize("step", [None, 1, 7])
def test_rfc8463_body_hash(impl, step):
    _, bodyhash = impl
    message = golden("rfc8463-a.eml")
    _, body_start = split_header(message)
    digest = body_hash(bodyhash, "relaxed", message[body_start:], step)
    for _name, value in published_signatures():
        assert base64.b64encode(digest) == tags(value)[b"bh"]


def test_rfc8463_signatures_reproduced_byte_for_byte(impl):
    """Canonicalize as section 3.7 says and sign with the A.1 keys: the published b=."""
    canon, _ = impl
    message = golden("rfc8463-a.eml")
    fields, _ = split_header(message)
    keys = rfc8463_keys()
    for sig_name, sig_value in published_signatures():
        sig = tags(sig_value)
        data = []
        used: dict[bytes, int] = {}
        for name in sig[b"h"].split(b":"):
            # Section 5.4.2: instances are taken from the bottom up; a name
            # listed more often than present contributes nothing.
            instances = [f for f in fields if f[0].lower() == name]
            taken = used.get(name, 0)
            used[name] = taken + 1
            if taken < len(instances):
                field_name, value = instances[len(instances) - 1 - taken]
                data.append(canon.canon_header_relaxed(field_name, value) + b"\r\n")
        emptied = re.sub(rb"b=[A-Za-z0-9+/=\s]*$", b"b=", sig_value)
        data.append(canon.canon_header_relaxed(sig_name, emptied))
        signed = b"".join(data)
        key = keys[sig[b"s"].decode()]
        if sig[b"a"] == b"ed25519-sha256":
            signature = key.sign(hashlib.sha256(signed).digest())  # RFC 8463 section 3
        else:
            signature = key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
        assert base64.b64encode(signature) == sig[b"b"]


@pytest.mark.parametrize("idx", [0, 1])
def test_rfc8463_published_message_verifies_with_dkimpy(idx):
    signed = golden("rfc8463-a.ref") + golden("rfc8463-a.eml")
    assert dkimpy_verify(signed, dnsfunc, idx)


def test_rfc8463_our_signer_with_the_rfc_keys_verifies(tmp_path):
    identities = []
    for selector, key in rfc8463_keys().items():
        path = tmp_path / f"{selector}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        algorithm = "ed25519-sha256" if selector == "brisbane" else "rsa-sha256"
        identities.append(DkimIdentity("football.example.com", selector, str(path), algorithm))
    signer = Signer.from_identities(tuple(identities))
    message = golden("rfc8463-a.eml")
    fields, _ = split_header(signer.sign(message, "joe@football.example.com"))
    assert len(fields) == 2
    for name, value in fields:
        assert dkimpy_verify(name + b":" + value + b"\r\n" + message, dnsfunc)
