"""The admin API against relayctl --json on the same relay, its scopes, and
the OpenAPI document kept true by a property test: no request, valid by
the schema or not, gets a 5xx."""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from relay.intake.http.tokens import hash_token, new_token
from support import ROOT, free_port, inject, relayctl, wait_for

ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
TOKENS = {name: new_token() for name in ("admin", "read", "inject")}
SCOPES = {"admin": ["admin"], "read": ["read"], "inject": ["inject"]}


def request(port, method, path, body=None, token="admin"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {TOKENS[token]}"} if token else {}
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        assert response.getheader("Content-Type", "").startswith("application/json"), raw
        return response.status, json.loads(raw)
    finally:
        conn.close()


@pytest.fixture
def relay(relay_factory):
    port = free_port()
    relay = relay_factory(workers=2, http={
        "address": f"127.0.0.1:{port}",
        "tokens": [{"name": n, "token_hash": hash_token(t), "scopes": SCOPES[n]}
                   for n, t in TOKENS.items()]}).start()
    relay.http_port = port
    # DNS never answers: this mail stays in the queue.
    relay.queue_id = inject(relay, "app@sender.example",
                            ["a@d1.example", "b@d1.example", "c@d2.example"],
                            b"Subject: x\r\n\r\nbody\r\n")
    # The parts of a transaction split across owners are held until its
    # decision lands, a moment after the 250: compare a settled queue.
    wait_for(lambda: ctl_json(relay, "queue")["held_parts"] == 0, what="the decision")
    return relay


def ctl_json(relay, *args):
    done = relayctl(relay, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("query, args", [("", ()), ("?by=destination&top=1",
                                                   ("--by", "destination", "--top", "1"))])
def test_queue_is_what_relayctl_prints(relay, query, args):
    status, answer = request(relay.http_port, "GET", "/api/admin/queue" + query)
    assert status == 200
    assert answer == ctl_json(relay, "queue", *args)
    assert answer["total"] == 3


def test_show_grep_report_are_what_relayctl_prints(relay):
    qid = relay.queue_id
    for path, args in [
        (f"/api/admin/show/{qid}", ("show", qid)),
        (f"/api/admin/show/{qid.lower()}?body=1", ("show", qid, "--body")),
        ("/api/admin/grep?address=%40d1.example&limit=5", ("grep", "@d1.example", "--limit", "5")),
    ]:
        status, answer = request(relay.http_port, "GET", path, token="read")
        assert status == 200 and answer == ctl_json(relay, *args), path
    status, shown = request(relay.http_port, "GET", f"/api/admin/show/{qid}?body=1")
    assert shown["body"].endswith("Subject: x\r\n\r\nbody\r\n")
    assert {r["address"] for r in shown["recipients"]} == {"a@d1.example", "b@d1.example",
                                                           "c@d2.example"}
    status, report = request(relay.http_port, "GET", "/api/admin/report?since=2h")
    printed = ctl_json(relay, "report", "--since", "2h")
    assert status == 200 and report["since"] == printed["since"] == 7200.0
    assert {k: v for k, v in report.items() if k not in ("from", "until")} == {
        k: v for k, v in printed.items() if k not in ("from", "until")}
    assert request(relay.http_port, "GET", "/api/admin/show/NOPE")[0] == 404
    assert request(relay.http_port, "GET", "/api/admin/grep?address=")[0] == 422
    assert request(relay.http_port, "GET", "/api/admin/report?since=soon")[0] == 422


def test_commands_answer_as_relayctl_does(relay):
    status, answer = request(relay.http_port, "POST", "/api/admin/suspend", {"domain": "d1.example"})
    assert status == 200 and answer["suspended"] == ["d1.example"]
    assert ctl_json(relay, "suspend", "d1.example") == answer  # the same command, the same answer
    status, traced = request(relay.http_port, "POST", "/api/admin/trace", {"add": ["x@d1.example"]})
    assert status == 200 and traced["traced"] == ["x@d1.example"]
    assert request(relay.http_port, "GET", "/api/admin/trace", token="read") == (200, traced)
    assert ctl_json(relay, "trace", "list") == traced
    status, flushed = request(relay.http_port, "POST", "/api/admin/flush", {})
    assert status == 200 and flushed["ok"] is True and "count" in flushed
    assert set(ctl_json(relay, "flush")) == set(flushed)


def test_shaping_is_what_relayctl_prints_and_cancel_checks_its_id(relay):
    status, answer = request(relay.http_port, "GET", "/api/admin/shaping", token="read")
    assert status == 200 and answer["effects"] == ctl_json(relay, "shaping")["effects"] == []
    assert request(relay.http_port, "POST", "/api/admin/shaping/cancel", {"id": 1}, token="read")[0] == 403
    status, refused = request(relay.http_port, "POST", "/api/admin/shaping/cancel", {"id": 256})
    assert status == 422 and "no effect 256" in refused["error"]
    for bad in ({}, {"id": "1"}, {"id": True}, {"id": -1}, {"id": 1, "why": "x"}):
        status, answer = request(relay.http_port, "POST", "/api/admin/shaping/cancel", bad)
        assert status == 422, bad


def test_campaigns_answer_as_relayctl_does(relay):
    status, answer = request(relay.http_port, "POST", "/api/admin/campaigns/spring/pause")
    assert status == 200 and answer["count"] == 0
    status, listed = request(relay.http_port, "GET", "/api/admin/campaigns")
    assert status == 200 and listed == ctl_json(relay, "campaign", "list")
    assert [(c["name"], c["state"]) for c in listed["campaigns"]] == [("spring", "paused")]
    status, shown = request(relay.http_port, "GET", "/api/admin/campaigns/spring")
    assert status == 200 and shown == ctl_json(relay, "campaign", "show", "spring")
    assert request(relay.http_port, "POST", "/api/admin/campaigns/spring/stop")[0] == 422
    assert request(relay.http_port, "POST", "/api/admin/campaigns/spring/pause", token="read")[0] == 403
    assert request(relay.http_port, "GET", "/api/admin/campaigns/nothing")[0] == 422
    status, resumed = request(relay.http_port, "POST", "/api/admin/campaigns/spring/resume")
    assert status == 200 and resumed["campaigns"] == []  # no mail of it, and no hold now
    assert request(relay.http_port, "GET", "/api/admin/campaigns")[1]["campaigns"] == []


def test_stats_is_what_relayctl_prints(relay):
    status, answer = request(relay.http_port, "GET", "/api/admin/stats", token="read")
    assert status == 200
    printed = ctl_json(relay, "stats")
    assert set(answer) == set(printed) and set(answer["counters"]) == set(printed["counters"])
    wait_for(lambda: request(relay.http_port, "GET", "/api/admin/stats")[1]["counters"]
             ["accepted_recipients"] == 3, what="the stats ring to show the injection")


def test_scopes(relay):
    assert request(relay.http_port, "POST", "/api/admin/flush", {}, token="read")[0] == 403
    assert request(relay.http_port, "GET", "/api/admin/queue", token="inject")[0] == 403
    assert request(relay.http_port, "GET", "/api/admin/queue", token=None)[0] == 401
    status, answer = request(relay.http_port, "POST", "/api/admin/suspend", {"domain": 5})
    assert status == 422 and answer["error"].startswith("domain")
    assert request(relay.http_port, "POST", "/api/admin/delete", {})[0] == 422


def test_every_documented_path_answers(relay):
    status, document = request(relay.http_port, "GET", "/api/openapi.json", token=None)
    assert status == 200 and document["openapi"].startswith("3.")
    for path, methods in document["paths"].items():
        path = path.replace("{queue_id}", relay.queue_id).replace("{name}", "spring")
        path = path.replace("{action}", "pause")
        if path.endswith("/grep"):
            path += "?address=a%40d1.example"
        for method in methods:
            status, _ = request(relay.http_port, method.upper(), path,
                                None if method == "get" else {})
            assert status != 404 and status != 405 and status < 500, (method, path, status)


# -- the property test ---------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                      max_size=4),
    max_leaves=12,
)
ADDRESS = st.emails() | st.text(max_size=30)
TEXT = st.text(max_size=40)
INJECT = st.fixed_dictionaries(
    {"envelope_sender": ADDRESS,
     "content": TEXT | st.fixed_dictionaries({}, optional={
         "subject": TEXT, "text_body": TEXT, "html_body": TEXT,
         "headers": st.dictionaries(st.text(min_size=1, max_size=10), TEXT, max_size=3),
         "from": st.fixed_dictionaries({"email": ADDRESS}, optional={"name": TEXT}),
         "attachments": st.lists(st.fixed_dictionaries(
             {"data": TEXT}, optional={"base64": st.booleans(), "content_type": TEXT,
                                       "file_name": TEXT}), max_size=2)}),
     "recipients": st.lists(st.fixed_dictionaries(
         {"email": ADDRESS}, optional={"name": TEXT, "substitutions": st.dictionaries(
             st.text(max_size=5), TEXT, max_size=2)}), min_size=1, max_size=3)},
    optional={"substitutions": st.dictionaries(st.text(max_size=5), TEXT, max_size=2),
              "template_dialect": st.sampled_from(["Jinja", "Static", "other"])},
)
STRINGS = st.lists(TEXT, max_size=3)
COMMANDS = {
    "flush": st.fixed_dictionaries({}, optional={"domain": TEXT}),
    "requeue": st.fixed_dictionaries({}, optional={"code": TEXT, "sender": TEXT, "recipient": TEXT}),
    "delete": st.fixed_dictionaries({"ids": STRINGS}),
    "suspend": st.fixed_dictionaries({"domain": TEXT}),
    "resume": st.fixed_dictionaries({"domain": TEXT}),
    "trace": st.fixed_dictionaries({}, optional={"add": STRINGS, "remove": STRINGS}),
}
POSTS = st.sampled_from(["/api/inject/v1"] + [f"/api/admin/{op}" for op in COMMANDS])


@st.composite
def calls(draw):
    """(method, path, body or query): valid by the schema, or anything."""
    if draw(st.booleans()):
        query = draw(st.sampled_from(["", "?by=destination", "?by=x", "?top=0", "?top=2",
                                      "?top=-1&by=domain"]))
        if draw(st.booleans()):
            words = {"address": TEXT, "limit": TEXT, "since": TEXT, "body": TEXT}
            params = draw(st.dictionaries(st.sampled_from(sorted(words)), TEXT, max_size=3))
            query = "?" + urllib.parse.urlencode(params)
            path = draw(st.sampled_from(["/api/admin/grep", "/api/admin/report"]) | st.builds(
                lambda qid: "/api/admin/show/" + urllib.parse.quote(qid, safe=""), TEXT))
            return "GET", path + query, None
        return "GET", draw(st.sampled_from(["/api/admin/queue", "/api/admin/stats",
                                            "/api/admin/trace"])) + query, None
    path = draw(POSTS)
    op = path.rsplit("/", 1)[1]
    valid = INJECT if op == "v1" else COMMANDS[op]
    body = draw(valid | JSON)
    return "POST", path, json.dumps(body).encode()


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=calls())
def test_no_request_gets_a_5xx(relay, call):
    method, path, body = call
    token = "inject" if path == "/api/inject/v1" else "admin"
    status, answer = request(relay.http_port, method, path, body, token)
    assert status < 500, (call, status, answer)
    assert isinstance(answer, dict)
