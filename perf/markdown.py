"""Markdown tables from perf/bench JSON files, for perf/RESULTS.md.

Input: JSON files written by ``perf/bench --json``.  Output: on stdout,
per file, the options the run had (--dkim, --tls: which side signed), a
table of the medians (one column per side: relay, postfix, or
relay-empty / relay-deferred) with the ratio column where there is one
and, after a --ceiling run, the C-pair's column and each side's fraction
of it, and the per-run figures that show the spread.

Usage: python -m perf.markdown FILE.json [...]
"""

from __future__ import annotations

import json
import sys

from perf.options import summary

MB = 1024 * 1024


def _n(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ms(lat: dict) -> str:
    return " / ".join(_n(lat.get(p), 0 if (lat.get(p) or 0) >= 100 else 1) for p in ("p50", "p90", "p99"))


ROWS = [
    ("injected (messages)", lambda r: _n(r["injected"])),
    ("delivered (recipients)", lambda r: _n(r["delivered"])),
    ("failed / duplicates", lambda r: f"{_n(r['failed'])} / {_n(r['duplicates'])}"),
    ("injected/s (messages)", lambda r: _n(r["injected_per_s"], 1)),
    ("delivered/s (recipients)", lambda r: _n(r["delivered_per_s"], 1)),
    ("inject→250 p50 / p90 / p99 ms", lambda r: _ms(r["inject_to_250_ms"])),
    ("inject→delivered p50 / p90 / p99 ms", lambda r: _ms(r["inject_to_delivered_ms"])),
    ("CPU s: server / generator / sinks", lambda r: " / ".join(
        _n(r["cpu_seconds"].get(k), 1) for k in ("server", "generator", "sinks"))),
    ("peak PSS of the server's processes, MB", lambda r: _n(r["sampled_peak_pss_bytes"] / MB, 1)),
    ("peak RSS of the relay workers (VmHWM sum), MB",
     lambda r: _n(r["peak_rss_bytes"] / MB, 1) if r.get("peak_rss_bytes") else "-"),
    ("outbound connections / transactions", lambda r: f"{_n(r['outbound_connections'])} / "
                                                     f"{_n(r['outbound_transactions'])}"),
    # "runs that hit the drain limit" is counted over the runs (see render)
]

CEILING_ROW = "delivered/s as a fraction of the C-pair ceiling"
# The rows the C-pair has figures for (smtp-source is its generator, smtp-sink its sink).
CEILING_ROWS = {"injected (messages)", "delivered (recipients)", "injected/s (messages)",
                "delivered/s (recipients)", "CPU s: server / generator / sinks"}

RATIO_KEYS = {
    "delivered/s (recipients)": "delivered_per_s",
    "injected/s (messages)": "injected_per_s",
}


def render(result: dict) -> str:
    if result["scenario"] == "idle-connections":
        return render_idle(result)
    sides = list(result["median"])
    ratio = result.get("ratio")
    pair = result.get("ceiling")
    header = (["", *sides] + ([f"ratio {ratio['of']}"] if ratio else [])
              + (["C-pair ceiling (smtp-source → smtp-sink)"] if pair else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, cell in ROWS:
        cells = []
        for side in sides:
            try:
                cells.append(cell(result["median"][side]))
            except (KeyError, TypeError):
                cells.append("-")
        if ratio:
            key = RATIO_KEYS.get(name)
            if key:
                cells.append(_n(ratio.get(key), 2))
            elif name.startswith("inject→delivered"):
                cells.append(f"p50 {_n(ratio.get('inject_to_delivered_p50'), 2)},"
                             f" p99 {_n(ratio.get('inject_to_delivered_p99'), 2)}")
            elif name.startswith("inject→250"):
                cells.append(f"p50 {_n(ratio.get('inject_to_250_p50'), 2)},"
                             f" p99 {_n(ratio.get('inject_to_250_p99'), 2)}")
            elif name.startswith("CPU"):
                cells.append(f"server {_n(ratio.get('server_cpu_seconds'), 2)}")
            else:
                cells.append("")
        if pair:
            cells.append(_ceiling_cell(name, cell, pair["median"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if pair and name == "delivered/s (recipients)":
            # Each side's share of the pair, under the figure it divides.
            lines.append(f"| {CEILING_ROW} | " + " | ".join(
                _n(pair["fraction"].get(side), 3) for side in sides)
                + (" | " if ratio else "") + " | 1 |")
    drained = [f"{sum(r.get('timed_out') or 0 for r in result['runs'][side])} of {len(result['runs'][side])}"
               for side in sides]
    lines.append("| runs that hit the drain limit | " + " | ".join(drained) + (" | " if ratio else "")
                 + (" | " if pair else "") + " |")
    extra = []
    for side in sides:
        for section in ("by_stream", "by_group"):
            found = result["median"][side].get(section) or {}
            if len(found) < 2:
                continue
            for name, figures in found.items():
                extra.append(f"| {side} | {section[3:]} {name} | {_n(figures.get('delivered'))} |"
                              f" {_ms(figures['inject_to_delivered_ms'])} |")
    if extra:
        lines += ["", "| side | part | delivered | inject→delivered p50 / p90 / p99 ms |",
                  "|---|---|---|---|", *extra]
    spread = []
    for side, runs in result["runs"].items():
        spread.append(f"{side}: delivered/s " + ", ".join(_n(r["delivered_per_s"], 0) for r in runs)
                      + "; injected/s " + ", ".join(_n(r["injected_per_s"], 0) for r in runs)
                      + "; load average before each run " + ", ".join(_n(r["loadavg_before"], 1) for r in runs))
    if pair:
        spread.append("C-pair: delivered/s " + ", ".join(_n(r["delivered_per_s"], 0) for r in pair["runs"])
                      + f" (`{pair['source_command']}`, plaintext, unsigned)")
    return "\n".join(lines) + "\n\nPer run — " + " · ".join(spread) + "\n"


def _ceiling_cell(name: str, cell, figures: dict) -> str:
    if name not in CEILING_ROWS:
        return ""
    if name.startswith("CPU"):
        cpu = figures.get("cpu_seconds") or {}
        return f"- / {_n(cpu.get('generator'), 1)} / {_n(cpu.get('sinks'), 1)}"
    try:
        return cell(figures)
    except (KeyError, TypeError):
        return "-"


def render_idle(result: dict) -> str:
    m = result["median"]
    rows = [
        ("connections held (of requested)", f"{_n(m['connections_held'])} of {_n(m['connections_requested'])}"),
        ("still open after the probes", _n(m["connections_still_open"])),
        ("time to open them (s)", _n(m["connect_seconds"], 1)),
        ("workers' RSS before / while held, MB",
         f"{_n(m['worker_rss_before_bytes'] / MB, 1)} / {_n(m['worker_rss_after_bytes'] / MB, 1)}"),
        ("RSS per idle connection, KB", _n(m["rss_per_idle_connection_bytes"] / 1024, 1)),
        ("DATA→250 p50 / p90 / p99 ms, none held", _ms(m["data_to_250_ms_before"])),
        ("DATA→250 p50 / p90 / p99 ms, while held", _ms(m["data_to_250_ms_held"])),
    ]
    lines = ["| | median |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    per_run = ", ".join(_n(r["rss_per_idle_connection_bytes"] / 1024, 1) for r in result["runs"])
    return "\n".join(lines) + f"\n\nPer run — KB per idle connection: {per_run}\n"


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        with open(path) as file:
            result = json.load(file)
        print(f"### {result['scenario']}{' (quick)' if result.get('quick') else ''}\n")
        print(f"`{result['command']}`\n")
        if result["scenario"] != "idle-connections":
            print(summary(result.get("options")) + "\n")
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
