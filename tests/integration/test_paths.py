"""Relative paths in the config file are taken from its directory, whatever
directory the relay and relayctl are started from."""

from __future__ import annotations

import json
import os

from support import inject, read_spool, relayctl


def test_relative_paths_resolve_against_the_config_file(relay_factory, tmp_path):
    relay = relay_factory(workers=1)
    etc = tmp_path / "etc"
    etc.mkdir()
    relay.config_path = str(etc / "relay.toml")
    relay.overrides = {"relay": {"spool_dir": "spool", "run_dir": "../run"},
                       "deliver": {"event_log_dir": "log"}}
    relay.spool_dir = str(etc / "spool")
    relay.write_config()
    relay.start()  # from tmp_path, not etc/
    queue_id = inject(relay, "app@sender.example", ["x@stuck.example"], b"Subject: x\r\n\r\nx\r\n")
    assert [m.queue_id for m in read_spool(str(etc / "spool"))] == [queue_id]
    assert not os.path.exists(tmp_path / "spool")
    assert os.path.exists(etc / "log" / "delivery-0.jsonl")
    assert os.path.exists(tmp_path / "run" / "control.sock")
    # relayctl, started elsewhere again, finds the same relay and spool.
    shown = relayctl(relay, "show", queue_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["in_queue"]
