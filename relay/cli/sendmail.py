"""relay-sendmail: a Postfix-compatible ``sendmail`` command that hands the
message to the relay over SMTP (and ``mailq``, the same program under that
name).

Input: Postfix's command line (sendmail(1)) and the message on standard
input.  Output: the message submitted to the relay's first ``[[listen]]``
address; exit status 0 only after the relay's ``250`` (so the message is
on disk), otherwise a sysexits code:

    64 EX_USAGE        bad or unsupported flags, no recipients
    65 EX_DATAERR      the input cannot be read, bad headers for -t
    69 EX_UNAVAILABLE  the relay refused the mail (5xx)
    75 EX_TEMPFAIL     the relay is unreachable or answered 4xx
    77 EX_NOPERM       the relay refused with 5.7.x (not permitted)
    78 EX_CONFIG       the relay's configuration cannot be read

The configuration is ``-C FILE``, else ``$RELAY_CONFIG``, else
``conf/relay.toml``.  Flags, as Postfix's sendmail takes them:

    -bm         (default) read the message until EOF or a line with a lone "."
    -i, -oi     a lone "." is data, not the end of the input
    -t          recipients from To, Cc, Bcc (only Resent-To/Cc/Bcc when any
                Resent- header is present), added to the command line's;
                Bcc and Resent-Bcc are removed from the message (with or
                without -t: a Bcc header must never reach the recipients)
    -f SENDER   envelope sender (-r is the old name); "<>" for the null sender
    -F NAME     full name for the From: header added when there is none
                (else $NAME)
    -bs         SMTP on standard input/output, proxied to the relay
    -bp         list the queue like ``postqueue -p`` (also: run as ``mailq``)
    -q          flush the queue (``-qRsite`` one domain); ``-q30m`` is ignored
    --          end of options: what follows is recipients, even "-x"
    -o...       ignored (except -oi), as are -A -B -h -L -m -n -N -O -R -U -v -V -X

Like Postfix's pickup/cleanup, a message without ``From:``, ``Date:`` or
``Message-ID:`` gets one (From: from the envelope sender and -F), and an
unqualified address (``root``) gets ``@`` and the relay's hostname; like
its smtp_line_length_limit, a line over 998 octets is broken with CRLF
SPACE.

Parsing (``parse_args``, ``read_message``, ``prepare``) is pure and has
its own tests; ``main`` does the I/O.
"""

from __future__ import annotations

import email.utils
import getpass
import os
import re
import smtplib
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

DEFAULT_CONFIG = "conf/relay.toml"
SMTP_TIMEOUT = 300.0  # RFC 5321 4.5.3.2: the longest a reply may take

# Postfix sendmail's getopt string: the letters that take an argument.
_WITH_ARGUMENT = set("ABCFLNORVXbefhoprq")
_IGNORED = set("AchLmnNORUvVXBGIe")  # accepted for compatibility, no effect here


class UsageError(Exception):
    """A command line sendmail cannot run: exit EX_USAGE."""


class DataError(Exception):
    """Input the message cannot be built from: exit EX_DATAERR."""


