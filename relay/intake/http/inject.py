"""``POST /api/inject/v1`` (pure): a KumoMTA inject request -> the messages
to accept.

Input: the request body (bytes) and the intake limits.  Output: a list of
``Message`` (envelope sender, recipients, the message bytes in CRLF lines)
or an ``InjectError`` with the HTTP status and the field at fault.  No
I/O, no clock of its own (``now`` and ``make_msgid`` come in).

The request is KumoMTA's (docs.kumomta.com, reference/http/api_inject_v1):

    {"envelope_sender": "noreply@example.com",
     "content": "Subject: hi {{ name }}\\n\\nHello"      # a whole RFC 5322 message
              | {"subject", "text_body", "html_body", "headers": {...},
                 "from": {"email", "name"}, "reply_to": {"email", "name"},
                 "attachments": [{"data", "base64", "content_type",
                                  "file_name", "content_id"}]},
     "recipients": [{"email", "name", "substitutions": {...}}],
     "substitutions": {...},                           # for every recipient
     "template_dialect": "Jinja" | "Static"}           # optional

Templates (Jinja2's ``SandboxedEnvironment``: a template cannot reach
Python objects) are rendered only when the request has substitutions
(global or per recipient), each recipient seeing the global ones
overridden by its own; raw content is one template, structured content
templates its subject, bodies, header values and display names.  A
structured message gets ``To:`` (the recipient, unless ``headers`` sets
one), ``Date:`` and ``Message-ID:``; raw content is sent as written.

The same intake policy as SMTP applies: addresses are RFC 5321 paths
(``intake.policy``), and the message passes ``intake.data.DataReader``
(size, NUL, line length, Received: count).  Line endings are rewritten as
CRLF: JSON has no end-of-data marker, so the smuggling that bare LF
enables in SMTP cannot happen here.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import email.utils
import re
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any, Callable

import orjson

from relay.intake import policy, replies
from relay.intake.data import DataReader

_LINE_END = re.compile(r"\r\n|\r|\n")
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
_SMTP_POLICY = email.policy.SMTP.clone(max_line_length=78)


class InjectError(Exception):
    """The request is refused: ``status`` (400, 413, 422) and a message
    that names the field at fault."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_message_size: int
    max_recipients: int
    max_received_headers: int


@dataclass(frozen=True)
class Message:
    sender: str
    recipients: tuple[str, ...]
    body: bytes  # CRLF lines, not dot-stuffed
    smtputf8: bool


def parse_json(body: bytes) -> dict:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InjectError(400, f"malformed JSON: {exc}") from None
    if not isinstance(request, dict):
        raise InjectError(400, "the request body must be a JSON object")
    return request


def _invalid(field: str, problem: str) -> InjectError:
    return InjectError(422, f"{field}: {problem}")


