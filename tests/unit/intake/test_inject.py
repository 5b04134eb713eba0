"""relay.intake.http.inject and .tokens (pure): request -> messages, tokens."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest

from relay import config
from relay.intake.http import inject
from relay.intake.http.tokens import Tokens, hash_token, new_token

LIMITS = inject.Limits(max_message_size=100_000, max_recipients=10, max_received_headers=3)


def build(request: dict, limits=LIMITS):
    return inject.build(request, limits, hostname="relay.test", now=1_795_000_000.0,
                        make_msgid=lambda: "<id@relay.test>")


def request(**fields):
    base = {"envelope_sender": "app@sender.example", "content": "Subject: hi\n\nHello\n",
            "recipients": [{"email": "a@d1.example"}]}
    base.update(fields)
    return base


def refused(req, status=422, limits=LIMITS):
    with pytest.raises(inject.InjectError) as caught:
        build(req, limits)
    assert caught.value.status == status, caught.value.message
    return caught.value.message


def test_raw_content_without_substitutions_is_one_message_in_crlf():
    [message] = build(request(recipients=[{"email": "a@d1.example"}, {"email": "b@d2.example"}]))
    assert message.recipients == ("a@d1.example", "b@d2.example")
    assert message.sender == "app@sender.example"
    assert message.body == b"Subject: hi\r\n\r\nHello\r\n"


def test_raw_content_with_substitutions_is_one_message_per_recipient():
    messages = build(request(
        content="Subject: hi {{ name }}\n\n{{ greeting }}, {{ name }}\n",
        substitutions={"greeting": "Hello", "name": "nobody"},
        recipients=[{"email": "a@d1.example", "substitutions": {"name": "Ann"}},
                    {"email": "b@d1.example"}]))
    assert [m.body for m in messages] == [b"Subject: hi Ann\r\n\r\nHello, Ann\r\n",
                                          b"Subject: hi nobody\r\n\r\nHello, nobody\r\n"]


def test_without_substitutions_braces_are_text():
    [message] = build(request(content="Subject: {{ x }}\n\nbody\n"))
    assert message.body.startswith(b"Subject: {{ x }}\r\n")


def test_the_sandbox_keeps_python_out():
    message = refused(request(content="{{ ''.__class__.__mro__[1].__subclasses__() }}",
                              substitutions={"x": 1}))
    assert message.startswith("content: template error")


@pytest.mark.parametrize("expression", ['"x" * 10**9', '[1] * 10**8', "9 ** 99999999"])
def test_templates_cannot_exhaust_memory_or_cpu(expression):
    message = refused(request(content="Subject: {{ %s }}\n\nbody\n" % expression,
                              substitutions={"x": 1}))
    assert message.startswith("content: template error")


def test_small_products_still_work():
    [message] = build(request(content="Subject: {{ '-' * n }}\n\nbody\n", substitutions={"n": 3}))
    assert message.body.startswith(b"Subject: ---\r\n")


def test_structured_content_is_valid_mime():
    data = bytes(range(256))
    [message] = build(request(
        content={"subject": "Hi {{ name }}", "text_body": "Text for {{ name }}",
                 "html_body": "<p>HTML for {{ name }}</p>",
                 "from": {"email": "app@sender.example", "name": "App"},
                 "reply_to": {"email": "help@sender.example"},
                 "headers": {"X-Campaign": "c-{{ name }}"},
                 "attachments": [{"data": base64.b64encode(data).decode(), "base64": True,
                                  "content_type": "application/pdf", "file_name": "a.pdf"}]},
        recipients=[{"email": "a@d1.example", "name": "Ann", "substitutions": {"name": "Ann"}}]))
    assert b"\n" not in message.body.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(message.body, policy=email.policy.default)
    assert parsed["Subject"] == "Hi Ann" and parsed["To"] == "Ann <a@d1.example>"
    assert parsed["From"] == "App <app@sender.example>"
    assert parsed["Reply-To"] == "help@sender.example" and parsed["X-Campaign"] == "c-Ann"
    assert parsed["Message-ID"] == "<id@relay.test>" and parsed["Date"]
    assert parsed.get_content_type() == "multipart/mixed"
    body = parsed.get_body(("plain",))
    assert body.get_content().strip() == "Text for Ann"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>HTML for Ann</p>"
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "a.pdf" and attachment.get_content() == data


def test_header_injection_is_refused():
    message = refused(request(content={"text_body": "x", "headers": {"X-A": "a\r\nBcc: x@y.example"}}))
    assert message.startswith("content")


@pytest.mark.parametrize("body, status", [(b"{not json", 400), (b"[1, 2]", 400)])
def test_malformed_json_is_400(body, status):
    with pytest.raises(inject.InjectError) as caught:
        inject.parse_json(body)
    assert caught.value.status == status


@pytest.mark.parametrize("fields, named", [
    ({"envelope_sender": "not an address"}, "envelope_sender"),
    ({"envelope_sender": None}, "envelope_sender"),
    ({"content": 5}, "content"),
    ({"recipients": []}, "recipients"),
    ({"recipients": [{"email": "ok@d1.example"}, {"email": "bad@@x"}]}, "recipients[1].email"),
    ({"recipients": [{"email": "@a.example,@b.example:c@d1.example"}]}, "recipients[0].email"),
    ({"recipients": [{"email": "a@d1.example", "substitutions": [1]}]}, "recipients[0].substitutions"),
    ({"content": {"attachments": [{"data": "!!", "base64": True}]}}, "content.attachments[0].data"),
    ({"content": {"headers": {"Bad Name": "x"}}}, "content.headers.Bad Name"),
    ({"content": "Subject: {{ x\n\n", "substitutions": {"x": 1}}, "content"),
    ({"template_dialect": "Handlebars"}, "template_dialect"),
    ({"recipients": [{"email": f"r{i}@d1.example"} for i in range(11)]}, "recipients"),
])
def test_invalid_fields_are_422_and_named(fields, named):
    assert refused(request(**fields)).startswith(named + ":")


def test_intake_data_rules_apply():
    assert "NUL" in refused(request(content="Subject: x\n\na\x00b\n"))
    assert "Line too long" in refused(request(content="Subject: x\n\n" + "a" * 1200 + "\n"))
    assert "mail loop" in refused(request(content="Received: x\n" * 4 + "\nbody\n"))
    assert "size" in refused(request(content="Subject: x\n\n" + "a\n" * 60_000), status=413)


def test_dots_at_line_starts_survive():
    [message] = build(request(content="Subject: x\n\n.\n..two\n"))
    assert message.body == b"Subject: x\r\n\r\n.\r\n..two\r\n"


def test_tokens_hash_and_check():
    token = new_token()
    assert len(token) > 40 and hash_token(token).startswith("sha256$")
    entry = config.Token(name="app", token_hash=hash_token(token), scopes=("inject",))
    tokens = Tokens([entry])
    grant = tokens.check(f"Bearer {token}")
    assert grant.name == "app" and grant.scopes == {"inject"}
    assert tokens.check(f"bearer  {token} ") is not None
    for bad in (None, "", token, f"Basic {token}", f"Bearer {token}x", "Bearer "):
        assert tokens.check(bad) is None