@dataclass
class Options:
    mode: str = "deliver"  # deliver | smtp | list | flush | none
    extract: bool = False  # -t
    dot_ends: bool = True  # a lone "." ends the input (cleared by -i / -oi)
    sender: str | None = None  # -f / -r; "" is the null sender
    full_name: str | None = None  # -F
    config: str | None = None  # -C
    flush_domain: str | None = None  # -qRsite
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: list[str], prog: str = "sendmail") -> Options:
    """Postfix's getopt, by hand: letters cluster (``-ti``), an argument is
    attached (``-fme``) or the next word (``-f me``); options stop at
    ``--`` or the first word that is not an option (POSIX), so an address
    after them is never taken for a flag."""
    options = Options()
    if os.path.basename(prog) == "mailq":
        options.mode = "list"
    words = list(argv)
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            index -= 1
            break
        position = 1
        while position < len(word):
            letter = word[position]
            position += 1
            value = None
            if letter == "q":  # Postfix: -q, -q<interval>, -qRsite, -qIid
                value, position = word[position:], len(word)
                if value[:1] == "R":
                    options.flush_domain = value[1:] or _next(words, index, "-qR")
                    index += 0 if value[1:] else 1
                    options.mode = "flush"
                elif value[:1] == "I":
                    if not value[1:]:
                        _next(words, index, "-qI")
                        index += 1
                    options.mode = "flush"
                elif value == "":
                    options.mode = "flush"
                # -q<interval>: a daemon's run interval; nothing to do here.
                elif options.mode == "deliver":
                    options.mode = "none"
                continue
            if letter in _WITH_ARGUMENT:
                if position < len(word):
                    value, position = word[position:], len(word)
                else:
                    value = _next(words, index, f"-{letter}")
                    index += 1
            _apply(options, letter, value)
    options.recipients = words[index:]
    if options.mode == "smtp" and options.recipients:
        raise UsageError("stand-alone mode requires no recipient")
    if options.extract and options.mode != "deliver":
        raise UsageError("-t can be used only in delivery mode")
    return options


def _next(words: list[str], index: int, flag: str) -> str:
    if index >= len(words):
        raise UsageError(f"option {flag} requires an argument")
    return words[index]


def _apply(options: Options, letter: str, value: str | None) -> None:
    if letter == "b":
        modes = {"m": "deliver", "s": "smtp", "p": "list", "i": "none", "h": "none", "H": "none"}
        if value not in modes:
            raise UsageError(f"unsupported: -b{value}")
        options.mode = modes[value]
    elif letter == "t":
        options.extract = True
    elif letter == "i":
        options.dot_ends = False
    elif letter == "o":
        if value == "i":
            options.dot_ends = False
        # any other -oX: ignored, as Postfix does
    elif letter in ("f", "r"):
        options.sender = _bare_sender(value)
    elif letter == "F":
        options.full_name = value
    elif letter == "C":
        options.config = value
    elif letter in _IGNORED:
        pass
    else:
        raise UsageError(f"invalid option -- '{letter}'")


def _bare_sender(text: str) -> str:
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


# -- the message (pure) ------------------------------------------------------


def read_message(lines: Iterable[bytes], dot_ends: bool) -> bytes:
    """The message from the input's lines, every line ending in CRLF; the
    input ends at EOF, or at a line holding only "." when ``dot_ends``."""
    out = []
    for line in lines:
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line
        if dot_ends and text == b".":
            break
        out.append(text + b"\r\n")
    return b"".join(out)


_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


