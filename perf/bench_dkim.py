"""Benchmark of the DKIM hot path: relay._fast vs relay._ref vs dkimpy, and whole-message signing.

Input: nothing but flags (``--quick`` for a run of a few seconds).
Output: tables on stdout, medians of several runs, and the speed ratios:

1. body canonicalization + SHA-256 of 1 KB .. 1 MB bodies: _fast, _ref and
   dkimpy (its canonicalize_body + hashlib), for "relaxed" (the default and
   the costly one) and "simple" (bound by SHA-256 itself);
2. relaxed canonicalization of a typical header block;
3. signing a 10 KB message (Ed25519, RSA-2048) with relay.dkim.Signer vs the
   bare ``cryptography`` sign call it cannot avoid.

Usage: python perf/bench_dkim.py [--quick]   (build _fast first:
python setup.py build_ext --inplace)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa  # noqa: E402
from dkim.canonicalization import Relaxed, Simple  # noqa: E402

from relay._fast import bodyhash as fast_bodyhash  # noqa: E402
from relay._fast import canon as fast_canon  # noqa: E402
from relay._ref import bodyhash as ref_bodyhash  # noqa: E402
from relay._ref import canon as ref_canon  # noqa: E402
from relay.config import DkimIdentity  # noqa: E402
from relay.dkim.sign import Signer, split_header  # noqa: E402

WORDS = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet,", b"consectetur", b"adipiscing",
         b"elit.", b"Sed", b"do", b"eiusmod", b"tempor", b"incididunt", b"ut", b"labore"]


def text_body(size: int, seed: int = 6376) -> bytes:
    """Mail-like text: ~70-column lines, some double spaces, trailing WSP, tabs, blank lines."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        line = b" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 11)))
        if rng.random() < 0.1:
            line = line.replace(b" ", b"  ", 1)
        if rng.random() < 0.05:
            line = b"\t" + line
        out += line + (b" " if rng.random() < 0.1 else b"") + b"\r\n"
        if rng.random() < 0.1:
            out += b"\r\n"
    return bytes(out[:size]) + b"\r\n\r\n"


