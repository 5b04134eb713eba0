"""Fuzz targets: one per parser that takes untrusted input, and its properties.

Each target has a ``check_*`` function that takes a structured input (what
hypothesis generates in tests/fuzz/test_*.py) and asserts the target's
properties, and a ``run(data: bytes)`` entry point that derives such an
input from raw bytes: the corpus files (tests/fuzz/corpus/<target>/) are
replayed through it, and the atheris harness (tests/fuzz/atheris_fuzz.py,
scripts/fuzz) mutates them.  ``TARGETS`` maps a target's name to ``run``.

The properties, for every input:

* no exception but the documented ones (``PathError`` from the path parser,
  ``RemoteProtocolError`` from the reply parser, ``ConfigError`` from the
  config loader, none at all from the DATA reader and an SMTP session);
* the result does not depend on how the input was cut into chunks (whole,
  one byte at a time, random cuts: the h11 ``tr`` discipline);
* relay._fast gives the same bytes, lengths and errors as relay._ref;
* what a parser accepts is well formed (limits kept, no bare line ends, a
  reply line for a client is ``ddd`` plus an enhanced code, ...).

A failed property is an ``AssertionError``: a crash to atheris, a
counterexample to hypothesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import random
import re
import os
import tomllib

import tomli_w
from hypothesis import HealthCheck, settings

from relay import config
from relay.deliver import smtp_proto
from relay.errors import ConfigError, RemoteProtocolError
from relay.intake import policy, replies
from relay.intake.data import MAX_TEXT_LINE
from relay.intake.handler import IntakeState
from support import implementation, transfer

CATALOGUE = frozenset(
    value for name, value in vars(replies).items() if name.startswith("S") and isinstance(value, str)
)
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


# RELAY_FUZZ_SCALE=N (scripts/fuzz --engine hypothesis) runs N times the
# examples with fresh randomness; by default the suite is derandomized.
SCALE = int(os.environ.get("RELAY_FUZZ_SCALE", "0") or 0)


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of a fuzz test: bounded, reproducible, no deadline."""
    return settings(
        max_examples=examples * (SCALE or 1),
        deadline=None,
        derandomize=not SCALE,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _cuts(data: bytes, seed: int, count: int) -> list[int]:
    """Random cut offsets for ``data`` (deterministic for a seed)."""
    rng = random.Random(seed)
    return sorted(rng.randrange(1, len(data)) for _ in range(count)) if len(data) > 1 else []


def _splits(data: bytes, cuts) -> list[list[bytes]]:
    """The chunkings every stream target is run with: whole, one byte at a
    time, and cut at ``cuts``."""
    bounds = [0] + sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
    return [
        [data],
        [data[i : i + 1] for i in range(len(data))],
        [data[a:b] for a, b in zip(bounds, bounds[1:])],
    ]


# -- the intake path parser (MAIL FROM / RCPT TO arguments) ---------------------


def check_path(text: str, utf8: bool) -> None:
    try:
        path, rest = policy.parse_path(text, utf8=utf8)
    except policy.PathError as exc:
        assert exc.reply in CATALOGUE and exc.reply[:1] == "5", exc.reply
        return
    assert rest == rest.strip()
    if path is None:  # <>
        return
    assert path.address == f"{path.local}@{path.domain}"
    assert len(path.local.encode("utf-8")) <= policy.MAX_LOCAL_PART
    assert len(path.domain.encode("utf-8")) <= policy.MAX_DOMAIN
    assert len((path.route + path.address).encode("utf-8")) + 2 <= policy.MAX_PATH
    assert utf8 or path.address.isascii()
    if not path.domain.startswith("["):
        labels = policy.routing_domain(path.domain).split(".")
        assert all(0 < len(label) <= 63 for label in labels)
    # What was accepted reads back the same, written the canonical way.
    assert policy.parse_path(f"<{path.route}{path.address}>", utf8=utf8) == (path, "")
    for may_relay in (False, True):
        refusal = policy.check_recipient(path, may_relay=may_relay)
        assert refusal is None or refusal in CATALOGUE
        assert may_relay or refusal is not None  # an untrusted client relays nowhere
    trick = policy.relay_trick(path)
    assert trick is None or isinstance(trick, str)


def run_path(data: bytes) -> None:
    text = data[1:].decode("utf-8", "surrogateescape")  # as aiosmtpd decodes arguments
    check_path(text, utf8=bool(data[:1]) and data[0] & 1 == 1)


# -- the DATA reader ----------------------------------------------------------------

DATA_VERDICTS = frozenset({
    replies.S500_LINE_TOO_LONG, replies.S552_TOO_BIG, replies.S550_NUL,
    replies.S550_BARE_LINE_ENDING, replies.S554_LOOP,
})
TRAILER = b"QUIT\r\n"


def check_data(data: bytes, *, normalize: bool, max_size: int, cuts) -> None:
    """``data`` as sent after 354, then the end of data and a next command."""
    wire = data + b"\r\n.\r\n" + TRAILER
    outcomes = [
        transfer(wire, normalize=normalize, max_size=max_size, max_received=3),
        transfer(wire, chunk=1, normalize=normalize, max_size=max_size, max_received=3),
        transfer(wire, normalize=normalize, max_size=max_size, max_received=3, cuts=cuts),
    ]
    whole = outcomes[0]
    for other in outcomes[1:]:
        assert (other.verdict, other.body, other.ended, other.unread) == (
            whole.verdict, whole.body, whole.ended, whole.unread,
        )
    assert whole.ended  # the terminator we appended is always found ...
    assert whole.unread.endswith(TRAILER)  # ... and nothing after it is taken as data
    if whole.verdict is not None:
        assert whole.verdict in DATA_VERDICTS
        assert whole.body == b""
        return
    body = whole.body
    assert body == b"" or body.endswith(b"\r\n")
    assert BARE.search(body) is None and b"\0" not in body
    assert all(len(line) <= MAX_TEXT_LINE for line in body.split(b"\r\n"))
    # Normalising turns a bare LF into CRLF: at most one more byte for each.
    assert len(body) <= (2 * max_size if normalize else max_size)
    # What delivery sends (dot-stuffed) reads back, at a receiver, as this
    # body (an empty one is sent as one empty line: smtp_proto.dot_stuffed).
    sent = smtp_proto.dot_stuffed(body)
    again = transfer(sent + TRAILER, normalize=False, max_size=len(sent) + 1, max_received=10**6)
    assert (again.verdict, again.body, again.unread) == (None, body or b"\r\n", TRAILER)


def run_data(data: bytes) -> None:
    flags = data[0] if data else 0
    check_data(
        data[1:], normalize=bool(flags & 1), max_size=1024 if flags & 2 else 10**6,
        cuts=_cuts(data, flags, 8),
    )


# -- the SMTP reply parser (delivery) ------------------------------------------------

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def _parse_replies(chunks: list[bytes]) -> tuple[list, bool]:
    """(the replies, whether RemoteProtocolError ended the stream)."""
    parser = smtp_proto.ReplyParser("mx.test")
    out = []
    try:
        for chunk in chunks:
            parser.receive_data(chunk)
            while (reply := parser.next_reply()) is not None:
                out.append(reply)
    except RemoteProtocolError:
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
        return out, True
    return out, False


def check_reply_stream(data: bytes, cuts) -> None:
    results = [_parse_replies(chunks) for chunks in _splits(data, cuts)]
    assert results[1] == results[0] and results[2] == results[0], "depends on the chunking"
    for reply in results[0][0]:
        assert 0 <= reply.code <= 999 and reply.mx == "mx.test"
        if reply.enhanced is not None:
            assert _ENHANCED.fullmatch(reply.enhanced), reply.enhanced
            assert reply.enhanced[0] == f"{reply.code:03d}"[0]
        assert isinstance(reply.text, str)


def check_reply_lines(code: int, lines: list[tuple[str | None, str]]) -> None:
    """A well-formed reply (every line ``code[-| ][enhanced ]text``) parses to
    that code, the last line's enhanced code, and the texts joined by LF."""
    wire = b""
    for index, (enhanced, text) in enumerate(lines):
        sep = " " if index == len(lines) - 1 else "-"
        wire += f"{code}{sep}{enhanced + ' ' if enhanced else ''}{text}\r\n".encode()
    for chunks in _splits(wire, [len(wire) // 2]):
        got, failed = _parse_replies(chunks)
        assert not failed and len(got) == 1
        reply = got[0]
        assert reply.code == code
        last = lines[-1][0]
        if last is not None and last[0] == str(code)[0]:
            assert reply.enhanced == last
            texts = [text for _, text in lines]
        else:
            assert reply.enhanced is None
            texts = [f"{e} {t}" if e else t for e, t in lines]
        assert reply.text == "\n".join(texts).strip()


def run_reply(data: bytes) -> None:
    check_reply_stream(data[1:], _cuts(data, data[0] if data else 0, 6))


# -- DKIM canonicalization and body hash: _fast against _ref ----------------------


def _impls(module: str):
    return implementation("_ref", module), implementation("_fast", module)


def _outcome(call):
    try:
        return call()
    except Exception as exc:  # the error itself must agree too
        return type(exc)


def check_canon(name: bytes, value: bytes) -> None:
    ref, fast = _impls("canon")
    for function in ("canon_header_simple", "canon_header_relaxed"):
        expected = getattr(ref, function)(name, value)
        assert getattr(fast, function)(name, value) == expected, function
    # Canonical twice is canonical once, for a field as a header holds it: a
    # name without a colon, a value without CRLF CRLF (relay/_ref/canon.py).
    if b":" not in name and b"\r\n\r\n" not in value:
        relaxed = ref.canon_header_relaxed(name, value)
        again_name, _, again_value = relaxed.partition(b":")
        assert ref.canon_header_relaxed(again_name, again_value) == relaxed  # idempotent
        assert fast.canon_header_relaxed(again_name, again_value) == relaxed


def _hash(module, algo, canon, limit, chunks):
    hasher = module.BodyHasher(algo, canon, limit)
    lengths = []
    for chunk in chunks:
        hasher.update(chunk)
        lengths.append(hasher.length)
    return lengths, hasher.digest(), hasher.length


def check_body(body: bytes, canon: str, algo: str, limit: int | None, cuts) -> None:
    ref, fast = _impls("bodyhash")
    expected = None
    for chunks in _splits(body, cuts):
        want = _hash(ref, algo, canon, limit, chunks)
        assert _hash(fast, algo, canon, limit, chunks) == want, "parity"
        assert expected is None or want[1:] == expected, "depends on the chunking"
        expected = want[1:]
    # Any buffer is a chunk, as for the signer's memoryviews.
    views = [memoryview(body), bytearray(body)]
    for view in views:
        assert _hash(fast, algo, canon, limit, [view])[1:] == expected
        assert _hash(ref, algo, canon, limit, [view])[1:] == expected


def check_body_arguments(algo, canon, limit, chunk) -> None:
    """Bad arguments fail the same way in both (ValueError, TypeError)."""
    ref, fast = _impls("bodyhash")
    results = []
    for module in (ref, fast):
        def attempt(module=module):
            hasher = module.BodyHasher(algo, canon, limit)
            hasher.update(chunk)
            digest = hasher.digest()
            return digest, _outcome(lambda: hasher.update(b"x"))
        results.append(_outcome(attempt))
    assert results[0] == results[1], results


def run_dkim(data: bytes) -> None:
    flags = data[0] if data else 0
    body = data[1:]
    name, _, value = body.partition(b":")
    check_canon(name, value)
    limit = (flags >> 3) * 7 if flags & 4 else None
    check_body(
        body, "relaxed" if flags & 1 else "simple", "sha1" if flags & 2 else "sha256", limit,
        _cuts(body, flags, 8),
    )


# -- the config loader --------------------------------------------------------------


_PYTHON_ERRORS = re.compile(r"invalid literal|Exceeds the limit|could not convert|object has no")


def check_config(doc: dict) -> None:
    before = repr(doc)
    try:
        settings = config.from_dict(copy.deepcopy(doc))
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("["), message  # names the table (and the key)
        assert not _PYTHON_ERRORS.search(message), message  # ours, not int()'s
        return
    finally:
        assert repr(doc) == before
    assert config.restart_needed(settings, settings) == []
    assert settings.worker_count >= 1
    assert settings.listen
    # `relayctl config` prints this document; pasted back it is the same settings.
    pasted = tomllib.loads(tomli_w.dumps(config.to_document(settings)))
    assert config.from_dict(pasted, source=settings.source) == settings


def run_config(data: bytes) -> None:
    try:
        doc = tomllib.loads(data.decode("utf-8", "replace"))
    except tomllib.TOMLDecodeError:
        return
    check_config(doc)


# -- an SMTP session (aiosmtpd + RelaySMTP): every command, MAIL/RCPT parameters ---

_REPLY_LINE = re.compile(rb"(\d{3})([ -])(.*)")
_REPLY_ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}( |$)")
_LEAK = re.compile(rb"\(\w*(Error|Exception)\)|Traceback|File \"")
_QUEUE_ID = re.compile(rb"queued as \w+")  # new in every session
TRUSTED, UNTRUSTED = "127.0.0.1", "192.0.2.1"


class _Transport(asyncio.Transport):
    """The socket side of a session: keeps what the server writes."""

    def __init__(self, peer: str, loop) -> None:
        super().__init__()
        self.peer = peer
        self.loop = loop
        self.protocol = None
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name, default=None):
        return {"peername": (self.peer, 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data) -> None:
        if not self.closed:  # as asyncio drops writes after close
            self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _quiet_logs():
    """Session logs off (they are per command), errors collected."""
    errors = _Errors()
    saved = []
    for name in ("relay", "mail.log"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.ERROR)
        logger.propagate = False
        logger.addHandler(errors)
    try:
        yield errors
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(errors)
            logger.setLevel(level)
            logger.propagate = propagate


_SETTINGS: dict[bool, config.Settings] = {}
_LOOP: list[asyncio.AbstractEventLoop] = []


def _settings(normalize: bool) -> config.Settings:
    if normalize not in _SETTINGS:
        _SETTINGS[normalize] = config.from_dict({
            "relay": {"hostname": "relay.test", "spool_dir": "."},
            "intake": {
                "min_free_space": 0, "max_message_size": 2048, "max_recipients": 3,
                "max_received_headers": 3,
                "bare_line_endings": "normalize" if normalize else "reject",
            },
        })
    return _SETTINGS[normalize]


async def _settle(server, transport, limit: int = 20000) -> None:
    """Run the session until it waits for input (asyncio's StreamReader has
    a ``_waiter`` then) or has ended."""
    task = server._handler_coroutine
    for _ in range(limit):
        await asyncio.sleep(0)
        if task.done() or transport.closed or server._reader._waiter is not None:
            return
    raise AssertionError("the session makes no progress")


def _session(chunks: list[bytes], peer: str, normalize: bool) -> tuple[bytes, list]:
    accepted = []

    async def accept(transaction) -> None:
        accepted.append(transaction)

    async def drive() -> bytearray:
        state = IntakeState(_settings(normalize), 0, accept)
        server = state.factory()
        transport = _Transport(peer, asyncio.get_running_loop())
        transport.protocol = server
        server.connection_made(transport)
        await _settle(server, transport)
        for chunk in chunks:
            if transport.closed:
                break
            server.data_received(chunk)
            await _settle(server, transport)
        transport.close()  # the client hangs up
        for _ in range(100):
            await asyncio.sleep(0)
            if server._handler_coroutine.done():
                break
        assert server._handler_coroutine.done(), "the session outlives its connection"
        assert not state.sessions and not state.connections  # nothing left counted
        return transport.written

    if not _LOOP:
        _LOOP.append(asyncio.new_event_loop())
    loop = _LOOP[0]
    failures = []
    loop.set_exception_handler(lambda loop, context: failures.append(context))
    written = loop.run_until_complete(drive())
    assert not failures, failures
    return bytes(written), accepted


def check_session(wire: bytes, cuts, *, trusted: bool, normalize: bool) -> None:
    peer = TRUSTED if trusted else UNTRUSTED
    outputs = []
    with _quiet_logs() as errors:
        for chunks in (_splits(wire, cuts)[0], _splits(wire, cuts)[2]):
            outputs.append(_session(chunks, peer, normalize))
    assert not errors.records, [r.getMessage() for r in errors.records]
    (written, accepted), (written_cut, accepted_cut) = outputs
    same = [_QUEUE_ID.sub(b"queued as ID", w) for w in (written, written_cut)]
    assert same[0] == same[1], "the replies depend on how the input was cut"
    assert written.endswith(b"\r\n")
    lines = written[:-2].split(b"\r\n")
    assert lines[0].startswith(b"220 relay.test ")
    queued = 0
    for line in lines:
        match = _REPLY_LINE.fullmatch(line)
        assert match, line
        assert len(line) + 2 <= 512, line  # RFC 5321 4.5.3.1.5
        assert not _LEAK.search(line), line  # no internals in a reply
        code, text = match.group(1), match.group(3)
        if code[:1] in b"45" or (code[:1] == b"2" and code not in (b"220", b"250")):
            enhanced = _REPLY_ENHANCED.match(text)
            assert enhanced and text[:1] == code[:1], line
        queued += line.startswith(b"250 2.0.0 OK queued as ")
    assert queued == len(accepted) == len(accepted_cut)
    if not trusted:
        assert not accepted, "an unauthenticated client outside mynetworks relayed mail"
    for transaction in accepted:
        assert transaction.recipients
        assert len(transaction.recipients) <= 3
        body = transaction.body
        assert body.endswith(b"\r\n") and BARE.search(body) is None and b"\0" not in body
        for address in (transaction.sender, *transaction.recipients):
            if address:
                path, rest = policy.parse_path(f"<{address}>", utf8=True)
                assert path is not None and path.address == address and rest == ""


def run_command(data: bytes) -> None:
    flags = data[0] if data else 0
    wire = data[1:]
    check_session(wire, _cuts(wire, flags, 4), trusted=bool(flags & 1), normalize=bool(flags & 2))


TARGETS = {
    "path": run_path,
    "data": run_data,
    "reply": run_reply,
    "dkim": run_dkim,
    "config": run_config,
    "command": run_command,
}