def split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, each with its continuation lines, and the body).  The
    header ends at the empty line or at the first line that is no field;
    an initial UNIX ``From `` line is dropped, as Postfix does."""
    lines = message.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if lines and lines[0].startswith(b"From "):
        lines.pop(0)
    fields: list[bytes] = []
    index = 0
    for index, line in enumerate(lines):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            if line == b"":
                index += 1
            break
    else:
        index = len(lines)
    body = b"".join(line + b"\r\n" for line in lines[index:])
    return fields, body


def field_name(raw: bytes) -> str:
    return raw.split(b":", 1)[0].strip().decode("ascii").lower()


def field_value(raw: bytes) -> str:
    value = raw.split(b":", 1)[1].decode("utf-8", "replace")
    return re.sub(r"\r\n([ \t])", r"\1", value).strip()


def addresses(values: Iterable[str]) -> list[str]:
    """The addresses of address-list header values or command-line words
    (groups and empty entries dropped)."""
    return [address for _, address in email.utils.getaddresses(list(values)) if address]


def qualify(address: str, hostname: str) -> str:
    """``root`` -> ``root@hostname`` (Postfix's append_at_myorigin)."""
    return address if "@" in address else f"{address}@{hostname}"


@dataclass(frozen=True)
class Submission:
    sender: str  # "" for <>
    recipients: tuple[str, ...]
    data: bytes  # CRLF lines, not dot-stuffed


def prepare(message: bytes, options: Options, *, login: str, hostname: str,
            date: str, message_id: str, env_name: str | None = None) -> Submission:
    """Envelope and final message from the input and the options.

    Raises UsageError when there is no recipient at all, DataError when a
    header cannot be read.  ``date`` and ``message_id`` are the values to
    add when the message has none (the caller picks the clock and the
    randomness)."""
    fields, body = split_header(message)
    names = [field_name(raw) for raw in fields]
    recipients = [qualify(a, hostname) for a in addresses(options.recipients)]
    if options.extract:
        resent = any(name.startswith("resent-") for name in names)
        wanted = (("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc"))
        try:
            values = [field_value(raw) for raw, name in zip(fields, names) if name in wanted]
        except (UnicodeDecodeError, IndexError) as exc:
            raise DataError(f"cannot read the recipient headers: {exc}") from None
        recipients += [qualify(a, hostname) for a in addresses(values)]
    if not recipients:
        raise UsageError(
            "Recipient addresses must be specified on the command line or via the -t option")
    seen, unique = set(), []
    for address in recipients:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    sender = options.sender if options.sender is not None else f"{login}@{hostname}"
    if sender:
        sender = qualify(sender, hostname)
    kept = [raw for raw, name in zip(fields, names) if name not in ("bcc", "resent-bcc")]
    added = []
    if "from" not in names:
        name = options.full_name if options.full_name is not None else env_name
        author = sender or f"MAILER-DAEMON@{hostname}"
        added.append("From: " + (email.utils.formataddr((name, author), "utf-8") if name else author))
    if "date" not in names:
        added.append(f"Date: {date}")
    if "message-id" not in names:
        added.append(f"Message-ID: {message_id}")
    header = b"".join(raw + b"\r\n" for raw in kept) + "".join(
        line + "\r\n" for line in added).encode("utf-8")
    return Submission(sender, tuple(unique), fold_long_lines(header + b"\r\n" + body))


MAX_LINE = 998  # RFC 5321 4.5.3.1.6, and Postfix's smtp_line_length_limit


def fold_long_lines(data: bytes) -> bytes:
    """Lines over 998 octets broken by inserting CRLF SPACE, as Postfix's
    smtp_line_length_limit does: the relay refuses longer lines (500
    5.5.2), and cron jobs print them."""
    if not any(len(line) > MAX_LINE for line in data.split(b"\r\n")):
        return data
    out = []
    for line in data.split(b"\r\n"):
        pieces = [line[:MAX_LINE]]
        rest = line[MAX_LINE:]
        while rest:
            pieces.append(b" " + rest[: MAX_LINE - 1])
            rest = rest[MAX_LINE - 1:]
        out.append(b"\r\n".join(pieces))
    return b"\r\n".join(out)


def exit_status(code: int, text: str = "") -> int:
    """The sysexits code for a refusal by the relay."""
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if re.match(r"^5\.7\.\d", text.strip()):
        return EX_NOPERM
    return EX_UNAVAILABLE if code >= 500 else EX_TEMPFAIL


# -- I/O -----------------------------------------------------------------------


def submit(address: tuple[str, int], submission: Submission, helo: str) -> int:
    """MAIL, every RCPT, DATA; 0 only after the final 250.  A refused
    recipient aborts the whole submission (RSET): sendmail's caller gets
    one answer for the message, never a partial delivery."""
    try:
        with smtplib.SMTP(*address, local_hostname=helo, timeout=SMTP_TIMEOUT) as smtp:
            smtp.ehlo()
            utf8 = not (submission.sender.isascii() and all(r.isascii() for r in submission.recipients))
            options = []
            if utf8:
                options.append("SMTPUTF8")
            if not submission.data.isascii():
                options.append("BODY=8BITMIME")
            code, text = smtp.mail(submission.sender, options)
            if code != 250:
                return _refused("MAIL FROM", code, text)
            for recipient in submission.recipients:
                code, text = smtp.rcpt(recipient)
                if code not in (250, 251):
                    smtp.rset()
                    return _refused(f"RCPT TO:<{recipient}>", code, text)
            code, text = smtp.data(submission.data)
            if code != 250:
                return _refused("end of data", code, text)
    except smtplib.SMTPResponseException as exc:
        return _refused("the relay", exc.smtp_code, exc.smtp_error)
    except (OSError, smtplib.SMTPException) as exc:
        host, port = address
        _say(f"cannot submit to the relay at {host}:{port}: {exc}")
        return EX_TEMPFAIL
    return EX_OK


def _refused(stage: str, code: int, text: bytes | str) -> int:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    _say(f"{stage}: {code} {text}")
    return exit_status(code, text)


def proxy_smtp(address: tuple[str, int], stdin, stdout) -> int:
    """-bs: the relay's SMTP session on standard input and output, until
    the relay ends it (after QUIT, or its idle timeout).  The end of input
    is not passed on as a half-close: aiosmtpd would drop the commands
    still buffered behind it."""
    try:
        sock = socket.create_connection(address, timeout=SMTP_TIMEOUT)
    except OSError as exc:
        stdout.write(b"421 4.3.0 relay unavailable\r\n")
        stdout.flush()
        _say(f"cannot reach the relay at {address[0]}:{address[1]}: {exc}")
        return EX_TEMPFAIL

    def upstream() -> None:
        try:
            while chunk := stdin.read1(65536) if hasattr(stdin, "read1") else stdin.read(65536):
                sock.sendall(chunk)
        except OSError:
            pass

    threading.Thread(target=upstream, daemon=True).start()
    with sock:
        try:
            while chunk := sock.recv(65536):
                stdout.write(chunk)
                stdout.flush()
        except OSError:
            return EX_TEMPFAIL
    return EX_OK


def _say(message: str) -> None:
    print(f"sendmail: {message}", file=sys.stderr)


def config_path(options: Options, environ=os.environ) -> str:
    return options.config or environ.get("RELAY_CONFIG") or DEFAULT_CONFIG


def listen_address(settings) -> tuple[str, int]:
    """The first [[listen]] address, a wildcard made loopback."""
    host, port = settings.listen[0].address
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port


def main(argv: list[str] | None = None) -> int:
    prog = sys.argv[0] if argv is None else "sendmail"
    argv = sys.argv[1:] if argv is None else argv
    try:
        options = parse_args(argv, prog)
    except UsageError as exc:
        _say(str(exc))
        return EX_USAGE
    if options.mode == "none":
        return EX_OK
    from relay import config
    from relay.errors import ConfigError

    path = config_path(options)
    try:
        settings = config.load(path)
    except ConfigError as exc:
        _say(str(exc))
        return EX_CONFIG
    if options.mode == "list":
        from relay.cli import mailq

        return mailq.run(path)
    if options.mode == "flush":
        return _flush(settings, options.flush_domain)
    if options.mode == "smtp":
        return proxy_smtp(listen_address(settings), sys.stdin.buffer, sys.stdout.buffer)
    try:
        message = read_message(sys.stdin.buffer, options.dot_ends)
    except OSError as exc:
        _say(f"cannot read the message: {exc}")
        return EX_DATAERR
    now = time.time()
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = "nobody"
    hostname = settings.hostname
    try:
        submission = prepare(
            message, options, login=login, hostname=hostname,
            date=email.utils.formatdate(now, localtime=True),
            message_id=email.utils.make_msgid(domain=hostname),
            env_name=os.environ.get("NAME"),
        )
    except UsageError as exc:
        _say(str(exc))
        return EX_USAGE
    except DataError as exc:
        _say(str(exc))
        return EX_DATAERR
    return submit(listen_address(settings), submission, hostname)


def _flush(settings, domain: str | None) -> int:
    from relay.cli.control import ControlError, NotRunning, request

    message = {"op": "flush", **({"domain": domain} if domain else {})}
    try:
        request(settings.relay.run_dir, message)
    except NotRunning as exc:
        _say(str(exc))
        return EX_TEMPFAIL
    except ControlError as exc:
        _say(str(exc))
        return EX_UNAVAILABLE
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
