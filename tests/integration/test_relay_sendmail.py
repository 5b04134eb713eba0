"""relay-sendmail and mailq through the real relay (and the fake internet for
delivery); scripts/install-sendmail on a scratch root."""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
import sys

import pytest

from support import ROOT, deliver_relay, read_spool, wait_for

SCRIPT = os.path.join(os.path.dirname(sys.executable), "relay-sendmail")
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def sendmail(relay, *argv, stdin: bytes = b"", config: str | None = None, program=None, env=None):
    command = program or [sys.executable, "-m", "relay.cli.sendmail"]
    if config is not False:
        command = [*command, "-C", config or relay.config_path]
    return subprocess.run([*command, *argv], input=stdin, capture_output=True, timeout=60,
                          cwd=relay.directory, env=env or ENV)


MESSAGE = (b"From: App <app@sender.example>\n"
           b"To: To <to@d1.example>\nCc: cc@d2.example\nBcc: Hidden <bcc@d1.example>\n"
           b"Subject: from cron\n\nHello.\n")


def test_t_delivers_to_to_cc_and_bcc_and_no_bcc_header_reaches_the_sink(relay_factory, net):
    [one] = net.add_domain("d1.example", ["127.0.0.10"])
    [two] = net.add_domain("d2.example", ["127.0.0.11"])
    relay = deliver_relay(relay_factory, net, workers=2)
    done = sendmail(relay, "-t", "-f", "app@sender.example", stdin=MESSAGE)
    assert done.returncode == 0, done.stderr
    [at_one] = one.wait_received(1)
    [at_two] = two.wait_received(1)
    assert sorted(at_one.rcpt_tos) == ["bcc@d1.example", "to@d1.example"]
    assert list(at_two.rcpt_tos) == ["cc@d2.example"]
    assert at_one.mail_from == "app@sender.example"
    for received in (at_one, at_two):
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        assert message["Bcc"] is None and b"bcc@d1.example" not in received.data
        assert message["To"] == "To <to@d1.example>" and message["Subject"] == "from cron"
        # Added as Postfix's cleanup does: the message had neither.
        assert message["Date"] is not None and message["Message-ID"].endswith("@relay.test>")
        assert message.get_content().strip() == "Hello."


def test_i_keeps_a_lone_dot_line_and_without_it_the_dot_ends_the_message(relay_factory, net):
    [sink] = net.add_domain("d1.example", ["127.0.0.10"])
    relay = deliver_relay(relay_factory, net)
    body = b"Subject: dots\n\nbefore\n.\nafter\n"
    kept = sendmail(relay, "-i", "-f", "app@sender.example", "a@d1.example", stdin=body)
    assert kept.returncode == 0, kept.stderr
    [first] = sink.wait_received(1)
    assert first.data.endswith(b"\r\n\r\nbefore\r\n.\r\nafter\r\n")
    cut = sendmail(relay, "-f", "app@sender.example", "a@d1.example", stdin=body)
    assert cut.returncode == 0, cut.stderr
    second = sink.wait_received(2)[1]
    assert second.data.endswith(b"\r\n\r\nbefore\r\n") and b"after" not in second.data


def test_exit_75_when_the_relay_is_stopped(relay_factory):
    relay = relay_factory(workers=1)  # configured, never started: nothing listens
    done = sendmail(relay, "a@d1.example", stdin=b"Subject: x\n\nbody\n")
    assert done.returncode == 75, done.stderr
    assert b"cannot submit to the relay" in done.stderr


def test_exit_64_without_recipients(relay_factory):
    relay = relay_factory(workers=1).start()
    done = sendmail(relay, "-t", stdin=b"Subject: nobody\n\nbody\n")
    assert done.returncode == 64
    assert b"Recipient addresses must be specified" in done.stderr
    relay.stop()
    assert read_spool(relay.spool_dir) == []


