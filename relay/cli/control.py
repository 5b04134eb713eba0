"""relayctl's side of the control socket: ask the running relay.

Input: the settings (where ``run_dir`` is) and a request.  Output: the
supervisor's JSON answer, or ``NotRunning`` when no relay answers.  The
wire format is one JSON object per line each way (the supervisor's
``relay.control`` serves it).
"""

from __future__ import annotations

import os
import socket

import orjson

CONTROL_SOCKET = "control.sock"
TIMEOUT = 30.0


class NotRunning(Exception):
    """No relay answers on the control socket."""


class ControlError(Exception):
    """The relay answered with an error."""


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, CONTROL_SOCKET)


def request(run_dir: str, message: dict, timeout: float = TIMEOUT) -> dict:
    """Send one request to the supervisor and return its answer."""
    path = socket_path(run_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(orjson.dumps(message) + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"the relay is not running (no control socket at {path})") from None
    except OSError as exc:
        raise NotRunning(f"the relay does not answer on {path}: {exc.strerror or exc}") from None
    if not data:
        raise NotRunning(f"the relay closed the control socket at {path} without an answer")
    answer = orjson.loads(data)
    if not answer.get("ok", False):
        raise ControlError(answer.get("error", "the relay refused the request"))
    return answer


def status(run_dir: str) -> dict:
    """{"ok", "pid", "workers": [{"index", "pid"}...], "config"} of the running relay."""
    return request(run_dir, {"op": "status"})
