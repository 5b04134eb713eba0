"""Figures of a run and of several: percentiles, medians, the table.

Input: the generator's injections, the sinks' receipts, process figures.
Output: one dict per run (the JSON the harness writes), the median of
several runs field by field, the ratio of two medians, and a plain-text
table for the terminal (with --ceiling, a column for the C-pair and a row
of each side's delivered/s as a fraction of it).
"""

from __future__ import annotations

import collections
import math
import statistics

from perf.loadgen import Injection, recipient_message

MB = 1024 * 1024
CEILING = "C-pair ceiling"  # the column of smtp-source -> smtp-sink (perf.ceiling)


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds (nearest rank), None when empty."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000, 1)

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": round(ordered[-1] * 1000, 1)}


def summarise(injections: list[Injection], receipts: list[tuple[float, tuple[str, ...]]],
              groups: dict[str, str]) -> dict:
    """Rates and latencies of one run, overall, by stream and by receiver group."""
    accepted = [i for i in injections if i.accepted]
    started = min((i.started for i in injections), default=0.0)
    finished = max((i.finished for i in accepted), default=started)
    first_delivery: dict[str, float] = {}
    duplicates = 0
    for when, rcpts in receipts:
        for address in rcpts:
            if address in first_delivery:
                duplicates += 1
            else:
                first_delivery[address] = when
    delivered_latency: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    last_by_stream: dict[str, float] = {}
    last_delivery = started
    for address, when in first_delivery.items():
        injection = injections[recipient_message(address)]
        group = groups.get(address.rpartition("@")[2], "?")
        latency = when - injection.started
        delivered_latency[("all", "")].append(latency)
        delivered_latency[("stream", injection.stream)].append(latency)
        delivered_latency[("group", group)].append(latency)
        last_delivery = max(last_delivery, when)
        last_by_stream[injection.stream] = max(last_by_stream.get(injection.stream, when), when)
    inject_seconds = max(finished - started, 1e-9)
    deliver_seconds = max(last_delivery - started, 1e-9)
    result = {
        "injected": len(accepted),
        "injected_recipients": sum(i.recipients for i in accepted),
        "failed": len(injections) - len(accepted),
        "delivered": len(first_delivery),
        "duplicates": duplicates,
        "inject_seconds": round(inject_seconds, 3),
        "deliver_seconds": round(deliver_seconds, 3),
        "injected_per_s": round(len(accepted) / inject_seconds, 1),
        "injected_recipients_per_s": round(sum(i.recipients for i in accepted) / inject_seconds, 1),
        "delivered_per_s": round(len(first_delivery) / deliver_seconds, 1),
        "inject_to_250_ms": percentiles([i.finished - i.started for i in accepted]),
        "inject_to_delivered_ms": percentiles(delivered_latency[("all", "")]),
        "by_stream": {},
        "by_group": {},
    }
    for name in sorted({i.stream for i in injections}):
        mine = [i for i in accepted if i.stream == name]
        result["by_stream"][name] = {
            "injected": len(mine),
            "delivered": len(delivered_latency[("stream", name)]),
            "inject_to_250_ms": percentiles([i.finished - i.started for i in mine]),
            "inject_to_delivered_ms": percentiles(delivered_latency[("stream", name)]),
            # When its last recipient arrived, in seconds from the run's first injection.
            "finished_s": round(last_by_stream[name] - started, 3) if name in last_by_stream else None,
        }
    kinds = {g for kind, g in delivered_latency if kind == "group"}
    if len(kinds) > 1:
        for group in sorted(kinds):
            result["by_group"][group] = {
                "delivered": len(delivered_latency[("group", group)]),
                "inject_to_delivered_ms": percentiles(delivered_latency[("group", group)]),
            }
    return result


# -- several runs ---------------------------------------------------------------------