def test_config_from_the_environment_and_exit_77_for_a_refused_relay(relay_factory):
    # mynetworks without loopback: the relay refuses to relay for us (550 5.7.1).
    relay = relay_factory(workers=1, intake={"mynetworks": ["192.0.2.0/24"]}).start()
    done = sendmail(relay, "a@d1.example", stdin=b"Subject: x\n\nbody\n", config=False,
                    env={**ENV, "RELAY_CONFIG": relay.config_path})
    assert done.returncode == 77, done.stderr
    assert b"550 5.7.1" in done.stderr


def test_mailq_lists_a_queued_message(relay_factory, tmp_path):
    relay = relay_factory(workers=2).start()  # DNS never answers: the mail stays queued
    done = sendmail(relay, "-f", "app@sender.example", "waiting@d1.example",
                    stdin=b"Subject: x\n\nbody\n")
    assert done.returncode == 0, done.stderr
    [message] = wait_for(lambda: read_spool(relay.spool_dir), what="the spooled message")
    mailq = tmp_path / "mailq"
    mailq.symlink_to(SCRIPT)  # the program under the name mailq, as install-sendmail links it
    listing = sendmail(relay, program=[str(mailq)])
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().splitlines()
    assert lines[0].startswith("-Queue ID-")
    [entry] = [line for line in lines if line.startswith(message.queue_id)]
    assert entry.endswith("  app@sender.example")
    assert any(line.strip() == "waiting@d1.example" for line in lines)
    assert lines[-1] == "-- 1 Kbytes in 1 Request."
    same = sendmail(relay, "-bp")
    assert same.returncode == 0 and same.stdout == listing.stdout


def test_bs_speaks_the_relays_smtp_on_stdin_and_stdout(relay_factory):
    relay = relay_factory(workers=1).start()
    session = (b"EHLO client.test\r\nMAIL FROM:<app@sender.example>\r\nRCPT TO:<a@d1.example>\r\n"
               b"DATA\r\nSubject: bs\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    done = sendmail(relay, "-bs", stdin=session)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.startswith("220 ") and "250 2.0.0 OK queued as" in out and "221 2.0.0" in out
    relay.stop()
    [message] = read_spool(relay.spool_dir)
    assert message.recipients[0][0] == "a@d1.example"


def test_q_flushes_through_the_control_socket(relay_factory):
    relay = relay_factory(workers=1)
    assert sendmail(relay, "-q").returncode == 75  # not running
    relay.start()
    assert sendmail(relay, "-q").returncode == 0


# -- scripts/install-sendmail -----------------------------------------------------

INSTALL = os.path.join(ROOT, "scripts", "install-sendmail")


def install(root, *argv):
    return subprocess.run([INSTALL, "--root", str(root), "--binary", SCRIPT, *argv],
                          capture_output=True, text=True, timeout=30)


def test_install_links_sendmail_and_mailq_and_dry_run_changes_nothing(tmp_path):
    dry = install(tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would link" in dry.stdout and not (tmp_path / "usr").exists()
    done = install(tmp_path)
    assert done.returncode == 0, done.stderr
    for path in ("usr/sbin/sendmail", "usr/bin/mailq"):
        assert os.readlink(tmp_path / path) == SCRIPT
    again = install(tmp_path)
    assert again.returncode == 0 and "already installed" in again.stdout


@pytest.mark.parametrize("other", ["file", "link"])
def test_install_refuses_another_mtas_binary_unless_forced(tmp_path, other):
    target = tmp_path / "usr/sbin/sendmail"
    target.parent.mkdir(parents=True)
    if other == "file":
        target.write_bytes(b"#!/bin/sh\n# another MTA\n")
    else:
        target.symlink_to("/usr/lib/other-mta/sendmail")
    refused = install(tmp_path)
    assert refused.returncode == 1 and "not replaced without --force" in refused.stderr
    assert not (tmp_path / "usr/bin/mailq").exists()  # a refusal changes nothing
    assert target.is_symlink() == (other == "link")
    forced = install(tmp_path, "--force")
    assert forced.returncode == 0, forced.stderr
    assert os.readlink(target) == SCRIPT and os.readlink(tmp_path / "usr/bin/mailq") == SCRIPT
