"""The servers under test: the relay, or a throwaway Postfix, in a temp dir.

Input: a working directory, a listen port, where to deliver (the fake
internet's DNS and MX port, or static routes per domain) and the limits
to use.  Output: a running server that answers SMTP on 127.0.0.1:port,
its process ids (for CPU and memory), and a clean stop.

Both are started the way an operator would start them: the relay as
``python -m relay.supervisor -c FILE`` with a generated config, Postfix as
``postfix -c DIR start`` with its own config_directory, queue_directory and
data_directory (nothing of the system's Postfix is read or touched), and
with --dkim its signing milters, OpenDKIM, as ``opendkim -f -x FILE``
(their CPU and memory count as Postfix's).  The harness never installs anything:
``postfix_path()`` is None when Postfix is absent and the caller skips the
comparison; without OpenDKIM, Postfix runs unsigned.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import tomli_w

from perf import procstat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_TIMEOUT = 120.0  # a spool of a million deferred messages is opened too


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def read_log(path: str) -> str:
    """A server's log so far ("" before it has written one)."""
    try:
        with open(path, "rb") as file:
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def wait_greeting(port: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(100).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing greets on port {port} after {timeout}s")


# -- the relay -------------------------------------------------------------------


class Relay:
    name = "relay"

    def __init__(self, directory: str, *, workers: int, deliver_to: dict,
                 routes: dict[str, tuple[str, int]] | None = None,
                 overrides: dict | None = None, tree: str | None = None) -> None:
        self.directory = directory
        # Where `relay` is imported from: this checkout, or an exported
        # commit, so a benchmark measures a fixed revision while the
        # checkout changes under it.
        self.tree = tree or ROOT
        self.workers = workers
        self.port = free_port()
        self.config_path = os.path.join(directory, "relay.toml")
        self.log_path = os.path.join(directory, "relay.log")
        self.spool_dir = os.path.join(directory, "spool")
        self.event_log_dir = os.path.join(directory, "log")
        self.proc: subprocess.Popen | None = None
        doc = {
            "relay": {
                "hostname": "relay.test",
                "workers": workers,
                "spool_dir": self.spool_dir,
                "run_dir": os.path.join(directory, "run"),
                "shutdown_timeout": "20s",
            },
            "listen": [{"address": f"127.0.0.1:{self.port}"}],
            "intake": {},
            "dns": dict(deliver_to.get("dns", {})),
            "deliver": {
                # Sinks are plaintext; a short schedule so 421s and timeouts retry within a run.
                "tls": "none",
                "retry_schedule": ["1s", "2s", "5s", "10s"],
                "event_log_dir": self.event_log_dir,
                **deliver_to.get("deliver", {}),
            },
        }
        if routes:
            doc["routes"] = {domain: f"{ip}:{port}" for domain, (ip, port) in routes.items()}
        for section, values in (overrides or {}).items():
            if isinstance(values, list):  # an array of tables ([[dkim]])
                doc[section] = values
            else:
                doc.setdefault(section, {}).update(values)
        with open(self.config_path, "w") as file:
            file.write(tomli_w.dumps(doc))

    def start(self) -> "Relay":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay.supervisor", "-c", self.config_path],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.directory,
                env={**os.environ,
                     "PYTHONPATH": self.tree + os.pathsep + os.environ.get("PYTHONPATH", "")},
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while self.log().count(" ready") < self.workers or len(self.worker_pids()) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay did not start:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        wait_greeting(self.port, READY_TIMEOUT, lambda: self.proc.poll() is None)
        return self

    def relayctl(self, *args: str) -> str:
        """Run ``relayctl`` (of the same tree) against this relay; its output."""
        done = subprocess.run(
            [sys.executable, "-m", "relay.cli", "-c", self.config_path, *args],
            capture_output=True, text=True, timeout=60, cwd=self.directory,
            env={**os.environ,
                 "PYTHONPATH": self.tree + os.pathsep + os.environ.get("PYTHONPATH", "")})
        if done.returncode != 0:
            raise RuntimeError(f"relayctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def log(self) -> str:
        return read_log(self.log_path)

    @property
    def root_pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return procstat.children(self.proc.pid) if self.proc else []

    def cpu_seconds(self) -> float:
        return procstat.tree_cpu_seconds(self.proc.pid)

    def rss_bytes(self) -> int:
        """Resident memory of the workers (the supervisor holds no mail)."""
        return sum(procstat.rss_bytes(pid) for pid in self.worker_pids())

    def pss_bytes(self) -> int:
        return sum(procstat.pss_bytes(pid) for pid in procstat.tree(self.proc.pid))

    def peak_rss(self) -> list[int]:
        return [procstat.peak_rss_bytes(pid) for pid in self.worker_pids()]

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise RuntimeError(f"relay did not stop within {timeout}s")


# -- Postfix ----------------------------------------------------------------------


def system_command(name: str) -> str | None:
    """Where a Debian package's daemon command is: on PATH, or in /usr/sbin
    (which a non-login root shell may not have on PATH); None if absent."""
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)


def postfix_path() -> str | None:
    """The postfix command, or None when Debian's postfix is not installed."""
    found = system_command("postfix")
    if found is None or os.geteuid() != 0:
        return None  # a throwaway instance needs root (it drops to the postfix user)
    return found


MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
{extra}"""

# With STARTTLS: the TLS session cache and PRNG (tlsmgr), and tlsproxy,
# through which smtp(8) reuses TLS connections (smtp_tls_connection_reuse).
MASTER_CF_TLS = """\
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
tlsproxy  unix  -       -       n       -       0       tlsproxy
"""


class OpenDkim:
    """OpenDKIM in the foreground, the milter that signs for the Postfix
    under test; ``files``: its config files (name -> text, perf.options'
    ``opendkim_files``), written under ``directory``."""

    def __init__(self, command: str, directory: str, port: int, files: dict[str, str]) -> None:
        self.command = command
        self.directory = directory
        self.port = port
        self.log_path = os.path.join(directory, "opendkim.log")
        self.proc: subprocess.Popen | None = None
        os.makedirs(directory, exist_ok=True)
        for name, text in files.items():
            with open(os.path.join(directory, name), "w") as file:
                file.write(text)

    def start(self) -> "OpenDkim":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.command, "-f", "-x", os.path.join(self.directory, "opendkim.conf")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opendkim exited at start: {self.log()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"opendkim does not listen on port {self.port}") from None
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Postfix:
    """A Postfix instance of its own under ``directory`` (root only)."""

    name = "postfix"

    def __init__(self, directory: str, *, routes: dict[str, tuple[str, int]],
                 concurrency: int, messages_per_connection: int, processes: int = 500,
                 main_cf: dict[str, str] | None = None, tls_policy: str = "",
                 milters: list[OpenDkim] | tuple[OpenDkim, ...] = ()) -> None:
        """``main_cf``: parameters added to (or replacing) the harness's;
        ``tls_policy``: the text of an smtp_tls_policy_maps table (with
        STARTTLS on, tlsmgr and tlsproxy run too); ``milters``: started
        before Postfix and stopped after it, their CPU and memory counted in
        Postfix's (``main_cf`` must name them in smtpd_milters)."""
        self.directory = directory
        self.milters = tuple(milters)
        self.port = free_port()
        self.config_dir = os.path.join(directory, "etc")
        self.queue_dir = os.path.join(directory, "queue")
        self.data_dir = os.path.join(directory, "data")
        self.log_path = os.path.join(directory, "maillog")
        self.command = postfix_path()
        if self.command is None:
            raise RuntimeError("postfix is not installed (or not run as root)")
        # The postfix user must reach the queue through every parent.
        os.chmod(directory, 0o755)
        os.makedirs(self.config_dir)
        os.makedirs(self.queue_dir)  # root-owned; `postfix start` makes what is inside
        os.makedirs(self.data_dir)
        shutil.chown(self.data_dir, "postfix")
        with open(os.path.join(self.config_dir, "transport"), "w") as file:
            for domain, (ip, port) in sorted(routes.items()):
                file.write(f"{domain} smtp:[{ip}]:{port}\n")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "maillog_file": self.log_path,
            "maillog_file_prefixes": directory,  # the default allows /var only
            "myhostname": "postfix.test",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_peername_lookup": "no",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "smtp_dns_support_level": "disabled",
            "transport_maps": f"texthash:{self.config_dir}/transport",
            "alias_maps": "",
            "alias_database": "",
            # The relay's limits: connections per destination (the relay's
            # per-worker limit times its workers) and messages per connection.
            "default_process_limit": str(processes),
            "default_destination_concurrency_limit": str(concurrency),
            "smtp_destination_concurrency_limit": str(concurrency),
            "initial_destination_concurrency": str(concurrency),
            "smtp_connection_reuse_count_limit": str(messages_per_connection),
            "default_destination_recipient_limit": "1000",
            # Both sides retry on the same short schedule within a run.
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "10s",
            "queue_run_delay": "1s",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
        }
        settings.update(main_cf or {})
        if tls_policy:
            with open(os.path.join(self.config_dir, "tls_policy"), "w") as file:
                file.write(tls_policy)
            settings["smtp_tls_policy_maps"] = f"texthash:{self.config_dir}/tls_policy"
        tls = settings["smtpd_tls_security_level"] != "none" or settings["smtp_tls_security_level"] != "none"
        with open(os.path.join(self.config_dir, "main.cf"), "w") as file:
            file.writelines(f"{key} = {value}\n" for key, value in settings.items())
        with open(os.path.join(self.config_dir, "master.cf"), "w") as file:
            file.write(MASTER_CF.format(port=self.port, extra=MASTER_CF_TLS if tls else ""))

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.command, "-c", self.config_dir, *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check, timeout=120,
        )

    def start(self) -> "Postfix":
        try:
            for milter in self.milters:
                milter.start()
            self._postfix("start")
            wait_greeting(self.port, READY_TIMEOUT)
        except subprocess.CalledProcessError as exc:
            self.stop()
            raise RuntimeError(
                f"postfix did not start: {exc.stderr.strip()}\n{self.log()[-2000:]}"
            ) from None
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def root_pid(self) -> int:
        with open(os.path.join(self.queue_dir, "pid", "master.pid")) as file:
            return int(file.read().strip())

    def worker_pids(self) -> list[int]:
        """Every process of this Postfix, and its milters'."""
        milters = [pid for milter in self.milters if milter.pid for pid in procstat.tree(milter.pid)]
        return procstat.tree(self.root_pid) + milters

    def cpu_seconds(self) -> float:
        milters = sum(procstat.tree_cpu_seconds(milter.pid) for milter in self.milters if milter.pid)
        return procstat.tree_cpu_seconds(self.root_pid) + milters

    def rss_bytes(self) -> int:
        return sum(procstat.rss_bytes(pid) for pid in self.worker_pids())

    def pss_bytes(self) -> int:
        return sum(procstat.pss_bytes(pid) for pid in self.worker_pids())

    def peak_rss(self) -> list[int]:
        return [procstat.peak_rss_bytes(pid) for pid in self.worker_pids()]

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self, timeout: float = 60.0) -> int:
        try:
            self._stop_postfix(timeout)
        finally:
            for milter in self.milters:
                milter.stop()
        return 0

    def _stop_postfix(self, timeout: float) -> None:
        try:
            master = self.root_pid
        except (FileNotFoundError, ValueError):
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{master}") and time.monotonic() < deadline:
            time.sleep(0.1)
        if os.path.exists(f"/proc/{master}"):
            self._postfix("abort", check=False)


