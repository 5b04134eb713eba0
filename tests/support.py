"""Test support: the real relay in a child process, raw SMTP clients, spool
readers and generated TLS certificates.  Everything talks to 127.0.0.0/8.
Also the model of the stream RelaySMTP.smtp_DATA reads (unit and fuzz tests)."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import glob
import json
import smtplib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import tomli_w

from relay.accel import whole_lines
from relay.intake.data import DataReader
from relay.spool import read
from relay.stats import ring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# -- the relay process ---------------------------------------------------


@dataclass
class RelayProcess:
    """``relay -c FILE`` in its own session, with its log in a file."""

    directory: str
    workers: int = 2
    overrides: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    preexec_fn: object = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.dead_dns_port = free_port()
        self.config_path = os.path.join(self.directory, "relay.toml")
        self.log_path = os.path.join(self.directory, "relay.log")
        self.spool_dir = os.path.join(self.directory, "spool")
        self.write_config()

    def config(self) -> dict:
        doc = {
            "relay": {
                "hostname": "relay.test",
                "workers": self.workers,
                "spool_dir": self.spool_dir,
                "run_dir": os.path.join(self.directory, "run"),
                "shutdown_timeout": "10s",
            },
            "listen": [{"address": f"127.0.0.1:{self.port}"}],
            "intake": {"min_free_space": 0},
            # Never the system resolver: by default lookups go to a loopback
            # port where nothing answers, so mail waits in the spool.
            "dns": {"nameservers": [f"127.0.0.1:{self.dead_dns_port}"]},
            "deliver": {"event_log_dir": os.path.join(self.directory, "log")},
        }
        for section, values in self.overrides.items():
            if isinstance(values, dict):
                doc.setdefault(section, {}).update(values)
            else:
                doc[section] = values
        return doc

    def write_config(self) -> None:
        with open(self.config_path, "w") as file:
            file.write(tomli_w.dumps(self.config()))

    def start(self, wait: bool = True) -> "RelayProcess":
        self._log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay.supervisor", "-c", self.config_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.directory,
            env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
            preexec_fn=self.preexec_fn,
        )
        log.close()
        if wait:
            self.wait_log(f"worker {self.workers - 1} of {self.workers} ready", count=1)
            self.wait_ready()
        return self

    def log(self) -> str:
        with open(self.log_path, "rb") as file:
            file.seek(getattr(self, "_log_offset", 0))
            return file.read().decode("utf-8", "replace")

    def wait_log(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {text!r} in the log:\n{self.log()}")

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Every worker answers on the listen port (SO_REUSEPORT spreads us)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.log().count(" ready")
            if ready >= self.workers and self.worker_pids_count() == self.workers:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                        if sock.recv(100).startswith(b"220"):
                            return
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"relay not ready:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as file:
                return [int(pid) for pid in file.read().split()]
        except FileNotFoundError:
            return []

    def worker_pids_count(self) -> int:
        return len(self.worker_pids())

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"relay did not stop within {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            # A killed supervisor leaves its stats ring in /dev/shm.
            ring.remove(os.path.join(self.directory, "run"))


# -- clients -------------------------------------------------------------


class RawClient:
    """A line-level SMTP client for sending exactly the bytes a test wants."""

    def __init__(self, port: int, source: str | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None,
        )
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: (code, text of the last line)."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed by server after {lines!r} {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode("utf-8", "replace")

    def command(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def ehlo(self, name: str = "client.test") -> list[str]:
        self.send(f"EHLO {name}\r\n".encode())
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during EHLO")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return lines

    def read_all(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes (or the timeout)."""
        self.sock.settimeout(timeout)
        data = self.buffer
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        self.buffer = b""
        return data

    def starttls(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock)
        self.buffer = b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- the spool, read from outside ------------------------------------------


@dataclass
class SpooledMessage:
    queue_id: str
    sender: str
    state: int
    body: bytes
    recipients: list[tuple[str, int]]  # (address, slot)
    worker: int


