"""AMQP message bodies (pure): the bytes a broker delivered -> a message to accept.

Input: the payload of one AMQP message, the consumer's format (``postmanq``
or ``relay``) and the intake limits.  Output: a ``Message`` (envelope, the
body as it will be spooled, the key that makes a redelivery recognisable)
or ``BadMessage`` carrying PostmanQ's ``error`` object ``{"message",
"code"}`` for ``<queue>.failure.technical``.

Formats:

* ``postmanq`` (PostmanQ's ``MailMessage``): ``{"envelope": sender,
  "recipient": address, "body": "<the whole RFC 5322 message>"}``; the
  fields PostmanQ itself adds when it republishes (``bindingType``,
  ``error``, ``trySendingCount``) are tolerated and kept.
* ``relay``: ``{"sender", "recipients": [...], "body" | "body_base64",
  "class"?, "campaign"?, "message_id"?}``.

The body goes through the same checks as SMTP DATA (intake.data): it is
fed line by line to a ``DataReader``, so bare CR/LF (refused or
normalised per ``intake.bare_line_endings``), NUL, over-long lines, size
and Received: loops are judged exactly as they are for SMTP.  Addresses are
RFC 5321 paths (intake.policy); the broker is a trusted client, so it may
relay, but source routes are refused as for everyone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field

import orjson

from relay.intake import policy, replies
from relay.intake.data import MAX_TEXT_LINE, DataReader

FORMATS = ("postmanq", "relay")

# The fields of the body each format needs (PQ common/post.go MailMessage).
_REQUIRED = {"postmanq": ("envelope", "recipient", "body"), "relay": ("sender", "recipients")}


@dataclass(frozen=True)
class Limits:
    max_message_size: int
    max_recipients: int
    normalize: bool  # intake.bare_line_endings == "normalize"
    max_received_headers: int


@dataclass(frozen=True)
class Message:
    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    body: bytes  # CRLF lines, checked as DATA is
    smtputf8: bool
    key: str  # "id:<message_id>" or "sha256:<digest of the payload>"
    fields: dict = field(default_factory=dict)  # the original JSON without the body
    lane: str | None = None  # "class" of the relay format
    campaign: str | None = None
    body_field: str = "body"  # or "body_base64": how the body was published

    def origin(self) -> bytes:
        """What the spool keeps to rebuild the message for a failure queue:
        the original fields, and where the original body sits (the last
        ``body_size`` bytes of the spooled body: intake only prepends)."""
        return orjson.dumps({"fields": self.fields, "body_size": len(self.body),
                             "body_field": self.body_field})


class BadMessage(ValueError):
    """Input the relay will never accept: goes to failure.technical."""

    def __init__(self, reply: str, fields: dict | None = None) -> None:
        super().__init__(reply)
        self.reply = reply
        self.fields = fields  # the parsed JSON (None: not JSON at all)

    @property
    def error(self) -> dict:
        """PostmanQ's MailError: code = the first token of the reply."""
        code, _, text = self.reply.partition(" ")
        return {"message": self.reply, "code": int(code) if code.isdigit() else 0}


S501_NOT_JSON = "501 5.6.0 Message is not a JSON object"
S501_MISSING = "501 5.6.0 Missing or invalid field: {}"
S501_BAD_BASE64 = "501 5.6.0 body_base64 is not valid base64"


