"""Webhooks: delivery events POSTed in batches, through the outbox.

Input: this worker's committed events (feeds.outbox), one cursor per
``[[webhook]]`` (by its url).  Output: a POST of a JSON array of records
(feeds.amqp.record: KumoMTA's batch form, a list of log records) of the
types the webhook asked for, at most ``batch_size`` per POST; a partial
batch waits up to ``batch_wait`` for more.  With a ``secret`` the header
``X-Relay-Signature: sha256=<hex>`` is the HMAC-SHA256 of the body.
Any answer but 2xx, a timeout or a refused connection is retried with
backoff (the cursor waits: nothing is lost while the receiver is down,
and a batch may arrive twice: each record carries ``event_id``).
"""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx
import orjson

from relay.errors import RelayError
from relay.feeds.amqp import Feed, describe

SIGNATURE_HEADER = "X-Relay-Signature"


class WebhookRefused(RelayError):
    """The receiver answered something other than 2xx."""


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookFeed(Feed):
    gauge = "feed_lag_webhooks"

    def __init__(self, spool, worker, counters, settings, seen) -> None:
        name = "webhook." + hashlib.sha256(settings.url.encode()).hexdigest()[:12]
        super().__init__(spool, worker, counters, name)
        self.settings = settings  # [[webhook]]
        self.seen = seen
        self.client: httpx.AsyncClient | None = None

    def wait_for_more(self, batch: list[dict]) -> float:
        if len(batch) >= self.settings.batch_size:
            return 0.0
        return max(batch[0]["time"] + self.settings.batch_wait - time.time(), 0.0)

    async def publish(self, batch: list[dict]) -> int:
        records = []
        for event in batch:
            record = await describe(event, self.worker, self.seen)
            if not self.settings.events or record["type"] in self.settings.events:
                records.append(record)
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.settings.timeout)
        size = self.settings.batch_size
        for start in range(0, len(records), size):
            body = orjson.dumps(records[start:start + size])
            headers = {"Content-Type": "application/json"}
            if self.settings.secret:
                headers[SIGNATURE_HEADER] = signature(self.settings.secret, body)
            try:
                response = await self.client.post(self.settings.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise WebhookRefused(f"{type(exc).__name__}: {exc}") from None
            if not 200 <= response.status_code < 300:
                raise WebhookRefused(f"HTTP {response.status_code}")
        return len(records)

    async def reset(self) -> None:
        await self.close()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()
