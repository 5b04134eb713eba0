"""The HTTP load generator: KumoMTA-style requests to ``/api/inject/v1``.

Input: the same ``Stream`` descriptions as perf.loadgen (``recipients`` is
the batch: recipients per request), the relay's HTTP address, a bearer
token and a deadline.  Output: an ``Injection`` record per request, in the
same form as the SMTP generator's, so perf.report treats both alike.

Each request carries one message of perf.loadgen's ``Messages`` as
``content`` (a whole RFC 5322 message, sent as written) and its recipients
as ``recipients``: the same bytes and addresses as SMTP would send.  A
request counts as accepted (code 250, as the SMTP generator's records)
when the relay answers 200 with ``fail_count`` 0; otherwise its code is
the HTTP status (or 0 for a connection failure).  ``stream.concurrency``
tasks send one request after another through one aiohttp session whose
connector holds at most that many keep-alive connections.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from dataclasses import dataclass, field

import aiohttp

from perf.loadgen import SENDER, Injection, Messages, Stream

INJECT_PATH = "/api/inject/v1"
REQUEST_TIMEOUT = 120.0


@dataclass
class HttpGenerator:
    host: str
    port: int
    token: str
    seed: int = 1
    run_tag: str = "run"
    injections: list[Injection] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)

    async def run(self, streams: list[Stream], deadline: float) -> list[Injection]:
        """Send every stream's requests until its count is sent or ``deadline`` (monotonic)."""
        url = f"http://{self.host}:{self.port}{INJECT_PATH}"
        limit = sum(s.concurrency for s in streams)
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, headers=headers,
                                         timeout=timeout) as session:
            tasks = []
            for index, stream in enumerate(streams):
                messages = Messages(stream, random.Random(self.seed * 1000 + index), self.run_tag)
                counter = itertools.count()
                tasks += [self._closed_loop(session, url, stream, messages, counter, deadline)
                          for _ in range(stream.concurrency)]
            await asyncio.gather(*tasks)
        return self.injections

    async def _closed_loop(self, session, url: str, stream: Stream, messages: Messages,
                           counter, deadline: float) -> None:
        while time.monotonic() < deadline and next(counter) < stream.messages:
            await self._send(session, url, messages)

    async def _send(self, session, url: str, messages: Messages) -> Injection:
        n = len(self.injections)
        rcpts, message = messages.message(n)
        request = {
            "envelope_sender": SENDER,
            "content": message.decode("ascii"),
            "recipients": [{"email": r} for r in rcpts],
        }
        record = Injection(messages.stream.name, len(rcpts), time.time())
        self.injections.append(record)
        try:
            async with session.post(url, json=request) as response:
                answer = await response.json(content_type=None)
                if response.status == 200 and answer.get("fail_count") == 0:
                    record.code = 250
                else:
                    record.code = response.status
                    self.errors[f"{response.status} {str(answer)[:50]}"] += 1
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            record.code = 0
            self.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.1)
        record.finished = time.time()
        return record