# -- a cluster of relays ----------------------------------------------------------


class Cluster:
    """``hosts`` relay instances on this machine sharing the local RabbitMQ
    ([cluster]): each with its own port, spool, run dir and source IP
    (127.0.3.<index+1>), its shard queues named for this run and deleted
    at the end.  The generator spreads its connections over every
    instance's port; figures are the sum over the instances."""

    name = "relay"

    def __init__(self, directory: str, *, hosts: int, workers: int, deliver_to: dict,
                 amqp_url: str, overrides: dict | None = None, tree: str | None = None) -> None:
        self.prefix = f"relay-bench-{os.path.basename(directory)}-shard"
        self.amqp_url = amqp_url
        self.hosts = hosts
        self.relays = []
        for index in range(hosts):
            sub = os.path.join(directory, f"host{index}")
            os.makedirs(sub)
            cluster = {"hosts": hosts, "index": index, "amqp_url": amqp_url,
                       "queue_prefix": self.prefix}
            extra = {**(overrides or {}), "relay": {"source_ips": [f"127.0.3.{index + 1}"]}}
            if hosts > 1:
                extra["cluster"] = cluster
            self.relays.append(Relay(sub, workers=workers, deliver_to=deliver_to, overrides=extra,
                                     tree=tree))
        self.port = self.relays[0].port
        self.ports = tuple(relay.port for relay in self.relays)

    @property
    def spool_dir(self) -> str:
        return self.relays[0].spool_dir

    @property
    def root_pid(self) -> int:
        return self.relays[0].root_pid

    def start(self) -> "Cluster":
        for relay in self.relays:
            relay.start()
        return self

    def cpu_seconds(self) -> float:
        return sum(relay.cpu_seconds() for relay in self.relays)

    def rss_bytes(self) -> int:
        return sum(relay.rss_bytes() for relay in self.relays)

    def pss_bytes(self) -> int:
        return sum(relay.pss_bytes() for relay in self.relays)

    def peak_rss(self) -> list[int]:
        return [rss for relay in self.relays for rss in relay.peak_rss()]

    def stop(self, timeout: float = 60.0) -> int:
        codes = [relay.stop(timeout) for relay in self.relays]
        if self.hosts > 1:
            _delete_queues(self.amqp_url, [f"{self.prefix}.{i}{bad}" for i in range(self.hosts)
                                           for bad in ("", ".bad")])
        return max(codes)


def _delete_queues(url: str, names: list[str]) -> None:
    import asyncio

    import aio_pika

    async def go():
        connection = await aio_pika.connect(url, timeout=10)
        try:
            for name in names:
                channel = await connection.channel()
                try:
                    await channel.queue_delete(name)
                except Exception:  # not declared (a host that never started): nothing to delete
                    pass
        finally:
            await connection.close()

    asyncio.run(go())