def read_spool(spool_dir: str) -> list[SpooledMessage]:
    """Every part in every worker's spool (read-only, the relay stopped or
    not), through the spool's read API."""
    found = []
    for reader in read.open_readers(spool_dir):
        try:
            found += [SpooledMessage(p.queue_id, p.sender, p.state, p.body, list(p.recipients),
                                     p.worker)
                      for p in reader.parts()]
        finally:
            reader.close()
    return found


def recipients_by_id(spool_dir: str) -> dict[str, set[str]]:
    merged: dict[str, set[str]] = {}
    for message in read_spool(spool_dir):
        merged.setdefault(message.queue_id, set()).update(a for a, _ in message.recipients)
    return merged


# -- TLS -----------------------------------------------------------------


def make_certificate(directory: str, hostname: str = "relay.test") -> tuple[str, str]:
    """A self-signed certificate and key (PEM files) for the test relay."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "relay.crt")
    key_path = os.path.join(directory, "relay.key")
    with open(cert_path, "wb") as file:
        file.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as file:
        file.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def relayctl(relay: RelayProcess, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``relayctl -c <the relay's config> ARGS`` as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", "-c", relay.config_path, *args],
        capture_output=True, text=True, timeout=timeout, cwd=relay.directory,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )


# -- delivery through the fake internet ---------------------------------------


def deliver_relay(relay_factory, net, workers=1, deliver=None, **sections):
    """A relay whose deliveries go to the fake internet, retrying every second."""
    overrides = net.config_overrides()
    overrides["deliver"].update({"retry_schedule": ["1s"], **(deliver or {})})
    overrides.update(sections)
    return relay_factory(workers=workers, **overrides).start()


def inject(relay, sender, recipients, body: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        for rcpt in recipients:
            assert smtp.rcpt(rcpt)[0] == 250
        code, text = smtp.data(body)
    assert code == 250, text
    return text.split()[-1].decode()


def events(relay) -> list[dict]:
    found = []
    for path in glob.glob(os.path.join(relay.directory, "log", "delivery-*.jsonl")):
        with open(path, "rb") as file:
            found += [json.loads(line) for line in file if line.strip()]
    return sorted(found, key=lambda e: e["time"])


def wait_for(condition, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_events(relay, predicate, count=1, timeout=15.0):
    return wait_for(
        lambda: (found := [e for e in events(relay) if predicate(e)]) and len(found) >= count and found,
        timeout, "delivery events",
    )


# -- DKIM and the hot path -----------------------------------------------------

# dkimpy verifies Ed25519 with PyNaCl, a test-only dependency: without it the
# Ed25519 checks are skipped with a reason, never passed vacuously.
HAVE_NACL = importlib.util.find_spec("nacl") is not None


def dkimpy_verify(signed: bytes, dnsfunc, idx: int | None = None) -> bool:
    """Verify with dkimpy, an independent implementation."""
    import dkim
    import pytest

    if not HAVE_NACL and b"a=ed25519-sha256" in signed.partition(b"\r\n\r\n")[0]:
        pytest.skip("PyNaCl is not installed: dkimpy cannot verify Ed25519 (pip install pynacl)")
    if idx is None:
        return dkim.verify(signed, dnsfunc=dnsfunc)
    return dkim.DKIM(signed).verify(idx=idx, dnsfunc=dnsfunc)


def implementation(package: str, module: str):
    """relay.<package>.<module> for package _ref or _fast; _fast missing is a
    skip, unless RELAY_REQUIRE_EXTENSIONS=1 makes it a failure."""
    import pytest

    try:
        return importlib.import_module(f"relay.{package}.{module}")
    except ImportError:
        if package == "_ref" or os.environ.get("RELAY_REQUIRE_EXTENSIONS") == "1":
            raise
        pytest.skip("relay._fast is not built (python setup.py build_ext --inplace)")


# -- fault injection: what was acknowledged against what arrived ----------------


def message_id_of(data: bytes) -> str | None:
    """The Message-ID a sink received (its header, unfolded), or None."""
    head = data.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n"):
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode("ascii", "replace")
    return None


def tally(sinks, acked: dict[str, set[str]]) -> tuple[dict[str, set[str]], int]:
    """(lost, duplicates) of acknowledged mail: ``acked`` maps a Message-ID
    to its recipients; lost are the recipients no sink received, duplicates
    the deliveries of a (Message-ID, recipient) beyond the first."""
    seen: dict[tuple[str, str], int] = {}
    for sink in sinks:
        for received in list(sink.received):
            message_id = message_id_of(received.data)
            for rcpt in received.rcpt_tos:
                seen[message_id, rcpt] = seen.get((message_id, rcpt), 0) + 1
    lost = {mid: {r for r in rcpts if (mid, r) not in seen} for mid, rcpts in acked.items()}
    lost = {mid: missing for mid, missing in lost.items() if missing}
    duplicates = sum(n - 1 for key, n in seen.items() if key[0] in acked)
    return lost, duplicates


class Injector:
    """Threads that send mail with a Message-ID each until told to stop (or
    ``per_thread`` messages), recording each 250 and each refusal."""

    def __init__(self, port: int, domains: list[str], threads: int = 4, per_thread: int = 300,
                 timeout: float = 10.0, pause: float = 0.0, tag: str = "") -> None:
        import random
        import threading

        self.tag = tag  # makes Message-IDs and recipients differ between injectors
        self.port = port
        self.domains = domains
        self.timeout = timeout
        self.pause = pause
        self.acked: dict[str, set[str]] = {}  # Message-ID -> recipients
        self.refused: list[tuple[int, str]] = []  # (code, text); code 0: the connection failed
        self._random = random.Random
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n, per_thread), daemon=True)
                         for n in range(threads)]

    def start(self) -> "Injector":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self, timeout: float = 60.0) -> None:
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "an injector thread did not finish"

    def _run(self, n: int, limit: int) -> None:
        rng = self._random(n)
        smtp = None
        for i in range(limit):
            if self._stop.is_set():
                break
            message_id = f"<{self.tag}{n}-{i}@injector.test>"
            rcpts = {f"u{self.tag}{n}-{i}-{k}@{rng.choice(self.domains)}"
                     for k in range(rng.randint(1, 2))}
            body = (f"Message-ID: {message_id}\r\nSubject: {n}-{i}\r\n\r\nbody {n}-{i}\r\n").encode()
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=self.timeout)
                    smtp.ehlo()
                smtp.mail(f"app{n}@sender.example")
                for rcpt in rcpts:
                    smtp.rcpt(rcpt)
                code, text = smtp.data(body)
                if code == 250:
                    with self._lock:
                        self.acked[message_id] = rcpts
                else:
                    with self._lock:
                        self.refused.append((code, text.decode("utf-8", "replace")))
            except (smtplib.SMTPException, OSError) as exc:
                with self._lock:
                    self.refused.append((0, str(exc)))
                if smtp is not None:
                    try:
                        smtp.close()
                    except OSError:
                        pass
                smtp = None
                time.sleep(0.05)
            if self.pause:
                time.sleep(self.pause)
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass


def worker_pid(relay: RelayProcess, index: int, timeout: float = 10.0) -> int:
    """The pid of worker ``index``, as it publishes it in the stats ring."""
    path = ring.ring_path(os.path.join(relay.directory, "run"))
    pids = set(relay.worker_pids())

    def find():
        for snapshot in ring.read(path):
            pid = int(snapshot.gauges.get("pid") or 0)
            if snapshot.worker == index and pid in pids:
                return pid
        return None

    return wait_for(find, timeout, f"worker {index}'s pid in the stats ring")


def process_gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs no more code)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class SmallDisk:
    """A small tmpfs at ``path`` (needs root), filled and freed on demand:
    ``fill()`` writes a ballast file until the disk is full (ENOSPC, as a
    real full disk answers), ``free()`` deletes it."""

    def __init__(self, path: str, size: str = "16m") -> None:
        self.path = path
        self.size = size
        self.ballast = os.path.join(path, "ballast")
        self.mounted = False

    def mount(self) -> "SmallDisk":
        import pytest

        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        os.makedirs(self.path, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", self.path],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        self.mounted = True
        return self

    def fill(self) -> int:
        """Bytes written before the disk said it is full."""
        import errno

        written = 0
        chunk = b"\0" * 65536
        with open(self.ballast, "ab", buffering=0) as file:
            while True:
                try:
                    written += file.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        return written
                    chunk = chunk[: len(chunk) // 2]  # fill to the last byte

    def free(self) -> None:
        os.unlink(self.ballast)

    def unmount(self) -> None:
        """After every process using it is gone."""
        if self.mounted:
            subprocess.run(["umount", self.path], check=True)
            self.mounted = False


# -- the DATA stream, as RelaySMTP.smtp_DATA reads it ------------------------------

LIMIT = 1001  # aiosmtpd SMTP.line_length_limit, the StreamReader limit


class _Overrun(Exception):
    def __init__(self, consumed: int) -> None:
        self.consumed = consumed


class _Eof(Exception):
    pass


class StreamModel:
    """The buffer logic of asyncio.StreamReader (readuntil/read), synchronous."""

    def __init__(
        self, data: bytes, chunk: int | None = None, limit: int = LIMIT, *, cuts=None
    ) -> None:
        """Arrives in chunks of ``chunk`` bytes (None: whole), or cut at the
        offsets ``cuts``."""
        if cuts is not None:
            bounds = [0] + sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
            self._chunks = deque(data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a)
        else:
            size = chunk or max(len(data), 1)
            self._chunks = deque(data[i : i + size] for i in range(0, len(data), size))
        self._buffer = bytearray()
        self._eof = False
        self._limit = limit

    def _wait_for_data(self) -> None:
        if self._chunks:
            self._buffer += self._chunks.popleft()
        else:
            self._eof = True

    def readuntil(self, separator: bytes = b"\r\n") -> bytes:
        seplen = len(separator)
        offset = 0
        while True:
            buflen = len(self._buffer)
            if buflen - offset >= seplen:
                isep = self._buffer.find(separator, offset)
                if isep != -1:
                    break
                offset = buflen + 1 - seplen
                if offset > self._limit:
                    raise _Overrun(offset)
            if self._eof:
                self._buffer.clear()
                raise _Eof()
            self._wait_for_data()
        if isep > self._limit:
            raise _Overrun(isep)
        chunk = bytes(self._buffer[: isep + seplen])
        del self._buffer[: isep + seplen]
        return chunk

    def read(self, n: int) -> bytes:
        if not self._buffer and not self._eof:
            self._wait_for_data()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def buffered(self) -> bytearray:
        return self._buffer

    def unread(self) -> bytes:
        return bytes(self._buffer) + b"".join(self._chunks)


def pieces(data: bytes, chunk: int | None = None) -> list[tuple[str, bytes]]:
    """What the handler would feed for the whole stream: ("line"|"overrun", bytes)."""
    stream = StreamModel(data, chunk)
    out = []
    while True:
        try:
            out.append(("line", stream.readuntil()))
        except _Overrun as exc:
            out.append(("overrun", stream.read(exc.consumed)))
        except _Eof:
            return out


@dataclass
class Outcome:
    verdict: str | None
    body: bytes
    ended: bool  # feed_line returned True
    unread: bytes  # what is left in the stream after the end of data
    reader: DataReader


def transfer(
    data: bytes,
    *,
    chunk: int | None = None,
    normalize: bool = False,
    max_size: int = 10_000_000,
    max_received: int = 50,
    cuts=None,
) -> Outcome:
    """Run RelaySMTP.smtp_DATA's loop over ``data``: a line, then the whole
    lines buffered behind it in one block."""
    reader = DataReader(max_size=max_size, normalize=normalize, max_received=max_received,
                        reader_limit=LIMIT)
    stream = StreamModel(data, chunk, cuts=cuts)
    ended = False
    while True:
        try:
            line = stream.readuntil(b"\r\n")
        except _Overrun as exc:
            reader.feed_overrun(stream.read(exc.consumed))
            continue
        except _Eof:
            break
        if reader.feed_line(line):
            ended = True
            break
        size = whole_lines(stream.buffered())
        if size and reader.feed_block(stream.read(size)):
            ended = True
            break
    verdict, body = reader.finish()
    return Outcome(verdict, body, ended, stream.unread(), reader)
