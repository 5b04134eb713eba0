"""The admin API: relayctl's verbs over HTTP, ``/api/admin/...``, with the
JSON ``relayctl VERB --json`` prints (both call ``ops.verbs``), and the
OpenAPI document at ``/api/openapi.json``.

Input: requests the worker's HTTP server (intake.http.server) has
authenticated: GET routes need the ``read`` or ``admin`` scope, POST
routes ``admin``.  Output: (status, JSON object).  The verbs block
(SQLite reads, the control socket), so they run on a thread; a command
goes to the supervisor, which passes it to the owner worker(s) exactly as
for relayctl.

    GET  /api/admin/stats                       relayctl stats --json
    GET  /api/admin/queue?by=destination&top=N  relayctl queue --json
    GET  /api/admin/show/{id}?body=1            relayctl show ID [--body] --json (404: unknown)
    GET  /api/admin/grep?address=A&limit=N      relayctl grep A [--limit N] --json
    GET  /api/admin/report?since=1h             relayctl report [--since 1h] --json
    POST /api/admin/flush    {"domain"?}        relayctl flush [DOMAIN] --json
    POST /api/admin/requeue  {"code"?, "sender"?, "recipient"?}
    POST /api/admin/delete   {"ids": [...]}
    POST /api/admin/suspend  {"domain"}         (and resume)
    GET  /api/admin/trace                       relayctl trace list --json
    POST /api/admin/trace    {"add"?: [...], "remove"?: [...]}
    GET  /api/admin/shaping                     relayctl shaping --json
    POST /api/admin/shaping/cancel {"id": N}    relayctl shaping cancel N --json
    GET  /api/admin/campaigns                   relayctl campaign list --json
    GET  /api/admin/campaigns/{name}            relayctl campaign show NAME --json
    POST /api/admin/campaigns/{name}/{action}   relayctl campaign pause|resume|cancel NAME --json

Statuses: 200; 400 a body that is not a JSON object; 422 a bad field or
a command the relay refused (``{"error"}``, as relayctl's exit 1); 503 the
spool or the supervisor cannot be reached.
"""

from __future__ import annotations

import asyncio
import functools

import orjson
from aiohttp import web

from relay.cli import control, stats as stats_cli
from relay.cli.spoolread import ReadError
from relay.config import Settings, parse_duration
from relay.intake.http.server import Route
from relay.ops import openapi, verbs

READ = frozenset({"read", "admin"})
ADMIN = frozenset({"admin"})

# POST body fields of each command, and their types (list = list of strings).
COMMAND_FIELDS = {
    "flush": {"domain": str},
    "requeue": {"code": str, "sender": str, "recipient": str},
    "delete": {"ids": list},
    "suspend": {"domain": str},
    "resume": {"domain": str},
    "trace": {"add": list, "remove": list},
}
REQUIRED = {"delete": ("ids",), "suspend": ("domain",), "resume": ("domain",)}


