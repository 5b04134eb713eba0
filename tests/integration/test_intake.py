"""Intake through the real relay processes: replies to good and bad input,
smuggling, STARTTLS, AUTH, limits, drain and reload."""

from __future__ import annotations

import base64
import signal
import smtplib
import socket
import ssl
import time

import pytest

from support import RawClient, read_spool


def open_session(relay, source=None) -> RawClient:
    client = RawClient(relay.port, source=source)
    assert client.reply()[0] == 220
    client.ehlo()
    return client


def test_accepts_mail_and_reports_queue_id(relay_factory):
    relay = relay_factory(workers=2).start()
    with smtplib.SMTP("127.0.0.1", relay.port) as smtp:
        code, text = smtp.ehlo()
        assert code == 250
        for capability in (b"PIPELINING", b"8BITMIME", b"SMTPUTF8", b"SIZE 26214400", b"ENHANCEDSTATUSCODES"):
            assert capability in text
        assert b"STARTTLS" not in text and b"AUTH" not in text  # no [tls] configured
        smtp.mail("app@sender.example")
        smtp.rcpt("one@alpha.example")
        smtp.rcpt("two@beta.example")
        code, text = smtp.data(b"Subject: hello\r\n\r\nHello world.\r\n")
    assert code == 250 and text.startswith(b"2.0.0 OK queued as ")
    queue_id = text.split()[-1].decode()
    relay.wait_log(f"{queue_id}: accepted")
    assert relay.stop() == 0
    parts = [m for m in read_spool(relay.spool_dir) if m.queue_id == queue_id]
    assert {a for m in parts for a, _ in m.recipients} == {"one@alpha.example", "two@beta.example"}
    for message in parts:
        assert message.state == 1
        assert message.body.startswith(b"Received: from ")
        assert message.body.endswith(b"Subject: hello\r\n\r\nHello world.\r\n")
        assert all(slot % 2 == message.worker for _, slot in message.recipients)


UNTRUSTED = "127.0.0.2"


@pytest.mark.parametrize(
    "recipient",
    [
        "<victim@elsewhere.example>",
        "<victim%elsewhere.example@relay.test>",
        "<elsewhere.example!victim@relay.test>",
        '<"victim@elsewhere.example"@relay.test>',
        '<"victim%elsewhere.example"@relay.test>',
        "<@relay.test,@hop.example:victim@elsewhere.example>",
    ],
)
def test_untrusted_client_may_not_relay(relay_factory, recipient):
    relay = relay_factory(workers=1, intake={"mynetworks": ["127.0.0.1/32"], "min_free_space": 0}).start()
    client = open_session(relay, source=UNTRUSTED)
    assert client.command("MAIL FROM:<spammer@bad.example>")[0] == 250
    code, text = client.command(f"RCPT TO:{recipient}")
    assert (code, text[:5]) == (550, "5.7.1")
    client.close()
    assert relay.stop() == 0
    assert read_spool(relay.spool_dir) == []


def test_trusted_client_source_route_refused(relay_factory):
    relay = relay_factory(workers=1).start()
    client = open_session(relay)
    client.command("MAIL FROM:<app@sender.example>")
    assert client.command("RCPT TO:<@hop.example:victim@elsewhere.example>")[:1] == (550,)


@pytest.mark.parametrize(
    "command, expected",
    [
        (b"MAIL FROM:<a\x01b@sender.example>", (553, "5.1.3")),
        (b"RCPT TO:<a\x00b@alpha.example>", (553, "5.1.3")),
        (b"RCPT TO:<" + b"x" * 65 + b"@alpha.example>", (553, "5.1.3")),
        (b"RCPT TO:<x@" + b".".join([b"a" * 62] * 4) + b".example>", (553, "5.1.3")),
        (b"RCPT TO:<bad@-domain.example>", (553, "5.1.3")),
        (b"MAIL FROM:<big@sender.example> SIZE=999999999", (552, "5.3.4")),
        (b"RCPT TO:<" + b"y" * 600 + b"@alpha.example>", (500, "5.5.2")),
    ],
)
def test_bad_commands_get_the_stated_reply(relay_factory, command, expected):
    relay = relay_factory(workers=1).start()
    client = open_session(relay)
    if command.startswith(b"RCPT"):
        assert client.command("MAIL FROM:<app@sender.example>")[0] == 250
    code, text = client.command(command)
    assert (code, text[:5]) == expected
    # The session goes on: a good transaction still works.
    client.command("RSET")
    client.command("MAIL FROM:<app@sender.example>")
    assert client.command("RCPT TO:<ok@alpha.example>")[0] == 250
    client.command("QUIT")
    assert relay.stop() == 0
    assert read_spool(relay.spool_dir) == []


