"""The realistic options of a benchmark run: ``--dkim`` and ``--tls``.

Input: which options are on, a directory for the run's files and, for
TLS, the fake internet's test CA (which signs the sinks' certificates).
Output: the files the options need (two DKIM keys, the intake's test CA
and certificate), the settings they add to the relay's config and to
Postfix's main.cf, OpenDKIM's config, the TLS policy table Postfix needs
to verify the sinks, the generator's client context, the check of a signed
sample, and what the report says about them.

--dkim: the relay signs every message with two identities of the sender's
domain, an Ed25519 and an RSA-2048 key (RFC 8463: two signatures per
message).  Postfix signs through milters: where Debian's ``opendkim`` is
installed, the harness runs two beside the Postfix under test, one per key
(relaxed/relaxed, From over-signed, as the relay signs), and counts their
CPU as Postfix's; where it is not, Postfix's
figure is unsigned, and the JSON and the report say so.  The sinks count
the DKIM-Signature fields of every message they take, and one signed
message of each run is verified against the public keys, on both sides.

--tls: STARTTLS on both hops.  The server under test offers it to the
generator with a certificate for ``relay.test`` from a CA of this run (the
generator verifies it); the sinks offer it with certificates from the fake
internet's CA, and the server delivers with ``verify`` against that CA.

--chunking: the sinks offer CHUNKING (RFC 3030), as the large mailbox
providers' MXes do, and the relay is told to use it (``[shaping.default]
chunking``, off by default): each message goes with one BDAT, in the same
write as its MAIL and RCPTs.  Postfix's SMTP client has no BDAT and keeps
to DATA.  The JSON counts the transactions that came by BDAT.

Everything here but ``make_files``, ``client_context``, ``verify_sample``
and what looks for OpenDKIM (``opendkim_path``, ``postfix_signs``,
``describe``) is pure.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from perf.loadgen import SENDER
from perf.mta import system_command

DKIM_DOMAIN = SENDER.rpartition("@")[2]  # the From: domain of every generated message
# (algorithm, selector, RSA bits): one signature of each per message
DKIM_KEYS = (("ed25519-sha256", "bench-ed25519", 0), ("rsa-sha256", "bench-rsa2048", 2048))
INTAKE_NAME = "relay.test"  # the name in the intake certificate, checked by the generator
INTAKE_IP = "127.0.0.1"


@dataclass(frozen=True)
class Options:
    dkim: bool = False
    tls: bool = False
    chunking: bool = False  # the sinks offer CHUNKING (BDAT)

    def names(self) -> list[str]:
        return [name for name, on in (("dkim", self.dkim), ("tls", self.tls),
                                      ("chunking", self.chunking)) if on]


@dataclass(frozen=True)
class Files:
    """What the options need on disk (empty strings when off)."""

    dkim_keys: tuple[tuple[str, str, str], ...] = ()  # (algorithm, selector, PEM key file)
    intake_cert: str = ""  # PEM chain for the server's inbound STARTTLS
    intake_key: str = ""
    intake_ca: str = ""  # signs intake_cert; the generator trusts it


def make_files(directory: str, options: Options) -> Files:
    """Generate this run's DKIM keys and intake certificate under ``directory``."""
    keys = []
    if options.dkim:
        from relay.dkim.keys import generate

        for algorithm, selector, bits in DKIM_KEYS:
            pem, _ = generate(algorithm, bits or 2048)
            path = os.path.join(directory, f"dkim-{selector}.pem")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                file.write(pem)
            keys.append((algorithm, selector, path))
    cert = key = ca = ""
    if options.tls:
        from relay.testing.fakenet import TestPKI

        pki_dir = os.path.join(directory, "intake-pki")
        os.makedirs(pki_dir)
        pki = TestPKI(pki_dir)
        cert, key = pki.issue((INTAKE_NAME,), INTAKE_IP)
        ca = pki.ca_cert_path
        # Postfix's smtpd reads them as root, before it drops privileges.
        os.chmod(pki_dir, 0o755)
    return Files(tuple(keys), cert, key, ca)


