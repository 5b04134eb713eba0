"""The supervisor's front doors: the control socket relayctl talks to, and
``/metrics`` for Prometheus.

Input: one JSON request per connection on ``run_dir/control.sock``; HTTP
GETs on ``[stats] metrics_address``.  Output: JSON answers (a command that
changes state is passed to the worker that owns the slots concerned, or to
every worker, over its peer socket); the stats ring in Prometheus text.
The supervisor's selector loop only accepts relayctl connections; every
exchange, and every /metrics request, runs on a thread of its own, so a
client that connects and says nothing never holds up reaping, restarts or
signals.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from relay.cli.control import socket_path as control_socket_path
from relay.config import Settings
from relay.intake.lane import valid_name as campaign_name_ok
from relay.intake.policy import BadDomain, routing_domain
from relay.route.forward import request_blocking, socket_path
from relay.route.shard import host_of, slot_of
from relay.stats import prometheus, ring

log = logging.getLogger("relay.control")

EXCHANGE_TIMEOUT = 5.0
WORKER_TIMEOUT = 120.0  # a requeue over a big spool may take a while
REQUEUE_FILTERS = ("code", "sender", "recipient")
CAMPAIGN_ACTIONS = ("list", "show", "pause", "resume", "cancel")
CAMPAIGN_COUNTS = ("queued", "held", "delivered", "deferred", "bounced", "dropped")


def open_control_socket(run_dir: str) -> socket.socket:
    path = control_socket_path(run_dir)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)  # the operator's, not every local user's
    sock.listen(16)
    sock.setblocking(False)
    return sock


class ControlPlane:
    def __init__(self, settings: Settings, workers: int, worker_pids) -> None:
        self.settings = settings
        self.workers = workers
        self.worker_pids = worker_pids  # callable: [(index, pid or None)]
        self.ring_path = ring.ring_path(settings.relay.run_dir)

    # -- relayctl -------------------------------------------------------------

    def serve_control(self, listener: socket.socket) -> None:
        """Accept a relayctl connection; answer it on a thread of its own, so
        a long command (a requeue over a big spool) never holds up the
        supervisor's loop (reaping, restarts, signals)."""
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        threading.Thread(target=self._exchange, args=(conn,), daemon=True).start()

    def _exchange(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(EXCHANGE_TIMEOUT)
            try:
                data = b""
                while not data.endswith(b"\n") and len(data) < 65536:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                answer = self.answer(orjson.loads(data))
            except (OSError, orjson.JSONDecodeError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            except Exception as exc:  # a bug must not cost the operator an answer
                log.exception("relayctl request failed")
                answer = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
            try:
                conn.sendall(orjson.dumps(answer) + b"\n")
            except OSError:
                pass

    def answer(self, request: dict) -> dict:
        op = request.get("op")
        try:
            if op == "status":
                return {
                    "ok": True,
                    "pid": os.getpid(),
                    "config": self.settings.source,
                    "ring": self.ring_path,
                    "workers": [{"index": i, "pid": pid} for i, pid in self.worker_pids()],
                }
            if op == "requeue" and not any(request.get(k) for k in REQUEUE_FILTERS + ("all", "quarantined")):
                return {"ok": False, "error": "requeue without a filter needs all: every bounce"
                                              " would go back in the queue"}
            if op in ("flush", "suspend", "resume", "suspensions", "requeue", "delete", "trace",
                      "amqp"):
                return self._to_workers(request)
            if op in ("shaping", "shaping_cancel"):
                return self._shaping(request)
            if op == "campaign":
                return self._campaign(request)
            if op == "cluster":
                return self._cluster()
        except (OSError, ValueError) as exc:
            log.warning("relayctl %s failed: %s", op, exc)
            return {"ok": False, "error": f"{op} failed: {exc}"}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def _cluster(self) -> dict:
        """This host's place in the cluster, each worker's link, and every
        shard queue's depth (worker 0 asks the broker)."""
        cluster = self.settings.cluster
        if cluster.hosts == 1:
            return {"ok": False, "error": "this relay is not in a cluster ([cluster] hosts = 1)"}
        links, queues = [], []
        for worker in range(self.workers):
            answer = request_blocking(socket_path(self.settings.relay.run_dir, worker),
                                      {"op": "cluster", "queues": worker == 0}, WORKER_TIMEOUT)
            if not answer.get("ok"):
                return {"ok": False, "error": answer.get("error") or f"worker {worker} refused cluster"}
            links.append(answer["cluster"])
            queues = answer.get("queues", queues)
        totals = {name: sum(link[name] for link in links)
                  for name in ("published", "publish_failed", "consumed", "duplicates", "nacked", "bad")}
        return {"ok": True, "host": cluster.index, "hosts": cluster.hosts, **totals,
                "last_error": next((link["last_error"] for link in links if link["last_error"]), ""),
                "workers": links, "queues": queues}

    def _shaping(self, request: dict) -> dict:
        """Every worker's effects and sites; a cancel goes to the effect's
        worker (the low byte of its id, deliver.shaping.ID_STEP)."""
        if request["op"] == "shaping_cancel":
            worker = int(request["id"]) % 256
            if worker >= self.workers:
                return {"ok": False, "error": f"no effect {request['id']} in force"}
            answer = request_blocking(socket_path(self.settings.relay.run_dir, worker), request,
                                      WORKER_TIMEOUT)
            if not answer.get("ok"):
                return {"ok": False, "error": answer.get("error") or f"no effect {request['id']} in force"}
            return {"ok": True, "cancelled": answer["cancelled"]}
        effects, sites = [], []
        for worker in range(self.workers):
            answer = request_blocking(socket_path(self.settings.relay.run_dir, worker), request,
                                      WORKER_TIMEOUT)
            if not answer.get("ok"):
                return {"ok": False, "error": f"worker {worker} refused shaping"}
            effects += answer.get("effects", [])
            sites += answer.get("sites", [])
        return {"ok": True, "effects": sorted(effects, key=lambda e: e["since"]),
                "sites": sorted(sites, key=lambda s: (-s["queued"], s["site"]))}

    def _campaign(self, request: dict) -> dict:
        """Every worker has mail of a campaign and applies its state: each is
        asked (pause, resume, cancel too), and the figures are summed."""
        action, name = request.get("action"), request.get("name")
        if action not in CAMPAIGN_ACTIONS or (action != "list") != bool(name):
            return {"ok": False, "error": "campaign: list, or show|pause|resume|cancel NAME"}
        if name and not campaign_name_ok(name):
            return {"ok": False, "error": f"not a valid campaign name: {name!r}"}
        merged: dict[str, dict] = {}
        states: dict[str, str] = {}
        count = 0
        for worker in range(self.workers):
            answer = request_blocking(socket_path(self.settings.relay.run_dir, worker), request,
                                      WORKER_TIMEOUT)
            if not answer.get("ok"):
                return {"ok": False, "error": f"worker {worker} refused campaign {action}"}
            count += answer.get("count", 0)
            states.update(answer.get("states", {}))
            for figure in answer.get("campaigns", []):
                into = merged.get(figure["name"])
                if into is None:
                    merged[figure["name"]] = dict(figure)
                    continue
                for key in CAMPAIGN_COUNTS:
                    into[key] += figure[key]
                into["first"] = min(into["first"], figure["first"])
                into["last"] = max(into["last"], figure["last"])
        for campaign, state in states.items():  # paused or cancelled before any of its mail came
            merged.setdefault(campaign, {"name": campaign, "tenant": "", "class": "bulk",
                                         "first": None, "last": None,
                                         **dict.fromkeys(CAMPAIGN_COUNTS, 0)})["state"] = state
        campaigns = sorted(merged.values(), key=lambda c: (-(c["last"] or 0), c["name"]))
        if action == "show" and not campaigns:
            return {"ok": False, "error": f"no campaign {name!r} in any spool"}
        return {"ok": True, "action": action, "count": count, "campaigns": campaigns}

    def _to_workers(self, request: dict) -> dict:
        """A command goes to every worker (a domain's only after checking
        that this host of the cluster owns the domain)."""
        domain = request.get("domain")
        if domain:
            try:
                domain = request["domain"] = routing_domain(domain)
            except BadDomain:
                return {"ok": False, "error": f"not a valid domain: {domain!r}"}
            cluster = self.settings.cluster
            host = host_of(slot_of(domain), cluster.hosts)
            if host != cluster.index:
                return {"ok": False, "error": f"{domain} belongs to host {host} of the cluster,"
                                              f" not this one ({cluster.index}): run relayctl there"}
        # Every worker, even for a domain's command: a spread domain's mail
        # ([relay] spread_domains) is in all of them, and a suspension each
        # records stays right when the list changes.
        targets = list(range(self.workers))
        answers = {}
        for worker, message in [(w, request) for w in targets]:
            path = socket_path(self.settings.relay.run_dir, worker)
            try:
                answers[worker] = request_blocking(path, message, WORKER_TIMEOUT)
            except OSError as exc:
                return {"ok": False, "error": f"worker {worker} did not answer: {exc}"}
            if not answers[worker].get("ok"):
                return {"ok": False, "error": f"worker {worker} refused {message['op']}"}
        result = {"ok": True, "workers": sorted(answers)}
        if any("count" in a for a in answers.values()):
            result["count"] = sum(a.get("count", 0) for a in answers.values())
        if any("traced" in a for a in answers.values()):
            result["traced"] = answers[targets[0]]["traced"]
        if request["op"] == "delete":
            # A message split between owners has a part in several spools:
            # count messages, and name the ids no spool had.
            deleted = {i for a in answers.values() for i in a.get("deleted", [])}
            result["count"] = len(deleted)
            result["deleted"] = sorted(deleted)
            result["missing"] = [i for i in dict.fromkeys(request.get("ids", [])) if i not in deleted]
        if any("amqp" in a for a in answers.values()):
            result["per_worker"] = [{"worker": w, **answers[w].get("amqp", {})} for w in sorted(answers)]
        if any("suspended" in a for a in answers.values()):
            result["suspended"] = sorted({d for a in answers.values() for d in a.get("suspended", [])})
        return result


# -- /metrics -------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` on its own threads (one per request, with a timeout),
    reading the stats ring; anything else is 404."""

    def __init__(self, sock: socket.socket, ring_path: str) -> None:
        handler = type("Handler", (_MetricsHandler,), {"ring_path": ring_path})
        self._server = ThreadingHTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = sock
        self._server.daemon_threads = True
        sock.setblocking(True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._server.shutdown()


class _MetricsHandler(BaseHTTPRequestHandler):
    ring_path = ""
    timeout = EXCHANGE_TIMEOUT  # a client that sends nothing costs one thread this long
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self._reply(404, b"not found\n", "text/plain")
            return
        try:
            body = prometheus.render(ring.merge(ring.read(self.ring_path))).encode()
        except Exception as exc:  # a scrape must never take the supervisor down
            log.warning("metrics request failed: %s", exc)
            self._reply(500, b"stats unavailable\n", "text/plain")
            return
        self._reply(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # scrapes are not news
        pass