def _string(value: Any, field: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _invalid(field, "expected a string")
    return value


def _object(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(field, "expected an object")
    return value


def _address(text: Any, field: str) -> policy.Path:
    if not isinstance(text, str) or not text:
        raise _invalid(field, "expected an email address")
    try:
        path, rest = policy.parse_path(f"<{text}>", utf8=True)
    except policy.PathError as exc:
        raise _invalid(field, f"not a valid address ({exc.reply})") from None
    if path is None or rest:
        raise _invalid(field, "not a valid address")
    refusal = policy.check_recipient(path, may_relay=True)
    if refusal is not None:
        raise _invalid(field, refusal)
    if not path.domain.startswith("["):
        try:
            policy.routing_domain(path.domain)
        except policy.BadDomain:
            raise _invalid(field, replies.S553_BAD_DOMAIN) from None
    return path


def build(request: dict, limits: Limits, *, hostname: str, now: float,
          make_msgid: Callable[[], str]) -> list[Message]:
    """The messages a validated request stands for; InjectError otherwise.
    Nothing is accepted unless everything is valid."""
    sender = _address(request.get("envelope_sender"), "envelope_sender").address
    content = request.get("content")
    if not isinstance(content, (str, dict)):
        raise _invalid("content", "expected a string (a whole message) or an object")
    recipients_raw = request.get("recipients")
    if not isinstance(recipients_raw, list) or not recipients_raw:
        raise _invalid("recipients", "expected a non-empty list")
    if len(recipients_raw) > limits.max_recipients:
        raise _invalid("recipients", f"more than {limits.max_recipients} (intake.max_recipients)")
    recipients = []
    for index, item in enumerate(recipients_raw):
        field = f"recipients[{index}]"
        if not isinstance(item, dict):
            raise _invalid(field, "expected an object with email")
        path = _address(item.get("email"), f"{field}.email")
        name = _string(item.get("name"), f"{field}.name")
        subs = _object(item.get("substitutions"), f"{field}.substitutions")
        recipients.append((path.address, name, subs))
    global_subs = _object(request.get("substitutions"), "substitutions")
    dialect = request.get("template_dialect", "Jinja")
    if dialect not in ("Jinja", "Static"):
        raise _invalid("template_dialect", "expected \"Jinja\" or \"Static\"")
    templated = dialect == "Jinja" and (bool(global_subs) or any(s for _, _, s in recipients))
    smtputf8 = not sender.isascii() or any(not a.isascii() for a, _, _ in recipients)

    if isinstance(content, str):
        if not templated:
            body = _checked(content, limits, "content")
            return [Message(sender, tuple(a for a, _, _ in recipients), body, smtputf8)]
        template = _compile(content, "content")
        return [
            Message(sender, (address,),
                    _checked(_render(template, {**global_subs, **subs}, "content"), limits,
                             "content"), smtputf8)
            for address, _, subs in recipients
        ]

    builder = _Builder(content, templated)
    messages = []
    for address, name, subs in recipients:
        text = builder.build(address, name, {**global_subs, **subs}, hostname, now, make_msgid)
        messages.append(Message(sender, (address,), _checked(text, limits, "content"), smtputf8))
    return messages


# -- templates -------------------------------------------------------------------

_ENVIRONMENT = None
MAX_PRODUCT = 1 << 20  # longest string or list a template may make with "*"
MAX_EXPONENT = 64  # largest exponent of "**"


def _environment():
    """Jinja2's sandbox, where a template cannot reach Python objects, plus
    bounds on ``*`` and ``**``: ``{{ "x" * 10**12 }}`` would otherwise take
    the worker's memory or CPU before any size check could see it."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        from jinja2.exceptions import SecurityError
        from jinja2.sandbox import SandboxedEnvironment

        class Sandbox(SandboxedEnvironment):
            intercepted_binops = frozenset(["*", "**"])

            def call_binop(self, context, operator, left, right):
                if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                    raise SecurityError(f"exponent over {MAX_EXPONENT}")
                if operator == "*":
                    for seq, times in ((left, right), (right, left)):
                        if (isinstance(seq, (str, list, tuple)) and isinstance(times, int)
                                and len(seq) * times > MAX_PRODUCT):
                            raise SecurityError(f"a result over {MAX_PRODUCT} items")
                return super().call_binop(context, operator, left, right)

        _ENVIRONMENT = Sandbox(autoescape=False, keep_trailing_newline=True)
    return _ENVIRONMENT


def _compile(text: str, field: str):
    import jinja2

    try:
        return _environment().from_string(text)
    except jinja2.TemplateError as exc:
        raise _invalid(field, f"template error: {exc}") from None


def _render(template, context: dict, field: str) -> str:
    import jinja2

    try:
        return template.render(context)
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise _invalid(field, f"template error: {exc}") from None


class _Field:
    """A string of the structured content: a template when templating."""

    def __init__(self, text: str | None, field: str, templated: bool) -> None:
        self.text, self.field = text, field
        self.template = _compile(text, field) if templated and text else None

    def value(self, context: dict) -> str | None:
        if self.template is None:
            return self.text
        return _render(self.template, context, self.field)


class _Builder:
    """Structured content -> a MIME message per recipient (stdlib email)."""

    def __init__(self, content: dict, templated: bool) -> None:
        f = "content"
        self.subject = _Field(_string(content.get("subject"), f"{f}.subject"), f"{f}.subject", templated)
        self.text = _Field(_string(content.get("text_body"), f"{f}.text_body"), f"{f}.text_body", templated)
        self.html = _Field(_string(content.get("html_body"), f"{f}.html_body"), f"{f}.html_body", templated)
        self.amp = _string(content.get("amp_html_body"), f"{f}.amp_html_body")
        if self.amp is not None:
            raise _invalid(f"{f}.amp_html_body", "not supported")
        self.people = {}
        for key in ("from", "reply_to"):
            person = _object(content.get(key), f"{f}.{key}")
            if person:
                address = _address(person.get("email"), f"{f}.{key}.email").address
                name = _string(person.get("name"), f"{f}.{key}.name")
                self.people[key] = (address, _Field(name, f"{f}.{key}.name", templated))
        self.headers = []
        for name, value in _object(content.get("headers"), f"{f}.headers").items():
            field = f"{f}.headers.{name}"
            if not _HEADER_NAME.match(name):
                raise _invalid(field, "not a valid header name")
            self.headers.append((name, _Field(_string(value, field, optional=False), field, templated)))
        self.header_names = {name.lower() for name, _ in self.headers}
        self.attachments = [
            _attachment(item, f"{f}.attachments[{i}]")
            for i, item in enumerate(_list(content.get("attachments"), f"{f}.attachments"))
        ]

    def build(self, address: str, name: str | None, context: dict, hostname: str, now: float,
              make_msgid: Callable[[], str]) -> str:
        message = EmailMessage(policy=_SMTP_POLICY)
        try:
            if "from" in self.people:
                message["From"] = _mailbox(self.people["from"], context)
            if "to" not in self.header_names:
                message["To"] = Address(display_name=name or "", addr_spec=address)
            if "reply_to" in self.people:
                message["Reply-To"] = _mailbox(self.people["reply_to"], context)
            subject = self.subject.value(context)
            if subject is not None:
                message["Subject"] = subject
            for header, value in self.headers:
                message[header] = value.value(context)
            if "date" not in self.header_names:
                message["Date"] = email.utils.formatdate(now, localtime=True)
            if "message-id" not in self.header_names:
                message["Message-ID"] = make_msgid()
        except (ValueError, TypeError, IndexError) as exc:  # CR/LF in a value, bad address
            raise _invalid("content", f"cannot make the header: {exc}") from None
        text, html = self.text.value(context), self.html.value(context)
        if text is not None and html is not None:
            message.set_content(text)
            message.add_alternative(html, subtype="html")
        elif html is not None:
            message.set_content(html, subtype="html")
        else:
            message.set_content(text or "")
        for data, maintype, subtype, file_name, content_id in self.attachments:
            extra = {"filename": file_name} if file_name else {}
            if content_id:
                extra.update(cid=f"<{content_id.strip('<>')}>", disposition="inline")
            if isinstance(data, str):
                message.add_attachment(data, subtype=subtype, **extra)
            else:
                message.add_attachment(data, maintype=maintype, subtype=subtype, **extra)
        return message.as_bytes(policy=_SMTP_POLICY).decode("utf-8", "surrogateescape")


def _list(value: Any, field: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid(field, "expected a list")
    return value


def _mailbox(person: tuple[str, _Field], context: dict) -> Address:
    address, name = person
    return Address(display_name=name.value(context) or "", addr_spec=address)


def _attachment(item: Any, field: str):
    if not isinstance(item, dict):
        raise _invalid(field, "expected an object with data")
    data = _string(item.get("data"), f"{field}.data", optional=False)
    encoded = item.get("base64", False)
    if not isinstance(encoded, bool):
        raise _invalid(f"{field}.base64", "expected true or false")
    content_type = _string(item.get("content_type"), f"{field}.content_type") or (
        "application/octet-stream")
    maintype, _, subtype = content_type.partition("/")
    if not (maintype and subtype and _HEADER_NAME.match(maintype) and _HEADER_NAME.match(subtype)):
        raise _invalid(f"{field}.content_type", "expected type/subtype")
    file_name = _string(item.get("file_name"), f"{field}.file_name")
    content_id = _string(item.get("content_id"), f"{field}.content_id")
    if encoded:
        try:
            payload: str | bytes = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"{field}.data", "not valid base64") from None
    elif maintype.lower() == "text":
        payload = data  # the email package picks charset and transfer encoding
    else:
        payload = data.encode("utf-8")
    return payload, maintype.lower(), subtype.lower(), file_name, content_id


# -- the intake checks on the finished message --------------------------------------


def _checked(text: str, limits: Limits, field: str) -> bytes:
    """The message as CRLF bytes, through the same DataReader as SMTP DATA."""
    data = text.encode("utf-8", "surrogateescape")
    if len(data) > limits.max_message_size:
        raise InjectError(413, f"{field}: {replies.S552_TOO_BIG}")
    lines = _LINE_END.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    reader = DataReader(max_size=limits.max_message_size, normalize=True,
                        max_received=limits.max_received_headers)
    for line in lines:
        raw = line.encode("utf-8", "surrogateescape")
        # DataReader takes SMTP's dot-stuffed lines: stuff, and it unstuffs.
        reader.feed_line((b"." + raw if raw[:1] == b"." else raw) + b"\r\n")
    verdict, body = reader.finish()
    if verdict is not None:
        status = 413 if verdict.startswith("552") else 422
        raise InjectError(status, f"{field}: {verdict}")
    return body
