"""`relayctl dkim keygen` and relay.dkim.keys.generate.

A key file of mode 0600, a TXT record that parses, a key that signs and verifies.
"""

from __future__ import annotations

import base64
import os
import re
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from relay.cli import parse_args
from relay.config import DkimIdentity
from relay.dkim.keys import generate, load_private_key
from relay.dkim.sign import Signer
from relay.errors import ConfigError
from support import dkimpy_verify

MESSAGE = (
    b"From: Ada <ada@example.com>\r\nTo: grace@example.org\r\nSubject: keys\r\n"
    b"Message-ID: <k1@example.com>\r\n\r\nHello.\r\n"
)
RECORD = re.compile(r'^(\S+)\._domainkey\.(\S+)\. IN TXT ((?:"[^"]*" ?)+)$')


def keygen(argv: list[str]) -> int:
    args = parse_args(["dkim", "keygen", *argv])
    return args.run(args)


def parse_record(out: str) -> tuple[str, str, str, list[str]]:
    """(selector, domain, joined TXT value, the quoted strings) from keygen's stdout."""
    match = RECORD.match(out.strip())
    assert match, out
    strings = re.findall(r'"([^"]*)"', match.group(3))
    return match.group(1), match.group(2), "".join(strings), strings


def tag_values(txt: str) -> dict[str, str]:
    return dict(part.strip().split("=", 1) for part in txt.split(";") if part.strip())


@pytest.mark.parametrize(
    "algorithm,bits", [("rsa-sha256", 2048), ("rsa-sha256", 1024), ("ed25519-sha256", 0)]
)
def test_keygen_writes_0600_and_the_record_verifies(tmp_path, capsys, algorithm, bits):
    out = tmp_path / "keys" / "k.pem"
    argv = ["--domain", "example.com", "--selector", "s2026", "--algorithm", algorithm, "--out", str(out)]
    if bits:
        argv += ["--bits", str(bits)]
    assert keygen(argv) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    selector, domain, txt, strings = parse_record(capsys.readouterr().out)
    assert (selector, domain) == ("s2026", "example.com")
    assert all(len(s.encode()) <= 255 for s in strings)
    tags = tag_values(txt)
    assert tags["v"] == "DKIM1" and tags["k"] == ("rsa" if algorithm == "rsa-sha256" else "ed25519")
    key = load_private_key(str(out), algorithm)
    public = base64.b64decode(tags["p"])
    if algorithm == "ed25519-sha256":
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        assert public == key.public_key().public_bytes(*raw)
    else:
        assert key.key_size == bits
        assert serialization.load_der_public_key(public).public_numbers() == key.public_key().public_numbers()

    signer = Signer.from_identities((DkimIdentity("example.com", "s2026", str(out), algorithm),))
    signed = signer.sign(MESSAGE, "") + MESSAGE
    records = {b"s2026._domainkey.example.com.": txt.encode()}
    assert dkimpy_verify(signed, lambda name, timeout=5: records.get(name))


def test_long_records_are_split_into_255_byte_strings(tmp_path, capsys):
    argv = ["--domain", "example.com", "--selector", "big", "--bits", "4096"]
    assert keygen(argv + ["--out", str(tmp_path / "k")]) == 0
    _, _, txt, strings = parse_record(capsys.readouterr().out)
    assert len(strings) == 3 and [len(s) for s in strings[:-1]] == [255, 255]
    assert "".join(strings) == txt


def test_default_path_and_no_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--domain", "Example.COM.", "--selector", "s1", "--algorithm", "ed25519-sha256"]
    assert keygen(argv) == 0
    path = tmp_path / "conf" / "dkim" / "example.com.s1.pem"
    first = path.read_bytes()
    capsys.readouterr()
    assert keygen(argv) == 1
    assert "exists" in capsys.readouterr().err
    assert path.read_bytes() == first
    assert keygen(argv + ["--force"]) == 0
    assert path.read_bytes() != first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["example.com.s1.pem"]  # no temp file left


@pytest.mark.parametrize(
    "argv,error",
    [
        (["--domain", "example.com", "--selector", "s1", "--bits", "512"], "1024 to 4096"),
        (["--domain", "exa mple.com", "--selector", "s1"], "--domain"),
        (["--domain", "example.com", "--selector", "../s1"], "--selector"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, error):
    assert keygen(argv + ["--out", str(tmp_path / "k.pem")]) == 1
    assert error in capsys.readouterr().err
    assert not (tmp_path / "k.pem").exists()


def test_generate_checks_its_arguments():
    with pytest.raises(ConfigError):
        generate("rsa-sha1")
    with pytest.raises(ConfigError):
        generate("rsa-sha256", 8192)
    pem, txt = generate("ed25519-sha256")
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert len(base64.b64decode(tag_values(txt)["p"])) == 32
