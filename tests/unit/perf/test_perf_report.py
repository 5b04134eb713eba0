"""perf.report and perf.markdown: the options line, the C-pair column and the fraction row (pure)."""

from __future__ import annotations

from perf import markdown, report
from perf.loadgen import Injection

LAT = {"p50": 10.0, "p90": 20.0, "p99": 30.0, "max": 40.0}


def figures(delivered_per_s: float) -> dict:
    run = report.summarise([Injection("s", 1, 0.0, 0.01, 250)], [(0.5, ("r0.0@d0000.example",))], {})
    run.update({
        "delivered_per_s": delivered_per_s, "injected_per_s": delivered_per_s,
        "inject_to_250_ms": LAT, "inject_to_delivered_ms": LAT,
        "cpu_seconds": {"server": 2.0, "generator": 0.5, "sinks": 0.7},
        "sampled_peak_pss_bytes": 100 * report.MB, "peak_rss_bytes": 90 * report.MB,
        "outbound_connections": 10, "outbound_transactions": 1000, "timed_out": 0,
        "loadavg_before": 1.0,
    })
    return run


PAIR = {"injected": 1000, "delivered": 1000, "injected_per_s": 8000.0, "delivered_per_s": 8000.0,
        "elapsed_seconds": 0.125, "cpu_seconds": {"server": None, "generator": 0.1, "sinks": 0.2},
        "loadavg_before": 1.0}


def result(with_ceiling: bool, options: dict | None) -> dict:
    relay, postfix = figures(800.0), figures(400.0)
    out = {"scenario": "hot-domain", "quick": True, "command": "perf/bench --scenario hot-domain",
           "runs": {"relay": [relay], "postfix": [postfix]},
           "median": {"relay": relay, "postfix": postfix},
           "ratio": {"of": "relay/postfix", **report.ratios(relay, postfix)}}
    if options is not None:
        out["options"] = options
    if with_ceiling:
        out["ceiling"] = {"source_command": "smtp-source -s 50 127.0.0.1:PORT", "runs": [PAIR],
                          "median": PAIR, "fraction": {"relay": 0.1, "postfix": 0.05}}
    return out


def test_table_has_the_ceiling_row_only_with_a_ceiling():
    plain = report.table({"relay": figures(800.0)})
    assert "C-pair" not in plain
    columns = {"relay": {**figures(800.0), "ceiling_fraction": 0.1}, report.CEILING: PAIR}
    text = report.table(columns)
    header, *rows = text.splitlines()
    assert header.split()[-2:] == ["C-pair", "ceiling"]
    (fraction,) = [row for row in rows if row.startswith("delivered/s / C-pair ceiling")]
    assert fraction.split()[-2:] == ["0.100", "-"]
    (delivered,) = [row for row in rows if row.split("  ")[0] == "delivered/s"]
    assert delivered.split()[-2:] == ["800.0", "8,000.0"]


def test_markdown_ceiling_column_and_fraction_row():
    text = markdown.render(result(with_ceiling=True, options=None))
    lines = text.splitlines()
    assert lines[0].endswith("| ratio relay/postfix | C-pair ceiling (smtp-source → smtp-sink) |")
    width = lines[0].count("|")
    assert all(line.count("|") == width for line in lines[:lines.index("")])
    (row,) = [line for line in lines if line.startswith("| delivered/s as a fraction")]
    assert row == "| delivered/s as a fraction of the C-pair ceiling | 0.100 | 0.050 |  | 1 |"
    (rate,) = [line for line in lines if line.startswith("| delivered/s (recipients)")]
    assert rate.endswith("| 2.00 | 8,000.0 |")
    assert "C-pair: delivered/s 8,000" in text


def test_markdown_without_ceiling_keeps_its_columns():
    lines = markdown.render(result(with_ceiling=False, options=None)).splitlines()
    assert "C-pair" not in "\n".join(lines)
    width = lines[0].count("|")
    assert all(line.count("|") == width for line in lines[:lines.index("")])


def test_markdown_says_which_options_were_on(capsys, tmp_path):
    import json

    options = {"dkim": True, "tls": True, "relay": {},
               "postfix": {"dkim": "unsigned: OpenDKIM is not installed", "tls": "..."}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result(with_ceiling=True, options=options)))
    markdown.main([str(path)])
    out = capsys.readouterr().out
    assert "options: DKIM" in out and "Postfix unsigned: OpenDKIM is not installed" in out
    assert "STARTTLS on both hops" in out