def median(runs: list[dict]) -> dict:
    """Field-by-field median of runs with the same shape (numbers only)."""
    if not runs:
        return {}
    out = {}
    for key, value in runs[0].items():
        values = [run.get(key) for run in runs]
        if isinstance(value, dict):
            out[key] = median([v for v in values if isinstance(v, dict)])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers = [v for v in values if isinstance(v, (int, float))]
            out[key] = round(statistics.median(numbers), 3) if numbers else None
        elif value is None:
            numbers = [v for v in values if isinstance(v, (int, float))]
            out[key] = round(statistics.median(numbers), 3) if numbers else None
        else:
            out[key] = value
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def ratios(first: dict, second: dict) -> dict:
    """first/second for the figures that compare two servers or two set-ups."""
    return {
        "delivered_per_s": ratio(first.get("delivered_per_s"), second.get("delivered_per_s")),
        "injected_per_s": ratio(first.get("injected_per_s"), second.get("injected_per_s")),
        "injected_recipients_per_s": ratio(first.get("injected_recipients_per_s"),
                                           second.get("injected_recipients_per_s")),
        "inject_to_250_p50": ratio(first["inject_to_250_ms"]["p50"], second["inject_to_250_ms"]["p50"]),
        "inject_to_250_p99": ratio(first["inject_to_250_ms"]["p99"], second["inject_to_250_ms"]["p99"]),
        "inject_to_delivered_p50": ratio(first["inject_to_delivered_ms"]["p50"],
                                         second["inject_to_delivered_ms"]["p50"]),
        "inject_to_delivered_p99": ratio(first["inject_to_delivered_ms"]["p99"],
                                         second["inject_to_delivered_ms"]["p99"]),
        "server_cpu_seconds": ratio(first["cpu_seconds"]["server"], second["cpu_seconds"]["server"]),
    }


# -- the table ------------------------------------------------------------------------------


def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value / scale:,.{digits}f}"


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


ROWS = [
    ("injected (messages)", lambda r: _fmt(r["injected"], digits=0)),
    ("failed at intake", lambda r: _fmt(r["failed"], digits=0)),
    ("delivered (recipients)", lambda r: _fmt(r["delivered"], digits=0)),
    ("duplicates", lambda r: _fmt(r["duplicates"], digits=0)),
    ("injected/s", lambda r: _fmt(r["injected_per_s"])),
    ("accepted recipients/s", lambda r: _fmt(r["injected_recipients_per_s"])),
    ("delivered/s", lambda r: _fmt(r["delivered_per_s"])),
    ("delivered/s / C-pair ceiling", lambda r: _fmt(r["ceiling_fraction"], digits=3)),
    ("inject->250 p50/p90/p99 ms", lambda r: "/".join(
        _ms(r["inject_to_250_ms"][p]) for p in ("p50", "p90", "p99"))),
    ("inject->delivered p50/p90/p99 ms", lambda r: "/".join(
        _ms(r["inject_to_delivered_ms"][p]) for p in ("p50", "p90", "p99"))),
    ("CPU s server/generator/sinks", lambda r: "/".join(
        _fmt(r["cpu_seconds"][k]) for k in ("server", "generator", "sinks"))),
    ("peak PSS MB (server tree, sampled)", lambda r: _fmt(r["sampled_peak_pss_bytes"], MB)),
    ("peak RSS MB (relay workers, VmHWM)", lambda r: _fmt(r.get("peak_rss_bytes"), MB)),
    ("outbound connections", lambda r: _fmt(r["outbound_connections"], digits=0)),
    ("outbound transactions", lambda r: _fmt(r["outbound_transactions"], digits=0)),
    ("drain limit reached (0/1)", lambda r: _fmt(r["timed_out"], digits=0)),
]


# Shown only when some column has the figure.
OPTIONAL = {"delivered/s / C-pair ceiling": "ceiling_fraction"}


def table(columns: dict[str, dict]) -> str:
    """Rows of figures, one column per label (e.g. relay, postfix, ratio)."""
    labels = list(columns)
    lines = []
    width = max(len(name) for name, _ in ROWS) + 2
    lines.append("".ljust(width) + "".join(label.rjust(28) for label in labels))
    for name, render in ROWS:
        key = OPTIONAL.get(name)
        if key and not any(key in columns[label] for label in labels):
            continue
        cells = []
        for label in labels:
            try:
                cells.append(render(columns[label]))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(name.ljust(width) + "".join(cell.rjust(28) for cell in cells))
    extra = []
    for label in labels:
        run = columns[label]
        for section in ("by_stream", "by_group"):
            found = run.get(section) or {}
            if len(found) < 2:
                continue
            for name, figures in found.items():
                lat = figures.get("inject_to_delivered_ms", {})
                extra.append(
                    f"  {label} {section[3:]} {name}: delivered {_fmt(figures.get('delivered'), digits=0)},"
                    f" inject->delivered p50/p99 {_ms(lat.get('p50'))}/{_ms(lat.get('p99'))} ms"
                    + (f", last delivered at {figures['finished_s']:.1f} s"
                       if figures.get("finished_s") is not None else "")
                )
    return "\n".join(lines + extra)
