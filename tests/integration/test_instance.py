"""One relay per spool, start-up checks and the supervisor's signals,
through the real processes: a second instance, an orphaned worker, `relay
--check`, the listen backlog, reloads that cannot split the relay, SIGUSR1
and a /metrics client that says nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from support import ROOT, RelayProcess, free_port, inject, relayctl, wait_for

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_relay(*args: str, cwd: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.supervisor", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=ENV)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_second_instance_exits_2_naming_the_holder_and_the_first_keeps_working(relay_factory, tmp_path):
    first = relay_factory(workers=2).start()
    # Same spool and run directories, another listen port: it must not touch them.
    second = RelayProcess(first.directory, workers=2, port=free_port())
    second.config_path = str(tmp_path / "second.toml")
    second.write_config()
    control = os.path.join(first.directory, "run", "control.sock")
    before = os.stat(control).st_ino
    result = run_relay("-c", second.config_path, cwd=first.directory)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"pid {first.proc.pid}" in lines[0] and "another relay" in lines[0]
    assert "Traceback" not in result.stderr
    # The first relay's sockets are untouched and it still takes mail.
    assert os.stat(control).st_ino == before
    assert relayctl(first, "stats", "--json").returncode == 0
    for i in range(8):  # every worker: the second start rebound none of their sockets
        inject(first, "a@example.com", [f"r{i}@d{i}.example"], b"Subject: x\r\n\r\nx\r\n")
    assert "not reachable" not in first.log()


def test_supervisor_killed_its_workers_exit_and_a_new_start_succeeds(relay_factory):
    relay = relay_factory(workers=2).start()
    workers = relay.worker_pids()
    assert len(workers) == 2
    os.kill(relay.proc.pid, signal.SIGKILL)
    relay.proc.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=20,
             what="orphaned workers to exit by themselves")
    relay.start()  # the lock is free again once the last worker is gone
    inject(relay, "a@example.com", ["r@example.net"], b"Subject: x\r\n\r\nx\r\n")


def test_check_validates_and_names_the_bad_key(tmp_path):
    relay = RelayProcess(str(tmp_path), workers=1)
    ok = run_relay("--check", "-c", relay.config_path, cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout
    # --check takes no lock and recovers nothing: no spool appears.
    assert not os.path.exists(relay.spool_dir)

    relay.overrides = {"dkim": [{"domain": "example.com", "selector": "s1",
                                 "key_file": str(tmp_path / "missing.pem")}]}
    relay.write_config()
    bad = run_relay("--check", "-c", relay.config_path, cwd=str(tmp_path))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "missing.pem" in bad.stderr

    version = run_relay("--version", cwd=str(tmp_path))
    assert version.returncode == 0 and version.stdout.startswith("relay ")


def test_source_ip_not_of_this_host_stops_the_start(tmp_path):
    relay = RelayProcess(str(tmp_path), workers=1,
                         overrides={"relay": {"source_ips": ["127.0.0.1", "192.0.2.77"]}})
    result = run_relay("-c", relay.config_path, cwd=str(tmp_path))
    assert result.returncode == 2
    assert "[relay] source_ips: 192.0.2.77 is not an address of this host" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_address_taken_is_a_clean_error_before_any_socket(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        relay = RelayProcess(str(tmp_path), workers=1,
                             overrides={"stats": {"metrics_address": f"127.0.0.1:{port}"}})
        result = run_relay("-c", relay.config_path, cwd=str(tmp_path))
    finally:
        taken.close()
    assert result.returncode == 2
    assert f"[stats] metrics_address: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "run", "control.sock"))


def listen_backlog(port: int) -> int:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    # State Recv-Q Send-Q Local Peer: for a listener, Send-Q is the backlog.
    return max(int(line.split()[2]) for line in out.splitlines() if line.strip())


def test_listen_backlog_is_the_configured_one(relay_factory):
    relay = relay_factory(workers=2, relay={"listen_backlog": 777}).start()
    assert listen_backlog(relay.port) == 777


def test_reload_keeps_restart_only_keys_for_workers_forked_later(relay_factory, tmp_path):
    relay = relay_factory(workers=2).start()
    old_spool = relay.spool_dir
    new_spool = str(tmp_path / "elsewhere")
    relay.overrides = {"relay": {"spool_dir": new_spool, "log_level": "warning"}}
    relay.spool_dir = old_spool
    relay.write_config()
    relay.signal(signal.SIGHUP)
    relay.wait_log("take effect only after a restart: [relay] spool_dir")
    victim = relay.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(relay.worker_pids()) == 2 and victim not in relay.worker_pids(),
             timeout=20, what="the worker restarted")
    # The new worker opened the running spool, not the reloaded path (it
    # logs no "ready" at level warning: wait until both workers take mail).
    def takes_mail(i):
        try:
            inject(relay, "a@example.com", [f"r{i}@d{i}.example"], b"Subject: x\r\n\r\nx\r\n")
            return True
        except AssertionError:
            return False
    for i in range(8):
        wait_for(lambda: takes_mail(i), timeout=20, what=f"mail to d{i}.example accepted")
    assert not os.path.exists(new_spool)
    # The warning is said again at the next reload: the file still disagrees.
    relay.signal(signal.SIGHUP)
    relay.wait_log("take effect only after a restart: [relay] spool_dir", count=2)
    # log_level = warning applied on SIGHUP: the workers' info lines stop.
    time.sleep(1.0)
    assert " reloaded " not in relay.log().split("take effect only after a restart")[-1]


def test_sigusr1_reopens_the_delivery_log(relay_factory):
    relay = relay_factory(workers=1, deliver={"exclude_domains": ["drop.test"]}).start()
    log_path = os.path.join(relay.directory, "log", "delivery-0.jsonl")
    inject(relay, "a@example.com", ["one@drop.test"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: os.path.exists(log_path) and b"one@drop.test" in open(log_path, "rb").read(),
             what="the first dropped event")
    os.rename(log_path, log_path + ".1")  # what logrotate does
    relay.signal(signal.SIGUSR1)
    relay.wait_log("SIGUSR1")
    time.sleep(0.5)
    inject(relay, "a@example.com", ["two@drop.test"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: os.path.exists(log_path) and b"two@drop.test" in open(log_path, "rb").read(),
             what="the second event in a new delivery-0.jsonl")
    assert b"two@drop.test" not in open(log_path + ".1", "rb").read()


def test_silent_metrics_client_does_not_stall_the_supervisor(relay_factory):
    port = free_port()
    relay = relay_factory(workers=2, stats={"metrics_address": f"127.0.0.1:{port}"}).start()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        victim = relay.worker_pids()[0]
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(relay.worker_pids()) == 2 and victim not in relay.worker_pids(),
                 timeout=10, what="the worker restarted while /metrics clients say nothing")
        assert time.monotonic() - started < 3.0
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200") and b"relay_" in answer
    finally:
        for sock in silent:
            sock.close()
