"""The HTTP intake of one worker: aiohttp on the shared ``[http] address``.

Input: HTTP requests on this worker's own SO_REUSEPORT socket (the kernel
spreads connections across the workers, as for SMTP).  Output: for
``POST /api/inject/v1`` the messages of ``inject.build`` handed to the
same ``accept`` step as SMTP's (DKIM, routing to the owners, the spool),
and KumoMTA's response ``{success_count, fail_count, failed_recipients,
errors}`` once every accepted recipient is on disk.

aiohttp because it is asyncio-native (it runs on the worker's uvloop
beside aiosmtpd), serves a socket we bound ourselves (``web.SockSite``),
and is well kept (aio-libs, releases every few weeks).

Statuses: 200 (some or all accepted; ``fail_count`` says which not),
400 malformed JSON, 401 no or bad token, 403 a token without the
``inject`` scope, 413 a body over ``[http] max_body_size`` or a message
over ``intake.max_message_size``, 422 an invalid field (named), 429 the
client IP is locked out after ``intake.max_auth_failures`` bad tokens
(the same relay-wide lockout as SMTP AUTH), 503 while draining, with the
spool low on space, or when no recipient could be stored.  Every error
is ``{"error": "..."}``, and nothing is queued for any of them.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import orjson
from aiohttp import web

from relay.config import Settings
from relay.errors import RelayError
from relay.intake.handler import IntakeState, wants_trace
from relay.intake import lane
from relay.intake.http import inject
from relay.intake.http.tokens import Tokens
from relay.intake.listener import open_http_socket, server_tls_context
from relay.intake.received import received_header
from relay.model import Transaction

log = logging.getLogger("relay.intake.http")

INJECT_PATH = "/api/inject/v1"
ACCEPT_CONCURRENCY = 64  # transactions of one request in flight to the owners at once
_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_]")


def _error(status: int, message: str, **headers) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": message}),
                        content_type="application/json", headers=headers or None)


@dataclass(frozen=True)
class Route:
    """A route another stage adds to this server (the admin API, from ops/):
    ``handler(request, settings) -> (status, JSON object)``, behind a
    token holding one of ``scopes`` (none: open, e.g. the OpenAPI document)."""

    method: str
    path: str
    handler: Callable[[web.Request, Settings], Awaitable[tuple[int, dict]]]
    scopes: frozenset[str] = frozenset()


@web.middleware
async def _json_errors(request: web.Request, handler):
    """aiohttp's own refusals (404, 405, a bad request line) in JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)