def client_context(files: Files) -> ssl.SSLContext | None:
    """The generator's STARTTLS context: trusts the intake CA, checks relay.test."""
    if not files.intake_ca:
        return None
    context = ssl.create_default_context(cafile=files.intake_ca)
    context.check_hostname = True
    return context


# -- the relay -------------------------------------------------------------------


def relay_overrides(options: Options, files: Files, sinks_ca: str) -> dict:
    """Config tables the options add to the relay's (``[[dkim]]``, ``[tls]``, ``[deliver]``,
    ``[shaping.default]``)."""
    doc: dict = {}
    if options.dkim:
        doc["dkim"] = [{"domain": DKIM_DOMAIN, "selector": selector, "key_file": path,
                        "algorithm": algorithm} for algorithm, selector, path in files.dkim_keys]
    if options.tls:
        doc["tls"] = {"cert_file": files.intake_cert, "key_file": files.intake_key}
        doc["deliver"] = {"tls": "verify", "ca_file": sinks_ca}
    if options.chunking:
        doc["shaping"] = {"default": {"chunking": True}}
    return doc


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s tables merged key by key (arrays of tables replaced)."""
    out = {section: dict(values) if isinstance(values, dict) else values
           for section, values in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


# -- Postfix ---------------------------------------------------------------------


def postfix_main_cf(options: Options, files: Files, sinks_ca: str,
                    milter_ports: tuple[int, ...] = ()) -> dict[str, str]:
    """main.cf parameters for --tls, and for --dkim when OpenDKIM instances
    listen on ``milter_ports`` (none: Postfix does not sign)."""
    settings = {}
    if options.dkim and milter_ports:
        settings.update({
            "smtpd_milters": ", ".join(f"inet:127.0.0.1:{port}" for port in milter_ports),
            # A milter that fails must not let unsigned mail through and
            # count it: the client is told to try again.
            "milter_default_action": "tempfail",
            "milter_protocol": "6",
        })
    if not options.tls:
        return settings
    return {**settings,
        "smtpd_tls_cert_file": files.intake_cert,
        "smtpd_tls_key_file": files.intake_key,
        "smtpd_tls_security_level": "may",
        "smtp_tls_security_level": "verify",
        "smtp_tls_CAfile": sinks_ca,
        # Without it Postfix opens a new connection (and handshake) for every
        # TLS delivery; the relay keeps its TLS sessions for the next message.
        "smtp_tls_connection_reuse": "yes",
    }


def postfix_tls_policy(routes: dict[str, tuple[str, int]], names: dict[str, str]) -> str:
    """smtp_tls_policy_maps lines: each static next hop ``[ip]:port`` is verified
    against the MX host name its certificate carries (``names``: ip -> name);
    Postfix would otherwise check the certificate against the literal address."""
    hops = sorted({hop for hop in routes.values()})
    return "".join(f"[{ip}]:{port} verify match={names[ip]}\n" for ip, port in hops)


def opendkim_path() -> str | None:
    """The opendkim command (Debian's ``opendkim`` package), or None."""
    return system_command("opendkim")


def postfix_signs() -> tuple[bool, str]:
    """(whether the Postfix side signs, how, or why not)."""
    if opendkim_path():
        return True, "signed by OpenDKIM (two milters: the same ed25519 and rsa-2048 keys)"
    return False, "unsigned: OpenDKIM is not installed (apt-get install opendkim)"


def opendkim_files(algorithm: str, selector: str, key_file: str, directory: str,
                   port: int) -> dict[str, str]:
    """One OpenDKIM's config (file name under ``directory`` -> text): it
    signs every message from the sender's domain with one key.

    One instance per key, chained in smtpd_milters: Debian's OpenDKIM
    (2.11.0 beta 2) takes the signing algorithm from a global setting, so
    one instance cannot sign with an Ed25519 and an RSA key (its KeyTable
    learnt a per-key algorithm only later).  Relaxed/relaxed and From
    over-signed, as the relay signs; mail from any loopback address is
    internal, so the generator's sources are signed."""
    conf = "\n".join([
        "Mode s",
        f"Socket inet:{port}@127.0.0.1",
        f"Domain {DKIM_DOMAIN}",
        f"Selector {selector}",
        f"KeyFile {key_file}",
        f"SignatureAlgorithm {algorithm}",
        "Canonicalization relaxed/relaxed",
        "OversignHeaders From",
        "InternalHosts 127.0.0.0/8",
        # The run's keys are under the temp directory, whose world-writable
        # parent OpenDKIM's safe-key check refuses.
        "RequireSafeKeys no",
        "Syslog no",
        f"PidFile {os.path.join(directory, 'opendkim.pid')}",
        "",
    ])
    return {"opendkim.conf": conf}


def count_signatures(message: bytes) -> int:
    """How many DKIM-Signature fields the header of ``message`` has."""
    end = message.find(b"\r\n\r\n")
    header = b"\r\n" + (message if end < 0 else message[:end]).lower()
    return header.count(b"\r\ndkim-signature:")


def verify_sample(message: bytes, files: Files) -> list[bool]:
    """Each DKIM signature of ``message`` checked (dkimpy) against this
    run's public keys: one boolean per signature, in header order."""
    import dkim

    from relay.dkim.keys import load_private_key, public_key_txt

    records = {}
    for algorithm, selector, path in files.dkim_keys:
        key = load_private_key(path, algorithm)
        records[f"{selector}._domainkey.{DKIM_DOMAIN}."] = public_key_txt(key).encode()

    def dns(name, timeout=5):
        name = (name.decode() if isinstance(name, bytes) else name).lower()
        return records.get(name if name.endswith(".") else name + ".", b"")

    def verified(index: int) -> bool:
        try:
            return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dns))
        except Exception:  # a mismatch raises, and so does a malformed b= (base64, Ed25519 length)
            return False

    return [verified(index) for index in range(count_signatures(message))]