def base64_body(size: int) -> bytes:
    """A MIME attachment: 76-column base64 lines, no white space at all."""
    import base64

    data = base64.b64encode(random.Random(1).randbytes(size * 3 // 4))
    return b"".join(data[i : i + 76] + b"\r\n" for i in range(0, len(data), 76))


def measure(fn, repeat: int, min_time: float) -> float:
    """Median seconds per call over ``repeat`` samples of enough calls to last min_time."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start >= min_time or number >= 1 << 20:
            break
        number *= 2
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def fmt(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.1f} us"


def body_hashers(canon: str, body: bytes):
    def fast():
        h = fast_bodyhash.BodyHasher("sha256", canon, None)
        h.update(body)
        return h.digest()

    def ref():
        h = ref_bodyhash.BodyHasher("sha256", canon, None)
        h.update(body)
        return h.digest()

    algorithm = Relaxed if canon == "relaxed" else Simple

    def dkimpy():
        return hashlib.sha256(algorithm.canonicalize_body(body)).digest()

    assert fast() == ref() == dkimpy(), "implementations disagree"
    return fast, ref, dkimpy


def bench_bodies(repeat: int, min_time: float) -> None:
    print("1. body canonicalization + sha256, median per body")
    print(
        f"   {'canon':8} {'body':14} {'_fast':>11} {'_ref':>11} {'dkimpy':>11}"
        f" {'ref/fast':>9} {'dkimpy/fast':>12} {'fast MB/s':>10}"
    )
    cases = [("text", n, text_body(n)) for n in (1_000, 10_000, 100_000, 1_000_000)]
    cases.append(("base64", 100_000, base64_body(100_000)))
    for canon in ("relaxed", "simple"):
        for kind, size, body in cases:
            fast, ref, dkimpy = body_hashers(canon, body)
            # _ref is ~100x slower: fewer samples keep --quick quick.
            t_fast = measure(fast, repeat, min_time)
            t_ref = measure(ref, max(3, repeat // 2), min_time)
            t_dkimpy = measure(dkimpy, repeat, min_time)
            label = f"{kind} {size // 1000:>5} KB"
            print(
                f"   {canon:8} {label:14} {fmt(t_fast)} {fmt(t_ref)} {fmt(t_dkimpy)}"
                f" {t_ref / t_fast:8.1f}x {t_dkimpy / t_fast:11.1f}x {len(body) / t_fast / 1e6:10.0f}"
            )
    print()


def bench_headers(repeat: int, min_time: float) -> None:
    message = sample_message(0)
    fields, _ = split_header(message)
    as_dkimpy = [(name, value + b"\r\n") for name, value in fields]

    def fast():
        return [fast_canon.canon_header_relaxed(n, v) for n, v in fields]

    def ref():
        return [ref_canon.canon_header_relaxed(n, v) for n, v in fields]

    def dkimpy():
        return Relaxed.canonicalize_headers(as_dkimpy)

    t_fast, t_ref, t_dkimpy = (measure(fn, repeat, min_time) for fn in (fast, ref, dkimpy))
    print(f"2. relaxed header canonicalization, {len(fields)} fields ({len(message)} bytes incl. body)")
    print(f"   _fast {fmt(t_fast)}   _ref {fmt(t_ref)}   dkimpy {fmt(t_dkimpy)}"
          f"   ref/fast {t_ref / t_fast:.1f}x   dkimpy/fast {t_dkimpy / t_fast:.1f}x")
    print()


def sample_message(body_size: int) -> bytes:
    header = (
        b"From: Shop <orders@example.com>\r\n"
        b"To: Customer <customer@example.net>\r\n"
        b"Subject: Your order #4711 has shipped\r\n"
        b"Date: Tue, 10 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <4711.1731232800@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"List-Unsubscribe: <https://example.com/unsubscribe/4711>,\r\n <mailto:unsub@example.com>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"Received: from app1.internal (app1.internal [10.0.0.5])\r\n"
        b"\tby relay.example.com; Tue, 10 Nov 2026 10:00:00 +0000\r\n"
        b"X-Campaign: autumn-2026\r\n"
    )
    return header + b"\r\n" + text_body(body_size)


def bench_signing(repeat: int, min_time: float) -> None:
    message = sample_message(10_000)
    print(f"3. signing a {len(message) // 1000} KB message (relaxed/relaxed), median per message")
    print(f"   {'algorithm':16} {'Signer.sign':>12} {'bare sign':>12} {'overhead':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as directory:
        for algorithm, key in (
            ("ed25519-sha256", ed25519.Ed25519PrivateKey.generate()),
            ("rsa-sha256", rsa.generate_private_key(65537, 2048)),
        ):
            path = os.path.join(directory, f"{algorithm}.pem")
            with open(path, "wb") as file:
                file.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
            signer = Signer.from_identities((DkimIdentity("example.com", "s1", path, algorithm),))
            data = b"x" * 600  # about what the canonical signed header fields come to
            if algorithm == "ed25519-sha256":
                digest = hashlib.sha256(data).digest()
                bare = lambda: key.sign(digest)  # noqa: E731
            else:
                bare = lambda: key.sign(data, padding.PKCS1v15(), hashes.SHA256())  # noqa: E731
            t_sign = measure(lambda: signer.sign(message, "bounces@example.com"), repeat, min_time)
            t_bare = measure(bare, repeat, min_time)
            name = "RSA-2048" if algorithm == "rsa-sha256" else "Ed25519"
            print(f"   {name:16} {fmt(t_sign)} {fmt(t_bare)} {fmt(t_sign - t_bare)} {t_sign / t_bare:6.2f}x")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter samples (a few seconds)")
    args = parser.parse_args(argv)
    repeat, min_time = (5, 0.002) if args.quick else (15, 0.02)
    started = time.perf_counter()
    print(f"relay DKIM benchmark ({'quick' if args.quick else 'full'}): median of {repeat} samples")
    print()
    bench_bodies(repeat, min_time)
    bench_headers(repeat, min_time)
    bench_signing(repeat, min_time)
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
