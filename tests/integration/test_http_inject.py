"""POST /api/inject/v1 through the real relay processes, delivering to the
fake internet; every error path answers its status with nothing queued."""

from __future__ import annotations

import base64
import email
import email.policy
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from relay.dkim.keys import generate
from relay.intake.http.tokens import hash_token
from support import ROOT, RawClient, deliver_relay, dkimpy_verify, free_port, read_spool

ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def make_token(name, scopes):
    """A token as the operator makes one: ``relayctl token create --json``."""
    done = subprocess.run(
        [sys.executable, "-m", "relay.cli", "token", "create", "--name", name, "--scopes", scopes,
         "--json"], capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert made["token_hash"] == hash_token(made["token"]) and made["scopes"] == scopes.split(",")
    return made


@pytest.fixture
def tokens():
    return {"app": make_token("app", "inject"), "reader": make_token("reader", "read")}


def http_section(port, tokens, **extra):
    return {"address": f"127.0.0.1:{port}",
            "tokens": [{"name": t["name"], "token_hash": t["token_hash"], "scopes": t["scopes"]}
                       for t in tokens.values()], **extra}


def post(port, body, token=None, path="/api/inject/v1"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_raw_content_reaches_each_mx_with_its_recipients(relay_factory, net, tokens):
    [one] = net.add_domain("d1.example", ["127.0.0.10"])
    [two] = net.add_domain("d2.example", ["127.0.0.11"])
    port = free_port()
    deliver_relay(relay_factory, net, workers=2, http=http_section(port, tokens))
    content = "From: app@sender.example\nSubject: raw\nMessage-ID: <r@sender.example>\n\nHello\n.\n"
    status, answer = post(port, {"envelope_sender": "app@sender.example", "content": content,
                                 "recipients": [{"email": "a@d1.example"}, {"email": "b@d2.example"},
                                                {"email": "c@d1.example"}]},
                          tokens["app"]["token"])
    assert status == 200
    assert answer == {"success_count": 3, "fail_count": 0, "failed_recipients": [], "errors": []}
    [at_one] = one.wait_received(1)
    [at_two] = two.wait_received(1)
    assert sorted(at_one.rcpt_tos) == ["a@d1.example", "c@d1.example"]
    assert list(at_two.rcpt_tos) == ["b@d2.example"]
    assert at_one.mail_from == "app@sender.example"
    assert at_one.data.endswith(b"Subject: raw\r\nMessage-ID: <r@sender.example>\r\n\r\nHello\r\n.\r\n")
    assert b" with HTTP id " in at_one.data.split(b"\r\n\r\n")[0]


def test_structured_content_is_valid_mime_per_recipient_and_signed(relay_factory, net, tokens,
                                                                   tmp_path):
    sinks = {"d1.example": net.add_domain("d1.example", ["127.0.0.10"])[0],
             "d2.example": net.add_domain("d2.example", ["127.0.0.11"])[0]}
    pem, txt = generate("rsa-sha256", 1024)
    key_file = tmp_path / "s1.pem"
    key_file.write_bytes(pem)
    port = free_port()
    deliver_relay(
        relay_factory, net, workers=2, http=http_section(port, tokens),
        dkim=[{"domain": "sender.example", "selector": "s1", "key_file": str(key_file)}])
    pdf = bytes(range(256)) * 4
    status, answer = post(port, {
        "envelope_sender": "app@sender.example",
        "content": {
            "subject": "Hello {{ name }}",
            "text_body": "Dear {{ name }}, your code is {{ code }}.",
            "html_body": "<p>Dear <b>{{ name }}</b>, code {{ code }}</p>",
            "from": {"email": "app@sender.example", "name": "App"},
            "headers": {"X-Campaign": "spring"},
            "attachments": [{"data": base64.b64encode(pdf).decode(), "base64": True,
                             "content_type": "application/pdf", "file_name": "invoice.pdf"}],
        },
        "substitutions": {"code": "0000"},
        "recipients": [
            {"email": "ann@d1.example", "name": "Ann", "substitutions": {"name": "Ann", "code": "1111"}},
            {"email": "bob@d2.example", "name": "Bob", "substitutions": {"name": "Bob"}},
        ],
    }, tokens["app"]["token"])
    assert status == 200 and answer["success_count"] == 2 and answer["fail_count"] == 0
    expected = {"ann@d1.example": ("Ann", "1111"), "bob@d2.example": ("Bob", "0000")}
    for domain, sink in sinks.items():
        [received] = sink.wait_received(1)
        [rcpt] = received.rcpt_tos
        name, code = expected[rcpt]
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        assert message.defects == [] and message.get_content_type() == "multipart/mixed"
        assert message["To"] == f"{name} <{rcpt}>" and message["Subject"] == f"Hello {name}"
        assert message["From"] == "App <app@sender.example>" and message["X-Campaign"] == "spring"
        assert message.get_body(("plain",)).get_content().strip() == f"Dear {name}, your code is {code}."
        assert f"<b>{name}</b>, code {code}" in message.get_body(("html",)).get_content()
        [attachment] = list(message.iter_attachments())
        assert attachment.get_filename() == "invoice.pdf" and attachment.get_content() == pdf
        signed = received.data[received.data.index(b"DKIM-Signature:"):]
        assert dkimpy_verify(signed, lambda name, timeout=5: txt.encode())


@pytest.fixture
def quiet_relay(relay_factory, tokens):
    """A relay with HTTP whose mail stays in the spool (DNS never answers)."""
    port = free_port()
    relay = relay_factory(workers=2, http=http_section(port, tokens, max_body_size=4096),
                          intake={"max_auth_failures": 3}).start()
    relay.http_port = port
    return relay


GOOD = {"envelope_sender": "app@sender.example", "content": "Subject: x\n\nbody\n",
        "recipients": [{"email": "a@d1.example"}]}


@pytest.mark.parametrize("body, token, status, says", [
    (b"{not json", "app", 400, "malformed JSON"),
    ({**GOOD, "recipients": [{"email": "a@d1.example"}, {"email": "not-an-address"}]}, "app", 422,
     "recipients[1].email"),
    ({**GOOD, "envelope_sender": 7}, "app", 422, "envelope_sender"),
    ({**GOOD, "content": "Subject: {{ x\n\n", "substitutions": {"x": 1}}, "app", 422, "content"),
    ({**GOOD, "content": "Subject: x\n\n" + "y" * 5000}, "app", 413, "max_body_size"),
    (GOOD, None, 401, "bearer token"),
    (GOOD, "rly_wrong", 401, "bearer token"),
    (GOOD, "reader", 403, "inject scope"),
], ids=["bad-json", "bad-recipient", "bad-sender", "bad-template", "too-big", "no-token",
        "bad-token", "wrong-scope"])
def test_each_error_answers_its_status_and_queues_nothing(quiet_relay, tokens, body, token,
                                                          status, says):
    secret = tokens[token]["token"] if token in tokens else token
    got, answer = post(quiet_relay.http_port, body, secret)
    assert got == status, answer
    assert says in answer["error"]
    # The same relay still takes a good request: the refusal was about that one.
    assert post(quiet_relay.http_port, GOOD, tokens["app"]["token"])[0] == 200
    quiet_relay.stop()
    [message] = read_spool(quiet_relay.spool_dir)
    assert [a for a, _ in message.recipients] == ["a@d1.example"]


def test_failed_tokens_lock_the_client_out(quiet_relay, tokens):
    for _ in range(3):
        assert post(quiet_relay.http_port, GOOD, "rly_wrong")[0] == 401
    status, answer = post(quiet_relay.http_port, GOOD, tokens["app"]["token"])
    assert status == 429 and "failed authentications" in answer["error"]
    quiet_relay.stop()
    assert read_spool(quiet_relay.spool_dir) == []


def test_503_when_the_spool_is_low_on_space(relay_factory, tokens):
    port = free_port()
    relay = relay_factory(workers=1, http=http_section(port, tokens),
                          intake={"min_free_space": "1000000G"}).start()
    status, answer = post(port, GOOD, tokens["app"]["token"])
    assert status == 503 and "storage" in answer["error"]
    relay.stop()
    assert read_spool(relay.spool_dir) == []


def test_503_while_draining(relay_factory, tokens):
    port = free_port()
    relay = relay_factory(workers=1, http=http_section(port, tokens)).start()
    client = RawClient(relay.port)  # a transaction in flight holds the drain open
    assert client.reply()[0] == 220
    client.ehlo()
    assert client.command("MAIL FROM:<app@sender.example>")[0] == 250
    relay.signal(signal.SIGTERM)
    relay.wait_log("draining")
    status, answer = post(port, GOOD, tokens["app"]["token"])
    assert status == 503 and "shutting down" in answer["error"]
    client.command("QUIT")
    client.close()
    assert relay.proc.wait(30) == 0
    assert read_spool(relay.spool_dir) == []


def test_unknown_path_is_404_and_http_is_off_without_its_table(relay_factory, tokens):
    port = free_port()
    relay = relay_factory(workers=1, http=http_section(port, tokens)).start()
    assert post(port, GOOD, tokens["app"]["token"], path="/api/nothing")[0] == 404
    relay.stop()
    relay.overrides.pop("http")
    relay.write_config()
    relay.start()
    with pytest.raises(ConnectionRefusedError):
        post(port, GOOD, tokens["app"]["token"])


def test_https_with_cert_file(relay_factory, tokens, certificate):
    cert_file, key_file = certificate
    port = free_port()
    relay_factory(workers=1, http=http_section(port, tokens, cert_file=cert_file,
                                               key_file=key_file)).start()
    context = ssl.create_default_context(cafile=cert_file)
    context.check_hostname = False
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        conn.request("POST", "/api/inject/v1", body=json.dumps(GOOD).encode(),
                     headers={"Authorization": f"Bearer {tokens['app']['token']}"})
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["success_count"] == 1
    finally:
        conn.close()
    with pytest.raises((http.client.HTTPException, ConnectionResetError)):
        post(port, GOOD, tokens["app"]["token"])  # plain HTTP on the HTTPS port


def test_check_names_an_http_address_that_is_taken(relay_factory, tokens, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        relay = relay_factory(workers=1, http=http_section(port, tokens))
        done = subprocess.run([sys.executable, "-m", "relay.supervisor", "--check", "-c",
                               relay.config_path], capture_output=True, text=True, timeout=60,
                              cwd=str(tmp_path), env=ENV)
    assert done.returncode == 2
    assert f"[http] address: cannot listen on 127.0.0.1:{port}" in done.stderr


def test_sighup_takes_new_tokens_and_keeps_the_address(relay_factory, tokens):
    port = free_port()
    relay = relay_factory(workers=2, http=http_section(port, {"app": tokens["app"]})).start()
    assert post(port, GOOD, tokens["app"]["token"])[0] == 200
    other = make_token("other", "inject")
    relay.overrides["http"] = http_section(free_port(), {"other": other})
    relay.write_config()
    relay.signal(signal.SIGHUP)
    relay.wait_log(" reloaded ", count=2)  # both workers
    assert "[http] address" in relay.log()  # named as needing a restart
    assert post(port, GOOD, other["token"])[0] == 200  # the running address, the new token
    assert post(port, GOOD, tokens["app"]["token"])[0] == 401
