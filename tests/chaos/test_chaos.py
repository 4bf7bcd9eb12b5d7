"""The CI-sized chaos run: about 60 generations in a couple of minutes, under every kind of
provider fault, SIGKILLed workers, a Temporal restart and cancellations; then nothing lost,
every credit accounted for, every history replayable.

The seed is fixed so a failure can be run again; ATELIER_CHAOS_SEED picks another.
The long run is `scripts/chaos.py` (see docs/reliability.md).
"""

from __future__ import annotations

import os

import pytest

from tests.chaos.faults import FAULT_KINDS
from tests.chaos.report import render_table
from tests.chaos.runner import QUOTA_WEIGHTS, ChaosConfig, run_chaos

SEED = int(os.environ.get("ATELIER_CHAOS_SEED", "20250611"))


@pytest.mark.timeout(540)
async def test_chaos_run_loses_nothing_and_accounts_for_every_credit():
    config = ChaosConfig(generations=60, seed=SEED, submit_window_s=60.0)
    report = await run_chaos(config)
    print("\n" + render_table(report))

    assert report.violations == [], render_table(report)

    # The run did what it claims: a test that passes when nothing happened proves nothing.
    assert report.accepted >= 50
    assert report.accepted + report.refused_at_api == report.submitted
    assert sum(report.statuses.values()) == report.accepted
    missing = [kind for kind in FAULT_KINDS if report.faults.get(kind, 0) == 0]
    assert not missing, f"faults never injected: {missing}"
    assert report.worker_kills >= 2
    assert report.server_restarts == 1
    assert report.statuses.get("completed", 0) >= report.accepted // 2
    assert report.statuses.get("failed", 0) >= 1  # blocked content fails for good, refunded
    assert report.statuses.get("canceled", 0) >= 1
    assert report.refunds >= report.statuses.get("failed", 0)
    assert report.webhooks_asked >= 1 and report.webhooks_delivered == report.webhooks_asked
    assert report.histories_replayed == report.accepted + report.webhooks_asked  # webhook workflows too
    # No quota declared: the models' calls still queued for admission (limits learned from 429s),
    # and the provider's random 429s did not starve the line.
    assert sum(a["granted"] for a in report.admission.values()) >= report.statuses.get("completed", 0) > 0


@pytest.mark.timeout(540)
async def test_chaos_quota_phase_holds_the_quota_and_every_invariant():
    """Quota mode at the provider (2 calls per model at once, 429 beyond), the quota declared in
    the catalogue, plus worker kills, a Temporal restart, cancels and the provider's other faults."""
    config = ChaosConfig(generations=40, seed=SEED + 1, submit_window_s=30.0, quota=2, weights=dict(QUOTA_WEIGHTS),
                         cancel_fraction=0.15)
    report = await run_chaos(config)
    print("\n" + render_table(report))

    assert report.violations == [], render_table(report)
    assert report.accepted >= 30
    assert report.worker_kills >= 1 and report.server_restarts == 1
    assert report.statuses.get("completed", 0) >= report.accepted // 2
    assert report.statuses.get("canceled", 0) >= 1
    # The burst did meet the quota: calls waited for slots, and never more went out than it allows.
    assert 2 <= report.provider_max_in_flight <= 4
    assert report.histories_replayed == report.accepted + report.webhooks_asked
