"""perf.profile: own time, time with a function on the stack, and callers."""

from __future__ import annotations

from perf import profile

STACKS = """\
process 1:"relay";main (relay/worker.py:1);SMTP._handle_client (aiosmtpd/smtp.py:2);StreamWriter.write (asyncio/streams.py:3) 5
process 1:"relay";main (relay/worker.py:1);Dispatcher._send (relay/dispatch.py:4);SmtpSession._write (relay/deliver/session.py:5);StreamWriter.write (asyncio/streams.py:3) 3
process 1:"relay";main (relay/worker.py:1);SMTP._handle_client (aiosmtpd/smtp.py:2) 2
"""


def test_inclusive_shares_and_callers(tmp_path, capsys):
    path = tmp_path / "stacks.txt"
    path.write_text(STACKS)
    assert profile.inclusive(str(path), ["SMTP._handle_client", "Dispatcher._send", "nowhere"]) == {
        "SMTP._handle_client": 7, "Dispatcher._send": 3}
    assert profile.callers(str(path), "StreamWriter.write") == {"SMTP._handle_client": 5,
                                                               "SmtpSession._write": 3}
    assert profile.main([str(path), "--inclusive", "Dispatcher._send", "--callers", "StreamWriter.write"]) == 0
    printed = capsys.readouterr().out
    assert "  30.0  Dispatcher._send" in printed  # 3 of 10 samples
    assert "  50.0  SMTP._handle_client" in printed.split("called by")[1]