def send_data(client: RawClient, payload: bytes) -> tuple[int, str]:
    assert client.command("MAIL FROM:<app@sender.example>")[0] == 250
    assert client.command("RCPT TO:<rcpt@alpha.example>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(payload)
    return client.reply()


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n", (550, "5.5.2")),
        (b"Subject: x\r\n\r\nbare\rCR\r\n.\r\n", (550, "5.5.2")),
        (b"Subject: x\r\n\r\nnul\0byte\r\n.\r\n", (550, "5.6.0")),
        (b"Subject: x\r\n\r\n" + b"z" * 1000 + b"\r\n.\r\n", (500, "5.5.2")),
        (b"Subject: x\r\n\r\n" + b"z" * 5000 + b"\r\n.\r\n", (500, "5.5.2")),
        (b"Received: from a\r\n" * 51 + b"Subject: loop\r\n\r\nx\r\n.\r\n", (554, "5.4.6")),
        ((b"y" * 998 + b"\r\n") * 120 + b".\r\n", (552, "5.3.4")),
    ],
)
def test_bad_data_gets_the_stated_reply(relay_factory, payload, expected):
    relay = relay_factory(workers=1, intake={"max_message_size": 100_000, "min_free_space": 0}).start()
    client = open_session(relay)
    code, text = send_data(client, payload)
    assert (code, text[:5]) == expected
    # The session is still in step: the next transaction works.
    code, text = send_data(client, b"Subject: fine\r\n\r\nok\r\n.\r\n")
    assert code == 250
    client.command("QUIT")
    assert relay.stop() == 0
    assert len(read_spool(relay.spool_dir)) == 1


def test_too_many_recipients(relay_factory):
    relay = relay_factory(workers=1, intake={"max_recipients": 3, "min_free_space": 0}).start()
    client = open_session(relay)
    client.command("MAIL FROM:<app@sender.example>")
    for i in range(3):
        assert client.command(f"RCPT TO:<r{i}@alpha.example>")[0] == 250
    assert client.command("RCPT TO:<r4@alpha.example>")[:2] == (452, "4.5.3 Too many recipients")


def test_low_disk_space_refuses_mail(relay_factory):
    relay = relay_factory(workers=1, intake={"min_free_space": "1000000G"}).start()
    client = open_session(relay)
    code, text = client.command("MAIL FROM:<app@sender.example>")
    assert (code, text[:5]) == (452, "4.3.1")


SMUGGLING = [
    b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n",
    b"\r.\r\n", b"\r\n.\r", b"\r\n\0.\r\n", b"\r\n.\0\r\n",
]
SMUGGLED = (
    b"MAIL FROM:<evil@smuggler.example>\r\nRCPT TO:<victim@target.example>\r\n"
    b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
)


@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_smuggling_sequences_never_end_the_data(relay_factory, mode):
    relay = relay_factory(workers=1, intake={"bare_line_endings": mode, "min_free_space": 0}).start()
    accepted = 0
    for sequence in SMUGGLING:
        client = open_session(relay)
        client.command("MAIL FROM:<app@sender.example>")
        client.command("RCPT TO:<rcpt@alpha.example>")
        assert client.command("DATA")[0] == 354
        client.send(b"Subject: real\r\n\r\nreal message" + sequence + SMUGGLED + b"\r\n.\r\nQUIT\r\n")
        replies = [line for line in client.read_all().split(b"\r\n") if line]
        client.close()
        # Exactly one reply to the DATA, then QUIT's: the smuggled commands
        # were data, never commands.
        assert len(replies) == 2, (sequence, replies)
        assert replies[1].startswith(b"221")
        if mode == "reject" or b"\0" in sequence:
            assert replies[0][:3] == b"550", (sequence, replies)
        else:
            assert replies[0].startswith(b"250 2.0.0 OK queued as"), (sequence, replies)
            accepted += 1
    assert relay.stop() == 0
    spool = read_spool(relay.spool_dir)
    assert len(spool) == accepted
    for message in spool:
        assert message.sender == "app@sender.example"
        assert [a for a, _ in message.recipients] == ["rcpt@alpha.example"]
        body = message.body.replace(b"\r\n", b"")
        assert b"\r" not in body and b"\n" not in body and b"\0" not in body


def test_commands_pipelined_behind_starttls_are_discarded(relay_factory, certificate):
    cert, key = certificate
    relay = relay_factory(workers=1, tls={"cert_file": cert, "key_file": key}).start()
    client = open_session(relay)
    client.send(b"STARTTLS\r\nMAIL FROM:<evil@smuggler.example>\r\nRCPT TO:<victim@target.example>\r\n")
    assert client.reply()[0] == 220
    try:
        client.starttls()
        lines = client.ehlo()
    except (ssl.SSLError, ConnectionError, OSError):
        pass  # refusing the handshake also keeps the injected commands out
    else:
        assert any("AUTH" not in line for line in lines)
        # Had the plaintext MAIL run, this RCPT would be accepted.
        assert client.command("RCPT TO:<victim@target.example>")[0] == 503
    client.close()
    assert relay.stop() == 0
    assert read_spool(relay.spool_dir) == []


