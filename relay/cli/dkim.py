"""relayctl dkim keygen: make a DKIM key pair and the DNS record to publish.

Input: --domain, --selector, optionally --algorithm, --bits, --out, --force.
Output: the private key written as PEM with mode 0600 (never over an
existing file unless --force) and, on stdout, the zone-file line to publish:
``S._domainkey.D. IN TXT "v=DKIM1; k=...; p=..."`` with the value split into
strings of at most 255 bytes (a TXT character-string's limit, RFC 1035
section 3.3.14; verifiers join them, RFC 6376 section 3.6.2.2).
"""

from __future__ import annotations

import os
import sys
import tempfile

from relay.dkim.keys import ALGORITHMS, generate
from relay.dkim.sign import is_dns_name, normalize_domain
from relay.errors import ConfigError

TXT_STRING_MAX = 255


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("dkim", help="DKIM keys")
    verbs = subparsers.add_subverbs(parser, dest="dkim_verb", required=True, metavar="VERB")
    keygen = verbs.add_parser(
        "keygen",
        help="generate a signing key and print its DNS TXT record",
        description="Generate a DKIM private key (PEM, mode 0600) and print the TXT record to publish.",
    )
    keygen.add_argument("--domain", required=True, help="d= domain, e.g. example.com")
    keygen.add_argument("--selector", required=True, help="s= selector, e.g. s2026")
    keygen.add_argument("--algorithm", choices=ALGORITHMS, default="rsa-sha256")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", help="key file (default conf/dkim/DOMAIN.SELECTOR.pem)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(run=run)


def run(args) -> int:
    domain = normalize_domain(args.domain)
    if not domain or not is_dns_name(domain):
        return _fail(f"--domain: expected a domain name, got {args.domain!r}")
    if not is_dns_name(args.selector):
        return _fail(f"--selector: expected DNS labels (letters, digits, -, _), got {args.selector!r}")
    out = args.out or os.path.join("conf", "dkim", f"{domain}.{args.selector}.pem")
    if os.path.exists(out) and not args.force:
        return _fail(f"{out} exists; use --force to replace it (the old key stops working)")
    try:
        pem, txt = generate(args.algorithm, args.bits)
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        _write_private(out, pem, replace=args.force)
    except FileExistsError:
        return _fail(f"{out} exists; use --force to replace it (the old key stops working)")
    except OSError as exc:
        return _fail(f"{out}: cannot write: {exc.strerror}")
    print(f"{args.selector}._domainkey.{domain}. IN TXT {txt_strings(txt)}")
    print(f"relayctl: wrote {out} (mode 0600)", file=sys.stderr)
    return 0


def txt_strings(value: str) -> str:
    """``"..." "..."``: the value in quoted strings of at most 255 bytes."""
    data = value.encode("ascii")  # base64 and tags: never needs escaping
    parts = [data[i : i + TXT_STRING_MAX] for i in range(0, len(data), TXT_STRING_MAX)]
    return " ".join(f'"{part.decode()}"' for part in parts)


def _write_private(path: str, data: bytes, *, replace: bool) -> None:
    """Write a secret: mode 0600 from the first byte, complete or not at all."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # mkstemp creates the file 0600 whatever the umask; rename makes it
    # appear whole.  Without --force, link() refuses an existing target
    # atomically (a check-then-rename could overwrite a file made meanwhile).
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".keygen-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fail(message: str) -> int:
    print(f"relayctl: {message}", file=sys.stderr)
    return 1
