"""The OpenAPI 3.1 document of the HTTP API, served at /api/openapi.json.

Input: none.  Output: the document (a dict).  It is written by hand from
the handlers (intake.http.inject for the inject request, ops.admin_http
for the admin routes) and kept true by tests/integration/test_http_admin:
every path here answers, and no request — valid by this schema or not —
gets a 5xx.
"""

from __future__ import annotations

_ERROR = {"$ref": "#/components/schemas/Error"}
_STRINGS = {"type": "array", "items": {"type": "string"}}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {400: "malformed JSON", 401: "no or unknown token", 403: "the token lacks the scope",
            413: "over a size limit", 422: "an invalid field (named in the error)",
            429: "locked out after failed tokens", 503: "draining, low on disk, or unreachable"}
    return {str(code): {"description": text[code], **_json(_ERROR)} for code in codes}


_PERSON = {"type": "object", "required": ["email"],
           "properties": {"email": {"type": "string"}, "name": {"type": "string"}}}

INJECT_REQUEST = {
    "type": "object",
    "required": ["envelope_sender", "content", "recipients"],
    "properties": {
        "envelope_sender": {"type": "string"},
        "content": {"oneOf": [
            {"type": "string", "description": "a whole RFC 5322 message"},
            {"type": "object", "properties": {
                "subject": {"type": "string"}, "text_body": {"type": "string"},
                "html_body": {"type": "string"},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                "from": _PERSON, "reply_to": _PERSON,
                "attachments": {"type": "array", "items": {
                    "type": "object", "required": ["data"],
                    "properties": {"data": {"type": "string"}, "base64": {"type": "boolean"},
                                   "content_type": {"type": "string"},
                                   "file_name": {"type": "string"},
                                   "content_id": {"type": "string"}}}},
            }},
        ]},
        "recipients": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["email"],
            "properties": {"email": {"type": "string"}, "name": {"type": "string"},
                           "substitutions": {"type": "object"}}}},
        "substitutions": {"type": "object"},
        "template_dialect": {"enum": ["Jinja", "Static"]},
    },
}

INJECT_RESPONSE = {
    "type": "object",
    "required": ["success_count", "fail_count", "failed_recipients", "errors"],
    "properties": {"success_count": {"type": "integer"}, "fail_count": {"type": "integer"},
                   "failed_recipients": _STRINGS, "errors": _STRINGS},
}

# Bodies of the admin commands (ops.admin_http.COMMAND_FIELDS).
COMMANDS = {
    "flush": {"domain": {"type": "string"}},
    "requeue": {"code": {"type": "string"}, "sender": {"type": "string"},
                "recipient": {"type": "string"}},
    "delete": {"ids": _STRINGS},
    "suspend": {"domain": {"type": "string"}},
    "resume": {"domain": {"type": "string"}},
    "trace": {"add": _STRINGS, "remove": _STRINGS},
}
REQUIRED = {"delete": ["ids"], "suspend": ["domain"], "resume": ["domain"]}

_ANSWER = {"type": "object", "required": ["ok"], "properties": {
    "ok": {"type": "boolean"}, "workers": {"type": "array", "items": {"type": "integer"}},
    "count": {"type": "integer"}, "suspended": _STRINGS, "traced": _STRINGS}}


def _command(op: str) -> dict:
    body = {"type": "object", "additionalProperties": False, "properties": COMMANDS[op]}
    if op in REQUIRED:
        body["required"] = REQUIRED[op]
    return {"post": {
        "summary": f"relayctl {op} --json",
        "security": [{"bearer": []}],
        "requestBody": {"required": False, **_json(body)},
        "responses": {"200": {"description": "the supervisor's answer", **_json(_ANSWER)},
                      **_errors(400, 401, 403, 422, 429, 503)},
    }}


def _read(summary: str, parameters=(), not_found: bool = False) -> dict:
    errors = _errors(401, 403, 422, 429, 503)
    if not_found:
        errors["404"] = {"description": "no such message", **_json(_ERROR)}
    return {"get": {
        "summary": summary,
        "security": [{"bearer": []}],
        "parameters": list(parameters),
        "responses": {"200": {"description": "as relayctl prints it",
                              **_json({"type": "object"})},
                      **errors},
    }}


def document() -> dict:
    paths = {
        "/api/inject/v1": {"post": {
            "summary": "inject messages (KumoMTA's request and response)",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, **_json(INJECT_REQUEST)},
            "responses": {"200": {"description": "every accepted recipient is on disk",
                                  **_json(INJECT_RESPONSE)},
                          **_errors(400, 401, 403, 413, 422, 429, 503)},
        }},
        "/api/admin/stats": _read("relayctl stats --json"),
        "/api/admin/queue": _read("relayctl queue --json", [
            {"name": "by", "in": "query", "schema": {"enum": ["domain", "destination"]}},
            {"name": "top", "in": "query", "schema": {"type": "integer", "minimum": 1}},
        ]),
        "/api/admin/trace": {**_read("relayctl trace list --json"), **_command("trace")},
        "/api/admin/show/{queue_id}": _read("relayctl show ID --json", [
            {"name": "queue_id", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "body", "in": "query", "schema": {"enum": ["0", "1"]}},
        ], not_found=True),
        "/api/admin/grep": _read("relayctl grep ADDRESS --json", [
            {"name": "address", "in": "query", "required": True, "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
        ]),
        "/api/admin/report": _read("relayctl report --json", [
            {"name": "since", "in": "query", "schema": {"type": "string", "example": "1h"}},
        ]),
    }
    paths["/api/admin/shaping"] = _read("relayctl shaping --json")
    paths["/api/admin/shaping/cancel"] = {"post": {
        "summary": "relayctl shaping cancel ID --json",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, **_json({
            "type": "object", "additionalProperties": False, "required": ["id"],
            "properties": {"id": {"type": "integer", "minimum": 0}}})},
        "responses": {"200": {"description": "the effect cancelled", **_json({"type": "object"})},
                      **_errors(400, 401, 403, 422, 429, 503)},
    }}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    paths["/api/admin/campaigns"] = _read("relayctl campaign list --json")
    paths["/api/admin/campaigns/{name}"] = _read("relayctl campaign show NAME --json", [name])
    paths["/api/admin/campaigns/{name}/{action}"] = {"post": {
        "summary": "relayctl campaign pause|resume|cancel NAME --json",
        "security": [{"bearer": []}],
        "parameters": [name, {"name": "action", "in": "path", "required": True,
                              "schema": {"enum": ["pause", "resume", "cancel"]}}],
        "responses": {"200": {"description": "the campaign's figures and the recipients"
                                             " held, released or cancelled (count)",
                              **_json({"type": "object"})},
                      **_errors(401, 403, 422, 429, 503)},
    }}
    for op in ("flush", "requeue", "delete", "suspend", "resume"):
        paths[f"/api/admin/{op}"] = _command(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "relay HTTP API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}},
        },
    }