def test_auth_offered_only_after_tls_and_locks_out(relay_factory, certificate, tmp_path):
    from relay.intake.auth import hash_password

    cert, key = certificate
    relay = relay_factory(
        workers=1,
        tls={"cert_file": cert, "key_file": key},
        intake={
            "mynetworks": ["127.0.0.1/32"],
            "max_auth_failures": 2,
            "min_free_space": 0,
            "users": [{"name": "app", "password_hash": hash_password("s3cret")}],
        },
    ).start()
    smtp = smtplib.SMTP("127.0.0.1", relay.port, source_address=(UNTRUSTED, 0))
    smtp.ehlo()
    assert not smtp.has_extn("auth") and smtp.has_extn("starttls")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    smtp.starttls(context=context)
    smtp.ehlo()
    assert smtp.has_extn("auth") and "PLAIN" in smtp.esmtp_features["auth"]
    smtp.login("app", "s3cret")
    smtp.mail("app@sender.example")
    assert smtp.rcpt("anyone@elsewhere.example")[0] == 250  # authenticated: may relay
    smtp.quit()

    # AUTH LOGIN, through its two challenges (the check is awaited, off the loop).
    smtp = smtplib.SMTP("127.0.0.1", relay.port, source_address=(UNTRUSTED, 0))
    smtp.starttls(context=context)
    smtp.ehlo()
    assert smtp.docmd("AUTH", "LOGIN")[0] == 334
    assert smtp.docmd(base64.b64encode(b"app").decode())[0] == 334
    assert smtp.docmd(base64.b64encode(b"s3cret").decode())[0] == 235
    smtp.quit()

    smtp = smtplib.SMTP("127.0.0.1", relay.port, source_address=(UNTRUSTED, 0))
    smtp.starttls(context=context)
    smtp.ehlo()
    wrong = base64.b64encode(b"\0app\0wrong").decode()
    assert smtp.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
    assert smtp.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
    # The second failure locked the address out and closed the session.
    assert smtp.docmd("NOOP")[0] == 421
    smtp.close()
    client = RawClient(relay.port, source=UNTRUSTED)
    assert client.reply()[:2] == (421, "4.7.0 Too many failed authentications, try again later")
    log = relay.log()
    assert log.count(f"AUTH PLAIN failed for user 'app' from [{UNTRUSTED}]") == 2
    assert f"AUTH: [{UNTRUSTED}] locked out for 600s after 2 failures" in log


def test_connections_per_ip_are_limited(relay_factory):
    relay = relay_factory(workers=1, intake={"max_connections_per_ip": 3, "min_free_space": 0}).start()
    held = [open_session(relay) for _ in range(3)]
    extra = RawClient(relay.port)
    assert extra.reply()[:2] == (421, "4.7.0 Too many connections from your address")
    held[0].command("QUIT")
    held[0].close()
    time.sleep(0.2)
    assert RawClient(relay.port).reply()[0] == 220


def test_idle_and_slow_clients_are_dropped(relay_factory):
    relay = relay_factory(
        workers=1,
        intake={"idle_timeout": "2s", "min_data_rate": 1000, "data_rate_grace": "1s", "min_free_space": 0},
    ).start()
    idle = open_session(relay)
    busy = open_session(relay)
    time.sleep(1.5)
    assert busy.command("NOOP")[0] == 250  # its idle limit starts again
    time.sleep(1.0)
    assert idle.read_all(timeout=3).startswith(b"421 4.4.2")
    assert busy.command("NOOP")[0] == 250  # 2.5 s after it opened, 1 s after its last command
    started = time.monotonic()
    assert busy.read_all(timeout=4).startswith(b"421 4.4.2")
    assert 1.0 <= time.monotonic() - started < 3.5
    slow = open_session(relay)
    slow.command("MAIL FROM:<app@sender.example>")
    slow.command("RCPT TO:<rcpt@alpha.example>")
    assert slow.command("DATA")[0] == 354
    started = time.monotonic()
    closed = b""
    while time.monotonic() - started < 8:
        try:
            slow.send(b"x")
        except OSError:
            break
        slow.sock.settimeout(0.3)
        try:
            closed = slow.sock.recv(200)
            if closed:
                break
        except socket.timeout:
            pass
    assert closed.startswith(b"421 4.4.2 Data rate too slow")


