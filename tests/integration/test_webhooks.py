"""Webhooks end to end: delivery events of the real relay POSTed to a
receiver on loopback, batched and signed, also after it was down."""

from __future__ import annotations

import collections
import hashlib
import hmac
import http.server
import json
import threading

import pytest

from relay.testing.fakenet import Behaviour
from support import deliver_relay, inject, relayctl, wait_for

SECRET = "s3cret"


class Receiver(http.server.ThreadingHTTPServer):
    """Records every POST; answers 503 while ``down``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.down = False
        self.posts: list[tuple[bytes, str | None]] = []
        self.refused = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def records(self) -> list[dict]:
        with self.lock:
            return [r for body, _ in self.posts for r in json.loads(body)]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        with server.lock:
            if server.down:
                server.refused += 1
                status = 503
            else:
                server.posts.append((body, self.headers.get("X-Relay-Signature")))
                status = 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.shutdown()
    server.server_close()


BODY = b"From: app@sender.example\r\nSubject: hi\r\n\r\nHello\r\n"


def test_a_webhook_gets_every_event_signed_also_after_it_was_down(relay_factory, net, receiver):
    net.add_domain("d1.example", ["127.0.0.11"],
                   behaviour=Behaviour(rules={r"^nobody": "550 5.1.1 No such user"}))
    [sender_mx] = net.add_domain("sender.example", ["127.0.0.20"])
    receiver.down = True
    relay = deliver_relay(relay_factory, net, workers=2, webhook=[
        {"url": receiver.url, "secret": SECRET, "batch_size": 10, "batch_wait": "200ms",
         "events": ["Delivery", "Bounce"]}])
    recipients = [f"r{n}@d1.example" for n in range(30)]
    for start in range(0, 30, 10):
        inject(relay, "app@sender.example", recipients[start:start + 10], BODY)
    inject(relay, "app@sender.example", ["nobody@d1.example"], BODY)
    sender_mx.wait_received(1, timeout=20)  # the DSN of the bounce
    wait_for(lambda: receiver.refused >= 2, 20, "the receiver refusing")
    result = json.loads(relayctl(relay, "stats", "--json").stdout)
    assert result["gauges"]["feed_lag_webhooks"] > 0  # the backlog shows while it is down
    receiver.down = False
    expected = set(recipients) | {"nobody@d1.example", "app@sender.example"}
    wait_for(lambda: {r["recipient"] for r in receiver.records()} >= expected, 60,
             "every event at the receiver")
    for body, header in receiver.posts:
        assert header == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert 1 <= len(json.loads(body)) <= 10
    records = receiver.records()
    counts = collections.Counter((r["id"], r["recipient"]) for r in records)
    print(f"webhook: {len(records)} records in {len(receiver.posts)} POSTs after "
          f"{receiver.refused} refusals; {sum(n - 1 for n in counts.values())} sent twice")
    types = {r["recipient"]: r["type"] for r in records}
    assert types["nobody@d1.example"] == "Bounce"
    assert all(types[r] == "Delivery" for r in recipients)
    assert {r["type"] for r in records} <= {"Delivery", "Bounce"}  # only what it asked for
    relay.stop()
