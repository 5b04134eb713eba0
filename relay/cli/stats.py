"""relayctl stats [--json] [--watch]: the relay's figures, straight from the
stats ring in shared memory (no worker is asked).

``--json`` prints ``ring.merge()``: ``{"workers": n, "counters": {...},
"gauges": {...}, "histograms": {"data_to_250": {"buckets": [...],
"counts": [...], "sum": s, "p50": x, "p99": x}, "accept_to_delivered":
{...}, "accept_to_delivered_transactional": {...},
"accept_to_delivered_bulk": {...}}, "top_destinations": [[name, load], ...],
"campaigns": [{"name", "delivered", "deferred", "bounced", "dropped"}, ...]
(the busiest), "campaigns_other": {...} (the rest summed), "per_worker":
[{"worker": i, "counters": {...}, "gauges": {...}}, ...]}``.  Counters per
lane: ``accepted_|delivered_|deferred_|bounced_transactional|bulk``.
"""

from __future__ import annotations

import sys
import time

import orjson

from relay import accel, config
from relay.cli.control import NotRunning, status
from relay.errors import ConfigError
from relay.model import LANES
from relay.stats import ring

WATCH_INTERVAL = 1.0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("stats", help="counters, gauges and latencies of the running relay")
    parser.add_argument("--watch", action="store_true", help="refresh every second, like top")
    parser.set_defaults(run=run)


def collect(run_dir: str) -> dict:
    snapshots = ring.read(ring.ring_path(run_dir))
    merged = ring.merge(snapshots)
    merged["per_worker"] = [
        {"worker": s.worker, "counters": s.counters, "gauges": s.gauges} for s in snapshots
    ]
    merged["implementation"] = accel.IMPLEMENTATION
    return merged


def _ms(value) -> str:
    return "-" if value is None else ("inf" if value == float("inf") else f"{value * 1000:.0f} ms")


def render(stats: dict) -> str:
    c, g, h = stats["counters"], stats["gauges"], stats["histograms"]
    rejected = sum(v for k, v in c.items() if k.startswith("rejected_"))
    lines = [
        f"workers {stats['workers']}   uptime {g['uptime']:.0f}s   restarts {g['restarts']:.0f}"
        f"   hot path {stats['implementation']}",
        "",
        f"{'intake':<14}{'connections':>13}{'messages':>11}{'recipients':>12}{'bytes':>14}{'rejected':>10}",
        f"{'':<14}{c['connections']:>13}{c['accepted_messages']:>11}{c['accepted_recipients']:>12}"
        f"{c['accepted_bytes']:>14}{rejected:>10}",
        "",
        f"{'delivery':<14}{'delivered':>13}{'deferred':>11}{'bounced':>12}{'dropped':>14}{'DSNs':>10}",
        f"{'':<14}{c['delivered']:>13}{c['deferred']:>11}{c['bounced']:>12}{c['dropped']:>14}"
        f"{c['dsn_queued']:>10}",
        "",
        f"{'queues':<14}{'ready':>13}{'deferred':>11}{'held':>12}{'in conns':>14}{'out conns':>10}",
        f"{'':<14}{g['ready']:>13.0f}{g['deferred_queue']:>11.0f}{g['held']:>12.0f}"
        f"{g['inbound_connections']:>14.0f}{g['outbound_connections']:>10.0f}",
        "",
        f"latency        DATA->250 p50 {_ms(h['data_to_250']['p50'])}, p99 {_ms(h['data_to_250']['p99'])};"
        f" accept->delivered p50 {_ms(h['accept_to_delivered']['p50'])},"
        f" p99 {_ms(h['accept_to_delivered']['p99'])}",
        *(f"{'  ' + lane:<15}accepted {c[f'accepted_{lane}']}, delivered {c[f'delivered_{lane}']},"
          f" deferred {c[f'deferred_{lane}']}, bounced {c[f'bounced_{lane}']};"
          f" accept->delivered p50 {_ms(h[f'accept_to_delivered_{lane}']['p50'])},"
          f" p99 {_ms(h[f'accept_to_delivered_{lane}']['p99'])}" for lane in LANES),
        f"process        rss {g['rss_bytes'] / 2**20:.1f} MiB   cpu {g['cpu_user']:.1f}s user"
        f" {g['cpu_system']:.1f}s sys   fds {g['open_fds']:.0f}   gc {g['gc_seconds']:.2f}s",
    ]
    if any(k.startswith("rejected_") and v for k, v in c.items()):
        lines.append("rejections     " + ", ".join(
            f"{k[9:]} {v}" for k, v in c.items() if k.startswith("rejected_") and v))
    if any(c[k] for k in c if k.startswith("amqp_")) or g["feed_lag_events"] or g["feed_lag_failures"]:
        lines.append(
            f"amqp           consumed {c['amqp_consumed']}, acked {c['amqp_acked']}, nacked"
            f" {c['amqp_nacked']}, failed {c['amqp_failed']}, duplicates {c['amqp_duplicates']};"
            f" feeds published {c['feed_published']}, errors {c['feed_errors']},"
            f" lag events {g['feed_lag_events']:.0f}, failures {g['feed_lag_failures']:.0f}")
    failures = [f"{k} {v}" for k, v in c.items() if k.startswith(("deferred_", "bounced_")) and v
                and not k.endswith(LANES)]
    if failures:
        lines.append("failures       " + ", ".join(failures))
    if stats.get("campaigns"):
        lines.append("campaigns      " + ", ".join(
            f"{c['name']} ({c['delivered']} delivered)" for c in stats["campaigns"]))
    if stats["top_destinations"]:
        lines.append("busiest        " + ", ".join(f"{d} ({n})" for d, n in stats["top_destinations"]))
    return "\n".join(lines)


def run(args) -> int:
    try:
        settings = config.load(args.config)
        status(settings.relay.run_dir)
    except ConfigError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 2
    except NotRunning as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return 1
    while True:
        try:
            stats = collect(settings.relay.run_dir)
        except (OSError, ValueError) as exc:
            print(f"relayctl: cannot read the stats ring: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(orjson.dumps(stats).decode())
        else:
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(render(stats))
        if not args.watch:
            return 0
        sys.stdout.flush()
        try:
            time.sleep(WATCH_INTERVAL)
        except KeyboardInterrupt:
            return 0
