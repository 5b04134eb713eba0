"""relayctl shaping: the traffic-shaping effects in force, and each site's
limits (what `deliver.shaping` and the scheduler decided).

* ``shaping [--json]`` — every effect (throttle, suspend, bounce): its id,
  site, what it changes, why (the reply and the rule that fired, or the
  repeated connection failures), since and expires; then every site with
  its effective limits, concurrency, connections and queued recipients;
* ``shaping cancel ID`` — end an effect now, automatic or manual.

``--json``: ``{"ok", "effects": [{"id", "site", "kind", "overrides",
"reason", "source", "since", "expires", "worker"}], "sites": [{"site",
"domains", "connection_limit", "concurrency", "max_message_rate",
"max_connection_rate", "max_deliveries_per_connection",
"learned_deliveries_per_connection", "connections", "queued",
"transactional_share", "chunking", "queued_bulk", "busy_bulk", "worker"}]}``;
cancel answers ``{"ok", "cancelled": EFFECT}``.
"""

from __future__ import annotations

import sys
import time

import orjson

from relay.cli.admin import _ask


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("shaping", help="traffic-shaping effects and site limits")
    parser.add_argument("action", nargs="?", choices=("list", "cancel"), default="list")
    parser.add_argument("id", nargs="?", type=int, help="the effect to cancel")
    parser.set_defaults(run=run)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def run(args) -> int:
    if args.action == "cancel":
        if args.id is None:
            print("relayctl: shaping cancel needs the effect's ID (from `relayctl shaping`)",
                  file=sys.stderr)
            return 1
        answer = _ask(args, {"op": "shaping_cancel", "id": args.id})
        if isinstance(answer, int):
            return answer
        if args.json:
            print(orjson.dumps(answer).decode())
        else:
            effect = answer["cancelled"]
            print(f"cancelled {effect['kind']} {effect['id']} on {effect['site']}")
        return 0
    answer = _ask(args, {"op": "shaping"})
    if isinstance(answer, int):
        return answer
    if args.json:
        print(orjson.dumps(answer).decode())
        return 0
    effects = answer.get("effects", [])
    print(f"{len(effects)} effect(s) in force")
    for e in effects:
        changes = ", ".join(f"{k}={v}" for k, v in e["overrides"].items()) or "-"
        print(f"  {e['id']:>6} {e['kind']:<8} {e['site']}  changes: {changes}\n"
              f"         since {_when(e['since'])}  expires {_when(e['expires'])}\n"
              f"         why: {e['reason']}")
    sites = answer.get("sites", [])
    print(f"{len(sites)} site(s) with mail or connections")
    for site in sites:
        rate = site["max_message_rate"] or "unlimited"
        print(f"  {site['site']}: {site['connections']}/{site['connection_limit']} connections"
              f" (concurrency {site['concurrency']}), {rate} messages,"
              f" {site['queued']} queued{', BDAT' if site.get('chunking') else ''},"
              f" worker {site['worker']}")
    return 0