def payload_key(payload: bytes, message_id: str | None = None) -> str:
    """What identifies one published message across redeliveries."""
    if message_id:
        return "id:" + message_id
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def parse(payload: bytes, fmt: str, limits: Limits, amqp_message_id: str | None = None) -> Message:
    """Parse and check one AMQP payload; raises BadMessage."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadMessage(S501_NOT_JSON) from None
    if not isinstance(doc, dict):
        raise BadMessage(S501_NOT_JSON)
    fields = {k: v for k, v in doc.items() if k not in ("body", "body_base64")}
    for name in _REQUIRED[fmt]:
        if name not in doc:
            raise BadMessage(S501_MISSING.format(name), fields)
    if fmt == "postmanq":
        sender, recipients = doc["envelope"], doc["recipient"]
        if not isinstance(recipients, str):
            raise BadMessage(S501_MISSING.format("recipient"), fields)
        recipients = [recipients]
        body = doc["body"]
        if not isinstance(body, str):
            raise BadMessage(S501_MISSING.format("body"), fields)
        raw = body.encode("utf-8", "surrogatepass")
        message_id = amqp_message_id
        lane = campaign = None
    else:
        sender, recipients = doc["sender"], doc["recipients"]
        if not isinstance(recipients, list) or not recipients or not all(
            isinstance(r, str) for r in recipients
        ):
            raise BadMessage(S501_MISSING.format("recipients"), fields)
        raw = _relay_body(doc, fields)
        message_id = doc.get("message_id") or amqp_message_id
        lane, campaign = doc.get("class"), doc.get("campaign")
        for name, value in (("message_id", message_id), ("class", lane), ("campaign", campaign)):
            if value is not None and not isinstance(value, str):
                raise BadMessage(S501_MISSING.format(name), fields)
    if not isinstance(sender, str):
        raise BadMessage(S501_MISSING.format("envelope" if fmt == "postmanq" else "sender"), fields)
    if len(recipients) > limits.max_recipients:
        raise BadMessage(replies.S452_TOO_MANY_RCPTS, fields)
    sender = _address(sender, fields, sender=True)
    recipients = tuple(_address(r, fields) for r in recipients)
    body = check_body(raw, limits, fields)
    smtputf8 = not sender.isascii() or not all(r.isascii() for r in recipients)
    return Message(sender, recipients, body, smtputf8, payload_key(payload, message_id), fields,
                   lane, campaign, "body_base64" if "body_base64" in doc else "body")


def _relay_body(doc: dict, fields: dict) -> bytes:
    if "body_base64" in doc:
        value = doc["body_base64"]
        if not isinstance(value, str):
            raise BadMessage(S501_MISSING.format("body_base64"), fields)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadMessage(S501_BAD_BASE64, fields) from None
    value = doc.get("body")
    if not isinstance(value, str):
        raise BadMessage(S501_MISSING.format("body"), fields)
    return value.encode("utf-8", "surrogatepass")


def _address(text: str, fields: dict, sender: bool = False) -> str:
    """An RFC 5321 mailbox, checked as MAIL/RCPT arguments are."""
    if sender and text in ("", "<>"):
        return ""
    bad = replies.S501_BAD_SENDER if sender else replies.S553_BAD_RCPT
    if text.startswith("<") or " " in text or not text:
        raise BadMessage(bad, fields)
    try:
        path, rest = policy.parse_path(text, utf8=True)
    except policy.PathError as exc:
        raise BadMessage(bad if sender else exc.reply, fields) from None
    if path is None or rest:
        raise BadMessage(bad, fields)
    if not sender:
        refusal = policy.check_recipient(path, may_relay=True)
        if refusal is not None:
            raise BadMessage(refusal, fields)
    elif path.route:
        raise BadMessage(bad, fields)
    return path.address


def check_body(raw: bytes, limits: Limits, fields: dict | None = None) -> bytes:
    """The body as DATA would have stored it, or BadMessage with DATA's reply.

    Each CRLF-terminated line is dot-stuffed and fed to the SMTP DATA
    reader, which unstuffs it: the reader sees exactly what an SMTP client
    would have sent, so one set of rules judges both entry points."""
    if len(raw) > limits.max_message_size:
        raise BadMessage(replies.S552_TOO_BIG, fields)
    if _plainly_good(raw, limits.max_received_headers):
        return raw  # what the reader would return: the profile showed the walk
    reader = DataReader(max_size=limits.max_message_size, normalize=limits.normalize,
                        max_received=limits.max_received_headers)
    start, end = 0, len(raw)
    while start < end:
        stop = raw.find(b"\r\n", start)
        if stop >= 0:
            line = raw[start:stop + 2]
        elif limits.normalize and raw[-1:] in (b"\n", b"\r"):
            line = raw[start:-1] + b"\r\n"  # its own last bare line end, rewritten
        else:
            line = raw[start:] + b"\r\n"  # a message ends with a line end
        start = end if stop < 0 else stop + 2
        if line[:1] == b".":
            line = b"." + line
        reader.feed_line(line)
        if reader.verdict is not None:
            break
    verdict, body = reader.finish()
    if verdict is not None:
        raise BadMessage(verdict, fields)
    return body


def _plainly_good(raw: bytes, max_received: int) -> bool:
    """Whether the DATA reader would keep ``raw`` as it is, judged on the
    whole body at once (C-speed bytes methods, no line walk): CRLF lines
    only, each within the line limit, no NUL, the Received: headers within
    the limit.  False means "walk it": the reader decides."""
    if not raw.endswith(b"\r\n") or b"\0" in raw:
        return False
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        return False  # a bare CR or LF: refused or rewritten, line by line
    if max(map(len, raw.split(b"\r\n"))) > MAX_TEXT_LINE:
        return False
    if raw.startswith(b"\r\n"):
        head = b""  # no header at all
    else:
        blank = raw.find(b"\r\n\r\n")
        head = raw if blank < 0 else raw[:blank + 2]
    return (b"\r\n" + head.lower()).count(b"\r\nreceived:") <= max_received


def technical_failure(payload: bytes, error: dict) -> bytes:
    """What goes to ``<queue>.failure.technical``: the original JSON object
    plus ``error`` (PQ ReturnMail).  Input that is not a JSON object is kept
    whole, as text, under ``raw``."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        return orjson.dumps({"raw": payload.decode("utf-8", "replace"), "error": error})
    return with_error(doc, error)


def with_error(doc: dict, error: dict) -> bytes:
    """A PostmanQ failure record: the fields as published, ``error`` set."""
    return orjson.dumps({**doc, "error": error})


def bounced(origin: bytes, spooled_body: bytes | None, recipient: str, error: dict) -> bytes:
    """The failure record of one bounced recipient of a message that came
    over AMQP (PQ ReturnMail): its original fields, its original body (the
    tail of the spooled one) and ``error``."""
    record = orjson.loads(origin)
    doc = dict(record["fields"])
    if "recipients" in doc:  # the relay format: this recipient failed
        doc["recipients"] = [recipient]
    if spooled_body is not None:
        size = record["body_size"]
        original = spooled_body[len(spooled_body) - size:] if size else b""
        if record["body_field"] == "body_base64":
            doc["body_base64"] = base64.b64encode(original).decode("ascii")
        else:
            doc["body"] = original.decode("utf-8", "replace")
    doc["error"] = error
    return orjson.dumps(doc)
