"""Smoke tests of the perf harness and the host tuning scripts.

Correctness only, never timing: ``perf/bench --scenario transactional
--quick`` runs end to end (fake internet, real relay, load generator) and
its JSON holds every field with every injected message delivered once,
and with ``--dkim`` the sinks count two signatures on every message and
verify one message's;
the relay config of ``--dkim --tls`` signs twice and takes and delivers
over verified STARTTLS (one message, no benchmark);
``scripts/tune-host --check`` and ``scripts/nofile --check`` run and name
what they check.  --apply is never run here: it changes the host.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


def run(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(ROOT, *argv[0].split("/")), *argv[1:]],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL,
    )


def test_bench_transactional_quick(tmp_path):
    output = tmp_path / "bench.json"
    done = run("perf/bench", "--scenario", "transactional", "--quick", "--dkim", "--json", str(output),
               timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["scenario"] == "transactional" and result["quick"] is True
    assert set(result["machine"]) >= {"nproc", "cpu", "memory_bytes", "kernel", "python"}
    (figures,) = result["runs"]["relay"]
    for key in ("injected", "delivered", "injected_per_s", "delivered_per_s",
                "inject_to_250_ms", "inject_to_delivered_ms", "cpu_seconds",
                "peak_rss_bytes", "sampled_peak_pss_bytes", "outbound_connections"):
        assert key in figures, key
    for key in ("p50", "p90", "p99"):
        assert figures["inject_to_250_ms"][key] is not None
        assert figures["inject_to_delivered_ms"][key] is not None
    assert set(figures["cpu_seconds"]) >= {"server", "generator", "sinks"}
    assert figures["failed"] == 0
    assert figures["injected"] == 1000
    assert figures["delivered"] == figures["injected"]
    assert figures["duplicates"] == 0
    assert figures["outbound_connections"] >= 1
    assert figures["peak_rss_bytes"] > 0
    assert figures["outbound_signed_transactions"] == figures["outbound_transactions"] == 1000
    assert figures["outbound_dkim_signatures"] == 2000
    assert figures["dkim_sample_verified"] == [True, True]
    assert "delivered/s" in done.stdout  # the table
    assert ("relay: 1,000 of 1,000 transactions signed, 2,000 signatures;"
            " first signed message of each run: ok (2 of 2)") in done.stdout


def test_dkim_and_tls_options_sign_and_encrypt_both_hops(tmp_path):
    import asyncio
    import time

    from perf import options as bench_options
    from perf.loadgen import Generator, Stream
    from perf.mta import Relay
    from relay.testing.fakenet import TLS_ON, Behaviour, FakeInternet

    options = bench_options.Options(dkim=True, tls=True)
    files = bench_options.make_files(str(tmp_path), options)
    with FakeInternet() as net:
        (sink,) = net.add_domain("d0000.example", ["127.0.0.10"], behaviour=Behaviour(tls=TLS_ON))
        overrides = bench_options.relay_overrides(options, files, net.farm.ca_cert_path)
        (tmp_path / "relay").mkdir()
        relay = Relay(str(tmp_path / "relay"), workers=1, deliver_to=net.config_overrides(),
                      overrides=overrides)
        relay.start()
        try:
            generator = Generator("127.0.0.1", relay.port, tls=bench_options.client_context(files),
                                  server_hostname=bench_options.INTAKE_NAME)
            asyncio.run(generator.run([Stream("one", 1, ("d0000.example",))], time.monotonic() + 20))
            assert [i.code for i in generator.injections] == [250], generator.errors
            (received,) = sink.wait_received(1, timeout=20)
        finally:
            relay.stop()
    assert received.tls
    assert bench_options.verify_sample(received.data, files) == [True, True]


def test_tune_host_check():
    done = run("scripts/tune-host", "--check", timeout=30)
    assert done.returncode == 0, done.stderr
    for key in ("fs.file-max", "fs.nr_open", "net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
                "net.ipv4.ip_local_port_range", "net.ipv4.tcp_tw_reuse",
                "net.netfilter.nf_conntrack_max", "net.core.netdev_max_backlog"):
        assert key in done.stdout, key


def test_tune_host_dry_run_writes_nothing():
    done = run("scripts/tune-host", "--dry-run", timeout=30)
    assert done.returncode == 0, done.stderr
    assert "/etc/sysctl.d/90-relay.conf" in done.stdout
    assert "sysctl -p" in done.stdout


def test_nofile_check():
    done = run("scripts/nofile", "--check", timeout=30)
    assert done.returncode == 0, done.stderr
    for text in ("RLIMIT_NOFILE", "fs.nr_open", "LimitNOFILE", "relay.service.d/nofile.conf",
                 "/etc/security/limits.d/90-relay.conf"):
        assert text in done.stdout, text


def test_nofile_dry_run_writes_nothing():
    done = run("scripts/nofile", "--dry-run", timeout=30)
    assert done.returncode == 0, done.stderr
    assert "LimitNOFILE=" in done.stdout and "nofile" in done.stdout