async def _blocking(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def _failure(exc: Exception) -> tuple[int, dict]:
    if isinstance(exc, control.ControlError):
        return 422, {"error": str(exc)}
    return 503, {"error": str(exc)}


async def get_stats(request: web.Request, settings: Settings) -> tuple[int, dict]:
    try:
        return 200, await _blocking(stats_cli.collect, settings.relay.run_dir)
    except (OSError, ValueError) as exc:
        return 503, {"error": f"cannot read the stats ring: {exc}"}


async def get_queue(request: web.Request, settings: Settings) -> tuple[int, dict]:
    by = request.query.get("by", "domain")
    if by not in ("domain", "destination"):
        return 422, {"error": "by: expected domain or destination"}
    top = request.query.get("top")
    if top is not None:
        if not top.isdigit() or int(top) < 1:
            return 422, {"error": "top: expected a positive whole number"}
        top = int(top)
    try:
        # offline: this worker runs, so the relay does; no need to ask the supervisor.
        report = await _blocking(verbs.queue, settings.source, by, top, True)
    except ReadError as exc:
        return 503, {"error": str(exc)}
    return 200, report.json


def _positive(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name}: expected a positive whole number")
    return int(text)


async def get_show(request: web.Request, settings: Settings) -> tuple[int, dict]:
    with_body = request.query.get("body", "0") not in ("0", "", "false")
    try:
        shown = await _blocking(verbs.show, settings.source, request.match_info["queue_id"],
                                with_body, True)
    except verbs.NotFound as exc:
        return 404, {"error": str(exc)}
    except ReadError as exc:
        return 503, {"error": str(exc)}
    return 200, shown.json(with_body)


async def get_grep(request: web.Request, settings: Settings) -> tuple[int, dict]:
    address = request.query.get("address", "")
    try:
        limit = _positive(request.query.get("limit"), "limit")
        grepped = await _blocking(verbs.grep, settings.source, address, limit, True)
    except ValueError as exc:
        return 422, {"error": f"{exc}" if str(exc).startswith("limit") else f"address: {exc}"}
    except ReadError as exc:
        return 503, {"error": str(exc)}
    return 200, grepped.json()


async def get_report(request: web.Request, settings: Settings) -> tuple[int, dict]:
    try:
        since = parse_duration(request.query.get("since", "1h"))
    except ValueError as exc:
        return 422, {"error": f"since: expected {exc}"}
    try:
        return 200, (await _blocking(verbs.report, settings.source, since, True)).json()
    except ReadError as exc:
        return 503, {"error": str(exc)}


class _BadBody(Exception):
    """A POST body that is not a JSON object: 400 with this text."""


async def _json_object(request: web.Request) -> dict:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise _BadBody(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadBody("the request body must be a JSON object")
    return body


def _command_route(op: str):
    async def handle(request: web.Request, settings: Settings) -> tuple[int, dict]:
        try:
            body = await _json_object(request)
        except _BadBody as exc:
            return 400, {"error": str(exc)}
        message: dict = {"op": op}
        fields = COMMAND_FIELDS[op]
        for name, value in body.items():
            kind = fields.get(name)
            if kind is None:
                return 422, {"error": f"{name}: unknown field"}
            if kind is str and not isinstance(value, str):
                return 422, {"error": f"{name}: expected a string"}
            if kind is list and not (isinstance(value, list)
                                     and all(isinstance(v, str) for v in value)):
                return 422, {"error": f"{name}: expected a list of strings"}
            if value:
                message[name] = value
        for name in REQUIRED.get(op, ()):
            if name not in message:
                return 422, {"error": f"{name}: required"}
        if op == "trace":
            message.setdefault("add", [])
            message.setdefault("remove", [])
        try:
            return 200, await _blocking(verbs.command, settings.relay.run_dir, message)
        except (control.ControlError, control.NotRunning) as exc:
            return _failure(exc)

    return handle


async def get_trace(request: web.Request, settings: Settings) -> tuple[int, dict]:
    try:
        return 200, await _blocking(verbs.command, settings.relay.run_dir,
                                    {"op": "trace", "add": [], "remove": []})
    except (control.ControlError, control.NotRunning) as exc:
        return _failure(exc)


async def get_shaping(request: web.Request, settings: Settings) -> tuple[int, dict]:
    try:
        return 200, await _blocking(verbs.shaping, settings.relay.run_dir)
    except (control.ControlError, control.NotRunning) as exc:
        return _failure(exc)


async def cancel_effect(request: web.Request, settings: Settings) -> tuple[int, dict]:
    try:
        body = await _json_object(request)
    except _BadBody as exc:
        return 400, {"error": str(exc)}
    unknown = sorted(set(body) - {"id"})
    if unknown:
        return 422, {"error": f"{unknown[0]}: unknown field"}
    effect_id = body.get("id")
    if not isinstance(effect_id, int) or isinstance(effect_id, bool) or effect_id < 0:
        return 422, {"error": "id: required, the effect's id (a whole number, from GET shaping)"}
    try:
        return 200, await _blocking(verbs.shaping_cancel, settings.relay.run_dir, effect_id)
    except (control.ControlError, control.NotRunning) as exc:
        return _failure(exc)


async def get_campaigns(request: web.Request, settings: Settings) -> tuple[int, dict]:
    name = request.match_info.get("name")
    try:
        return 200, await _blocking(verbs.campaign, settings.relay.run_dir,
                                    "show" if name else "list", name)
    except (control.ControlError, control.NotRunning) as exc:
        return _failure(exc)


async def steer_campaign(request: web.Request, settings: Settings) -> tuple[int, dict]:
    action = request.match_info["action"]
    if action not in ("pause", "resume", "cancel"):
        return 422, {"error": f"{action}: expected pause, resume or cancel"}
    try:
        return 200, await _blocking(verbs.campaign, settings.relay.run_dir, action,
                                    request.match_info["name"])
    except (control.ControlError, control.NotRunning) as exc:
        return _failure(exc)


async def get_openapi(request: web.Request, settings: Settings) -> tuple[int, dict]:
    return 200, openapi.document()


def routes() -> tuple[Route, ...]:
    """Every admin route, for the worker to add to its HTTP server."""
    found = [
        Route("GET", "/api/admin/stats", get_stats, READ),
        Route("GET", "/api/admin/queue", get_queue, READ),
        Route("GET", "/api/admin/trace", get_trace, READ),
        Route("GET", "/api/admin/show/{queue_id}", get_show, READ),
        Route("GET", "/api/admin/grep", get_grep, READ),
        Route("GET", "/api/admin/report", get_report, READ),
        Route("GET", "/api/admin/shaping", get_shaping, READ),
        Route("POST", "/api/admin/shaping/cancel", cancel_effect, ADMIN),
        Route("GET", "/api/admin/campaigns", get_campaigns, READ),
        Route("GET", "/api/admin/campaigns/{name}", get_campaigns, READ),
        Route("POST", "/api/admin/campaigns/{name}/{action}", steer_campaign, ADMIN),
        Route("GET", "/api/openapi.json", get_openapi),
    ]
    found += [Route("POST", f"/api/admin/{op}", _command_route(op), ADMIN) for op in COMMAND_FIELDS]
    return tuple(found)
