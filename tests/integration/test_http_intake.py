"""relay.intake.http.server in this process, on a loopback socket, with a
fake accept step: the answer waits for every accept (the 250 rule), and a
failed accept is reported per recipient."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from relay import config
from relay.errors import SpoolError
from relay.intake.handler import IntakeState
from relay.intake.http.server import HttpIntake
from relay.intake.http.tokens import hash_token
from support import free_port

TOKEN = "rly_test-token-for-the-in-process-server"


def intake(accept, port, spool_dir):
    settings = config.from_dict({
        "relay": {"hostname": "relay.test", "spool_dir": str(spool_dir)},  # for its free space
        "intake": {"min_free_space": 0},
        "http": {"address": f"127.0.0.1:{port}",
                 "tokens": [{"name": "app", "token_hash": hash_token(TOKEN), "scopes": ["inject"]}]},
    })
    return HttpIntake(settings, IntakeState(settings, 0, accept))


def body(*emails, content="Subject: x\n\n{{ n }}\n"):
    return {"envelope_sender": "app@sender.example", "content": content,
            "recipients": [{"email": e, "substitutions": {"n": i}} for i, e in enumerate(emails)]}


async def post(port, payload):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/api/inject/v1", json=payload,
                                headers={"Authorization": f"Bearer {TOKEN}"},
                                timeout=aiohttp.ClientTimeout(total=30)) as response:
            return response.status, await response.json()


def test_the_answer_waits_for_every_accept(tmp_path):
    async def main():
        release = asyncio.Event()
        accepted = []

        async def accept(txn):
            await release.wait()
            accepted.append(txn)

        port = free_port()
        server = intake(accept, port, tmp_path)
        await server.start()
        try:
            request = asyncio.create_task(post(port, body("a@d1.example", "b@d2.example")))
            for _ in range(20):  # 1 s: time enough for both accepts to start waiting
                await asyncio.sleep(0.05)
            assert not request.done()  # nothing is on disk yet, so no answer
            release.set()
            status, answer = await asyncio.wait_for(request, 10)
        finally:
            await server.close()
        assert status == 200 and answer["success_count"] == 2
        assert sorted(t.recipients for t in accepted) == [("a@d1.example",), ("b@d2.example",)]
        assert all(t.body.startswith(b"Received: from app ([127.0.0.1])") for t in accepted)

    asyncio.run(main())


@pytest.mark.parametrize("failing, status", [({"b@d2.example"}, 200),
                                             ({"a@d1.example", "b@d2.example"}, 503)])
def test_a_failed_accept_is_reported_per_recipient(tmp_path, failing, status):
    async def main():
        async def accept(txn):
            if set(txn.recipients) & failing:
                raise SpoolError("disk full")

        port = free_port()
        server = intake(accept, port, tmp_path)
        await server.start()
        try:
            return await post(port, body("a@d1.example", "b@d2.example"))
        finally:
            await server.close()

    got, answer = asyncio.run(main())
    assert got == status
    assert answer["fail_count"] == len(failing)
    assert answer["success_count"] == 2 - len(failing)
    assert set(answer["failed_recipients"]) == failing
    assert all("temporary failure" in e and "disk" not in e for e in answer["errors"])
