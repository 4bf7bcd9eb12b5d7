"""The chaos run's summary table, in plain text (also pasted into docs/reliability.md)."""

from __future__ import annotations

from tests.chaos.runner import ChaosReport


def _rows(report: ChaosReport) -> list[tuple[str, str]]:
    c = report.config
    s = report.statuses
    faults = ", ".join(f"{k} {v}" for k, v in sorted(report.faults.items()))
    rows = [
        ("generations planned / seed", f"{report.submitted} / {c['seed']}"),
        ("workers", str(c["workers"])),
        ("duration", f"{report.duration_s:.0f} s"),
        ("submitted (accepted by the API)", str(report.accepted)),
        ("refused at once (402, no credits)", str(report.refused_at_api)),
        ("completed", str(s.get("completed", 0))),
        ("failed", str(s.get("failed", 0))),
        ("canceled", str(s.get("canceled", 0))),
        ("rejected (charge refused)", str(s.get("rejected", 0))),
        ("refunds", f"{report.refunds} ({report.credits_refunded} credits of {report.credits_charged} charged)"),
        ("failure codes", ", ".join(f"{k} {v}" for k, v in sorted(report.error_codes.items())) or "-"),
        ("provider calls", str(report.provider_calls)),
        ("faults injected", f"{sum(report.faults.values())}: {faults}"),
        ("workers SIGKILLed", str(report.worker_kills)
         + (f" (+{report.worker_exits_while_temporal_down} restarted while Temporal was down)"
            if report.worker_exits_while_temporal_down else "")),
        ("Temporal restarts", f"{report.server_restarts} (down {report.server_downtime_s:.1f} s)"),
        ("cancels requested / accepted", f"{report.cancels_requested} / {report.cancels_accepted}"),
        ("webhooks asked / delivered (signed)", f"{report.webhooks_asked} / {report.webhooks_delivered}"),
        ("histories replayed", str(report.histories_replayed)),
        ("invariant violations", str(len(report.violations))),
    ]
    for model, a in report.admission.items():
        rows.insert(-1, (f"admission of {model}", f"{a['granted']} slots granted, {a['busy']} 429s heard, "
                                                  f"limit {a['limit']} at the end, {a['reclaimed']} taken back"))
    if c.get("quota") is not None:
        rows.insert(-1, ("quota: most calls in flight / 429s from the quota",
                         f"{report.provider_max_in_flight} (allowed {2 * c['quota']}) / {report.provider_quota_429s}"))
    return rows


def render_table(report: ChaosReport) -> str:
    rows = _rows(report)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    for v in report.violations[:20]:
        lines.append(f"  VIOLATION {v['kind']} {v['task_id'] or ''}: {v['detail']}")
    if len(report.violations) > 20:
        lines.append(f"  ... and {len(report.violations) - 20} more (see the JSON report)")
    return "\n".join(lines)


def render_markdown(report: ChaosReport) -> str:
    rows = _rows(report)
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