def test_sigterm_drains_sessions_in_flight(relay_factory):
    relay = relay_factory(workers=2).start()
    client = open_session(relay)
    client.command("MAIL FROM:<app@sender.example>")
    client.command("RCPT TO:<rcpt@alpha.example>")
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    relay.signal(signal.SIGTERM)
    relay.wait_log("draining", count=2)
    late = RawClient(relay.port)
    assert late.reply()[:2] == (421, "4.3.2 Service shutting down, try again later")
    client.send(b"second half\r\n.\r\n")
    code, text = client.reply()
    assert code == 250 and "queued as" in text
    assert client.reply()[0] == 421  # and then the session is closed
    assert relay.proc.wait(15) == 0
    [message] = read_spool(relay.spool_dir)
    assert message.body.endswith(b"first half\r\nsecond half\r\n")


def test_sighup_reloads_and_names_restart_only_keys(relay_factory):
    relay = relay_factory(workers=1, intake={"max_recipients": 5, "min_free_space": 0}).start()
    relay.overrides = {"intake": {"max_recipients": 1, "min_free_space": 0}}
    relay.write_config()
    relay.signal(signal.SIGHUP)
    relay.wait_log("reloaded")
    client = open_session(relay)
    client.command("MAIL FROM:<app@sender.example>")
    assert client.command("RCPT TO:<a@alpha.example>")[0] == 250
    assert client.command("RCPT TO:<b@alpha.example>")[0] == 452
    relay.workers_in_file = 3
    relay.overrides = {"relay": {"workers": 3}, "intake": {"max_recipients": 1, "min_free_space": 0}}
    relay.write_config()
    relay.signal(signal.SIGHUP)
    relay.wait_log("only after a restart: [relay] workers")


def test_bad_configuration_exits_2_naming_the_key(relay_factory):
    relay = relay_factory(workers=1, intake={"max_recipients": "many"})
    relay.start(wait=False)
    assert relay.proc.wait(20) == 2
    assert "[intake] max_recipients: expected an integer >= 1, got 'many'" in relay.log()


def test_data_memory_budget_answers_451_instead_of_growing(relay_factory):
    relay = relay_factory(workers=1, intake={"max_data_memory": "4k", "min_free_space": 0}).start()
    first, second = open_session(relay), open_session(relay)
    for client in (first, second):
        assert client.command("MAIL FROM:<a@example.com>")[0] == 250
        assert client.command("RCPT TO:<b@example.net>")[0] == 250
    assert first.command("DATA")[0] == 354
    first.send(b"Subject: big\r\n\r\n" + (b"y" * 500 + b"\r\n") * 10)
    time.sleep(0.3)  # the worker has read the first session's bytes: over 4 KiB held
    assert second.command("DATA") == (451, "4.3.1 Insufficient system resources, try again later")
    first.send(b".\r\n")
    assert first.reply()[0] == 250
    # The budget is given back once the message is stored: DATA goes on.
    assert second.command("DATA")[0] == 354
    second.send(b"Subject: small\r\n\r\nhi\r\n.\r\n")
    assert second.reply()[0] == 250
    assert len(read_spool(relay.spool_dir)) == 2


def test_connections_per_ip_hold_for_the_whole_relay(relay_factory):
    relay = relay_factory(workers=2, intake={"max_connections_per_ip": 3, "min_free_space": 0}).start()
    # SO_REUSEPORT spreads these over both workers; the limit is still 3.
    clients, banners = [], []
    for _ in range(8):
        client = RawClient(relay.port)
        banners.append(client.reply()[0])
        clients.append(client)
    assert banners.count(220) == 3 and banners.count(421) == 5
    for client in clients:
        client.close()


def test_auth_lockout_holds_for_the_whole_relay(relay_factory, certificate):
    from relay.intake.auth import hash_password

    cert, key = certificate
    relay = relay_factory(
        workers=2,
        tls={"cert_file": cert, "key_file": key},
        intake={"mynetworks": ["127.0.0.1/32"], "max_auth_failures": 3, "min_free_space": 0,
                "users": [{"name": "app", "password_hash": hash_password("s3cret")}]},
    ).start()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    wrong = base64.b64encode(b"\0app\0wrong").decode()
    for _ in range(3):  # one failure per connection, whichever worker takes it
        smtp = smtplib.SMTP("127.0.0.1", relay.port, source_address=(UNTRUSTED, 0))
        smtp.starttls(context=context)
        smtp.ehlo()
        assert smtp.docmd("AUTH", f"PLAIN {wrong}")[0] == 535
        smtp.close()
    for _ in range(4):  # locked out in every worker
        client = RawClient(relay.port, source=UNTRUSTED)
        assert client.reply()[0] == 421
        client.close()
