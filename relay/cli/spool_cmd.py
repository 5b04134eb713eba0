"""relayctl spool check: is every worker's spool file sound?

Input: the settings (``relay.spool_dir``); ``--quick`` (SQLite's
``quick_check`` instead of the full ``integrity_check``) and ``--json``.
Works whether or not the relay runs; the files are opened read-only
(relay.spool.check).  Output: per ``worker-N.db`` ``ok`` or its problems,
one per line; with ``--json`` one object:

    {"ok": false,
     "files": [{"file": "worker-0.db", "ok": true, "problems": []},
               {"file": "worker-1.db", "ok": false,
                "problems": ["file is not a database"]}]}

Exit status 0 when every file is sound, 1 when any is damaged (or the
spool directory is missing), 2 for a bad configuration.
"""

from __future__ import annotations

import os

import orjson

from relay import config
from relay.cli.spoolread import fail
from relay.errors import ConfigError
from relay.spool.check import check_file
from relay.spool.recover import existing_spools


def add_parser(subparsers) -> None:
    spool = subparsers.add_parser("spool", help="check the spool files",
                                  description="Spool maintenance.")
    actions = subparsers.add_subverbs(spool, dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="SQLite's integrity check of every worker's spool file",
        description="Run SQLite's integrity check on every worker's spool file (read-only).")
    check.add_argument("--quick", action="store_true",
                       help="quick_check: faster, does not compare index contents")
    check.set_defaults(run=run_check)


def run_check(args) -> int:
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        return fail(str(exc), 2)
    spool_dir = settings.relay.spool_dir
    if not os.path.isdir(spool_dir):
        return fail(f"spool directory {spool_dir} does not exist (relay.spool_dir in {args.config})")
    files = []
    for _, path in sorted(existing_spools(spool_dir).items()):
        problems = check_file(path, quick=args.quick)
        files.append({"file": os.path.basename(path), "ok": not problems, "problems": problems})
    sound = all(f["ok"] for f in files)
    if args.json:
        print(orjson.dumps({"ok": sound, "files": files}).decode())
        return 0 if sound else 1
    if not files:
        print(f"no spool files in {spool_dir}")
    for f in files:
        if f["ok"]:
            print(f"{f['file']}: ok")
        for problem in f["problems"]:
            print(f"{f['file']}: {problem}")
    return 0 if sound else 1
