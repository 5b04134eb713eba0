"""The merged stats in Prometheus text format (exposition format 0.0.4), pure.

Input: ``ring.merge()`` output.  Output: the text ``/metrics`` serves:
counters as ``relay_<name>_total``, gauges as ``relay_<name>``, latency
histograms as ``relay_<name>_seconds`` with cumulative ``le`` buckets
(per lane: ``accept_to_delivered_transactional|bulk``), the busiest
destinations as a labelled gauge, and outcomes of the busiest campaigns
(``relay_campaign_outcomes_total{campaign, outcome}``) with the others
summed (``relay_campaign_other_outcomes_total{outcome}``).
"""

from __future__ import annotations

import math

from relay.stats.ring import BUCKETS, CAMPAIGN_OUTCOMES


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(merged: dict) -> str:
    lines = []
    for name, value in merged["counters"].items():
        lines += [f"# TYPE relay_{name}_total counter", f"relay_{name}_total {_number(value)}"]
    for name, value in merged["gauges"].items():
        lines += [f"# TYPE relay_{name} gauge", f"relay_{name} {_number(value)}"]
    lines += ["# TYPE relay_workers gauge", f"relay_workers {merged['workers']}"]
    for name, histogram in merged["histograms"].items():
        metric = f"relay_{name}_seconds"
        lines.append(f"# TYPE {metric} histogram")
        cumulative = 0
        for bound, count in zip(BUCKETS, histogram["counts"]):
            cumulative += count
            lines.append(f'{metric}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines += [f"{metric}_sum {_number(histogram['sum'])}", f"{metric}_count {cumulative}"]
    lines.append("# TYPE relay_destination_load gauge")
    for destination, load in merged["top_destinations"]:
        lines.append(f'relay_destination_load{{destination="{_label(destination)}"}} {load}')
    # The busiest campaigns by name, the rest in one series: a bounded set of labels.
    lines.append("# TYPE relay_campaign_outcomes_total counter")
    for campaign in merged.get("campaigns", []):
        for outcome in CAMPAIGN_OUTCOMES:
            lines.append(f'relay_campaign_outcomes_total{{campaign="{_label(campaign["name"])}",'
                         f'outcome="{outcome}"}} {campaign[outcome]}')
    lines.append("# TYPE relay_campaign_other_outcomes_total counter")
    for outcome, count in merged.get("campaigns_other", {}).items():
        lines.append(f'relay_campaign_other_outcomes_total{{outcome="{outcome}"}} {count}')
    return "\n".join(lines) + "\n"
