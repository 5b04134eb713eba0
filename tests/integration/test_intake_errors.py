"""An internal error in the accept step (a bug, not a spool refusal) must
reach the client as 451 4.3.0 with no internal detail, and leave the
session usable: aiosmtpd's own "500 Error: (Type) text" never goes out.
The intake runs in-process here, on a real socket, so the failure can be
injected."""

from __future__ import annotations

import asyncio

from relay import config
from relay.errors import SpoolFull
from relay.intake.handler import IntakeState


async def _exchange(port: int, lines: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await reader.readline()]
    for line in lines:
        writer.write(line + b"\r\n")
        await writer.drain()
        reply = await reader.readline()
        while reply[3:4] == b"-":
            reply = await reader.readline()
        replies.append(reply)
    writer.close()
    return replies


def _run(tmp_path, failure: Exception) -> list[bytes]:
    async def main():
        settings = config.from_dict(
            {"relay": {"spool_dir": str(tmp_path)}, "intake": {"min_free_space": 0}}
        )
        calls = []

        async def accept(transaction):
            calls.append(transaction)
            if len(calls) == 1:
                raise failure

        state = IntakeState(settings, 0, accept)
        server = await asyncio.get_running_loop().create_server(state.factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            transaction = [b"MAIL FROM:<a@s.example>", b"RCPT TO:<b@r.example>", b"DATA",
                           b"Subject: x\r\n\r\nbody\r\n."]
            return await _exchange(port, [b"EHLO c.example", *transaction, *transaction, b"QUIT"])
        finally:
            server.close()

    return asyncio.run(main())


def test_a_bug_in_accept_answers_451_without_detail(tmp_path):
    replies = _run(tmp_path, RuntimeError("secret detail at /var/lib/relay/spool"))
    data_reply = replies[5]
    assert data_reply == b"451 4.3.0 Temporary failure, try again later\r\n"
    assert b"secret" not in b"".join(replies) and b"RuntimeError" not in b"".join(replies)
    # The session is still in step: the next transaction is accepted.
    assert replies[6].startswith(b"250") and replies[9].startswith(b"250 2.0.0 OK queued as")
    assert replies[10].startswith(b"221")


def test_a_full_spool_answers_451_without_detail(tmp_path):
    replies = _run(tmp_path, SpoolFull("disk full at /var/lib/relay/spool/worker-0.db"))
    assert replies[5] == b"451 4.3.0 Temporary failure, try again later\r\n"
    assert b"/var/lib" not in b"".join(replies)