class HttpIntake:
    def __init__(self, settings: Settings, state: IntakeState, routes: tuple[Route, ...] = ()) -> None:
        self.state = state
        self.routes = routes
        self.runner: web.AppRunner | None = None
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Reload: tokens and the body limit (the socket and TLS need a restart)."""
        self.settings = settings
        self.http = settings.http
        self.tokens = Tokens(settings.http.tokens if settings.http else ())

    async def start(self) -> None:
        """Serve on this worker's socket; nothing when there is no [http]."""
        sock = open_http_socket(self.settings)
        if sock is None:
            return
        app = web.Application(client_max_size=self.http.max_body_size,
                              middlewares=[_json_errors])
        app.router.add_post(INJECT_PATH, self.inject)
        for route in self.routes:
            app.router.add_route(route.method, route.path, self._guarded(route))
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=self.settings.relay.shutdown_timeout)
        await self.runner.setup()
        site = web.SockSite(self.runner, sock, backlog=self.settings.relay.listen_backlog,
                            ssl_context=server_tls_context(self.http, "[http]"))
        await site.start()

    async def close(self) -> None:
        """Stop accepting; requests in flight finish (within shutdown_timeout)."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()

    # -- authentication ----------------------------------------------------------------

    def _authorize(self, request: web.Request, scopes: frozenset[str]):
        """The token's Grant, or the refusal (429, 401, 403) to send."""
        state = self.state
        ip = request.remote or "?"
        if state.lockout.is_locked(ip):
            state.counters["rejected_auth_lockout"] += 1
            return _error(429, "too many failed authentications, try again later")
        grant = self.tokens.check(request.headers.get("Authorization"))
        if grant is None:
            state.lockout.failed(ip)
            state.counters["rejected_auth"] += 1
            log.warning("HTTP: bad or missing token from [%s]", ip)
            return _error(401, "a valid bearer token is required",
                          **{"WWW-Authenticate": 'Bearer realm="relay"'})
        if not grant.scopes & scopes:
            wanted = " or ".join(sorted(scopes))
            return _error(403, f"token {grant.name!r} lacks the {wanted} scope")
        return grant

    def _guarded(self, route: Route):
        async def handle(request: web.Request) -> web.Response:
            if route.scopes:
                grant = self._authorize(request, route.scopes)
                if isinstance(grant, web.Response):
                    return grant
            status, answer = await route.handler(request, self.settings)
            return web.Response(status=status, body=orjson.dumps(answer),
                                content_type="application/json")

        return handle

    # -- POST /api/inject/v1 ---------------------------------------------------------

    async def inject(self, request: web.Request) -> web.Response:
        state = self.state
        ip = request.remote or "?"
        grant = self._authorize(request, frozenset({"inject"}))
        if isinstance(grant, web.Response):
            return grant
        if state.draining:
            return _error(503, "shutting down, try again later", **{"Retry-After": "5"})
        if state.low_disk():
            state.counters["rejected_low_disk"] += 1
            return _error(503, "insufficient system storage, try again later",
                          **{"Retry-After": "60"})
        limit = self.http.max_body_size
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"request body over {limit} bytes ([http] max_body_size)")
        body = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > limit:
                return _error(413, f"request body over {limit} bytes ([http] max_body_size)")
        intake = state.intake
        now = time.time()
        try:
            messages = inject.build(
                inject.parse_json(bytes(body)),
                inject.Limits(intake.max_message_size, intake.max_recipients,
                              intake.max_received_headers),
                hostname=state.hostname, now=now,
                make_msgid=lambda: email.utils.make_msgid(domain=state.hostname),
            )
        except inject.InjectError as exc:
            state.counters["rejected_data"] += 1
            return _error(exc.status, exc.message)
        try:  # the class and campaign each message's X-Relay-* headers give
            labels = [lane.choose(m.body) for m in messages]
        except lane.BadLabel as exc:
            state.counters["rejected_data"] += 1
            return _error(400, exc.text)
        secure = request.secure
        client = _UNSAFE.sub("-", grant.name)[:64] or "api"
        gate = asyncio.Semaphore(ACCEPT_CONCURRENCY)

        async def accept(message: inject.Message, labels: lane.Labels) -> str | None:
            queue_id = state.queue_ids.next()
            received = received_header(
                helo=client, peer_ip=ip, hostname=state.hostname,
                protocol="HTTPS" if secure else "HTTP", queue_id=queue_id,
                recipients=list(message.recipients), when=now,
            )
            txn = Transaction(
                queue_id=queue_id, sender=message.sender, recipients=message.recipients,
                body=received + message.body, received_at=now, smtputf8=message.smtputf8,
                trace=wants_trace(message.body, list(message.recipients), state.traced),
                lane=labels.lane, campaign=labels.campaign, tenant=labels.tenant,
            )
            async with gate:
                try:
                    await state.accept(txn)
                except RelayError as exc:
                    state.counters["rejected_spool"] += 1
                    log.warning("%s: not accepted: %s", queue_id, exc)
                    return None
            state.counters["accepted_messages"] += 1
            state.counters["accepted_recipients"] += len(message.recipients)
            state.counters[f"accepted_{labels.lane}"] += len(message.recipients)
            state.counters["accepted_bytes"] += len(txn.body)
            log.info("%s: accepted from=<%s> nrcpt=%d size=%d client=[%s] http token=%s%s",
                     queue_id, message.sender, len(message.recipients), len(txn.body), ip,
                     grant.name, " trace" if txn.trace else "")
            return queue_id

        results = await asyncio.gather(*(accept(m, l) for m, l in zip(messages, labels)))
        success = failed = 0
        failed_recipients, errors = [], []
        for message, queue_id in zip(messages, results):
            if queue_id is None:
                failed += len(message.recipients)
                failed_recipients.extend(message.recipients)
                errors.extend(f"{r}: temporary failure, try again later" for r in message.recipients)
            else:
                success += len(message.recipients)
        answer = {"success_count": success, "fail_count": failed,
                  "failed_recipients": failed_recipients, "errors": errors}
        status = 503 if success == 0 and failed else 200
        return web.Response(status=status, body=orjson.dumps(answer),
                            content_type="application/json")
