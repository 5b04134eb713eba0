"""intake.amqp_message: AMQP payloads -> messages, judged as SMTP DATA is."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake import amqp_message as am

LIMITS = am.Limits(max_message_size=10_000, max_recipients=3, normalize=False,
                   max_received_headers=5)
BODY = "From: a@x.example\r\nSubject: hi\r\n\r\nHello\r\n.dot line\r\n"


def pq(**fields) -> bytes:
    doc = {"envelope": "app@sender.example", "recipient": "rcpt@d1.example", "body": BODY}
    doc.update(fields)
    return orjson.dumps({k: v for k, v in doc.items() if v is not None})


def test_postmanq_message_with_its_extra_fields():
    payload = pq(bindingType=3, trySendingCount=2, error={"code": 551, "message": "x"})
    message = am.parse(payload, "postmanq", LIMITS)
    assert message.sender == "app@sender.example"
    assert message.recipients == ("rcpt@d1.example",)
    assert message.body == BODY.encode()  # a leading dot is data, not transparency
    assert message.fields["bindingType"] == 3 and "body" not in message.fields
    assert message.key.startswith("sha256:") and not message.smtputf8


def test_the_key_is_stable_for_the_same_payload_and_differs_otherwise():
    assert am.parse(pq(), "postmanq", LIMITS).key == am.parse(pq(), "postmanq", LIMITS).key
    assert am.parse(pq(), "postmanq", LIMITS).key != am.parse(
        pq(recipient="other@d1.example"), "postmanq", LIMITS).key
    assert am.parse(pq(), "postmanq", LIMITS, amqp_message_id="m1").key == "id:m1"


def test_relay_format_several_recipients_base64_and_message_id():
    payload = orjson.dumps({
        "sender": "", "recipients": ["a@d1.example", "b@d2.example"],
        "body_base64": base64.b64encode(BODY.encode()).decode(),
        "class": "bulk", "campaign": "c1", "message_id": "abc",
    })
    message = am.parse(payload, "relay", LIMITS)
    assert (message.sender, message.recipients) == ("", ("a@d1.example", "b@d2.example"))
    assert message.body == BODY.encode()
    assert (message.key, message.lane, message.campaign) == ("id:abc", "bulk", "c1")


def test_a_body_without_final_crlf_gets_one():
    assert am.parse(pq(body="Subject: x\r\n\r\nno end"), "postmanq", LIMITS).body.endswith(
        b"no end\r\n")


@pytest.mark.parametrize("payload, code, fmt", [
    (b"{not json", 501, "postmanq"),
    (b"[1, 2]", 501, "postmanq"),
    (pq(body=None), 501, "postmanq"),
    (pq(recipient=None), 501, "postmanq"),
    (pq(envelope=None), 501, "postmanq"),
    (pq(recipient=["a@d1.example"]), 501, "postmanq"),
    (pq(recipient="not an address"), 553, "postmanq"),
    (pq(recipient="@a,@b:user@d1.example"), 550, "postmanq"),
    (pq(recipient="user@"), 553, "postmanq"),
    (pq(envelope="bad@@x"), 501, "postmanq"),
    (pq(body="Subject: x\n\nbare LF\n"), 550, "postmanq"),
    (pq(body="Subject: x\r\n\r\nNUL \x00 here\r\n"), 550, "postmanq"),
    (pq(body="Subject: x\r\n\r\n" + "y" * 20_000), 552, "postmanq"),
    (pq(body="Subject: x\r\n\r\n" + "y" * 1200 + "\r\n"), 500, "postmanq"),
    (pq(body="Received: x\r\n" * 6 + "\r\nloop\r\n"), 554, "postmanq"),
    (orjson.dumps({"sender": "a@x.example", "recipients": []}), 501, "relay"),
    (orjson.dumps({"sender": "a@x.example", "recipients": ["a@d.example"] * 4, "body": "x"}),
     452, "relay"),
    (orjson.dumps({"sender": "a@x.example", "recipients": ["a@d.example"], "body_base64": "%%"}),
     501, "relay"),
])
def test_bad_input_is_refused_with_a_postmanq_error(payload, code, fmt):
    with pytest.raises(am.BadMessage) as caught:
        am.parse(payload, fmt, LIMITS)
    error = caught.value.error
    assert error["code"] == code and error["message"].startswith(str(code))
    failure = orjson.loads(am.technical_failure(payload, error))
    assert failure["error"] == error
    if payload.startswith(b"{") and payload.endswith(b"}"):
        original = orjson.loads(payload)
        assert {k: failure[k] for k in original} == original  # every original field kept
    else:
        assert failure["raw"] == payload.decode()


def test_bare_lf_is_normalised_when_the_policy_says_so():
    limits = am.Limits(10_000, 3, normalize=True, max_received_headers=5)
    message = am.parse(pq(body="Subject: x\n\nbare LF\n"), "postmanq", limits)
    assert message.body == b"Subject: x\r\n\r\nbare LF\r\n"


def test_non_ascii_address_needs_smtputf8():
    message = am.parse(pq(recipient="jos\u00e9@d1.example"), "postmanq", LIMITS)
    assert message.smtputf8


# -- the whole-body check agrees with the line walk ------------------------------

_PIECES = [b"a", b"Subject: x", b"Received: from x", b"RECEIVED: y", b".", b"..", b"\r\n",
           b"\r\n\r\n", b"\r", b"\n", b"\0", b"x" * 997, b"y" * 999, "ü".encode(), b" "]


def walked(raw: bytes, limits: am.Limits):
    """check_body with the whole-body check switched off: the DATA reader alone."""
    original = am._plainly_good
    am._plainly_good = lambda raw, max_received: False
    try:
        return am.check_body(raw, limits)
    except am.BadMessage as bad:
        return bad.error
    finally:
        am._plainly_good = original


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=30), st.booleans(), st.integers(0, 3))
def test_check_body_is_what_the_data_reader_says(pieces, normalize, max_received):
    raw = b"".join(pieces)
    limits = am.Limits(max_message_size=4000, max_recipients=10, normalize=normalize,
                       max_received_headers=max_received)
    try:
        found = am.check_body(raw, limits)
    except am.BadMessage as bad:
        found = bad.error
    assert found == walked(raw, limits)


def test_a_plain_body_is_kept_without_the_line_walk(monkeypatch):
    raw = b"Received: a\r\nSubject: x\r\n\r\n.dot\r\nbody\r\n"
    limits = am.Limits(max_message_size=4000, max_recipients=10, normalize=False,
                       max_received_headers=1)
    monkeypatch.setattr(am, "DataReader", None)  # the walk would fail
    assert am.check_body(raw, limits) == raw