def describe(options: Options, postfix: bool) -> dict:
    """The ``options`` record of the JSON: what was on, for each side."""
    out: dict = {
        "dkim": options.dkim,
        "tls": options.tls,
        "chunking": options.chunking,
        "relay": {
            "dkim": ([f"{algorithm} s={selector} d={DKIM_DOMAIN}" for algorithm, selector, _ in DKIM_KEYS]
                     if options.dkim else None),
            "tls": "STARTTLS offered to the generator; delivery tls = verify" if options.tls else None,
            "chunking": "BDAT where the sinks offer CHUNKING" if options.chunking else None,
        },
    }
    if postfix:
        _, why = postfix_signs()
        out["postfix"] = {
            "dkim": why if options.dkim else None,
            "tls": ("smtpd_tls_security_level = may; smtp_tls_security_level = verify"
                    if options.tls else None),
            "chunking": "DATA: Postfix's SMTP client has no BDAT" if options.chunking else None,
        }
    return out


def summary(options: dict | None) -> str:
    """One line for the terminal and the markdown: which options were on."""
    if not options or not (options.get("dkim") or options.get("tls") or options.get("chunking")):
        return "options: none (no DKIM, no TLS, no CHUNKING)"
    parts = []
    if options.get("dkim"):
        part = "DKIM (ed25519 + rsa-2048 signatures) on the relay"
        postfix = (options.get("postfix") or {}).get("dkim")
        if isinstance(postfix, str):
            part += f"; Postfix {postfix}"
        parts.append(part)
    if options.get("tls"):
        parts.append("STARTTLS on both hops (generator→server, server→sinks in verify mode)")
    if options.get("chunking"):
        parts.append("the sinks offer CHUNKING (the relay sends BDAT; Postfix, DATA)")
    return "options: " + "; ".join(parts)
