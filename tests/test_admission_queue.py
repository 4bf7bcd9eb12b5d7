"""The admission decisions on their own: fair order, lanes and aging, limits, AIMD, the
per-minute window, estimates, duplicates, and the state carried across continue-as-new."""

from __future__ import annotations

import dataclasses
import json

import pytest

from atelier.messages import AdmissionState, SlotRequest
from workflows.admission_queue import UNDECLARED_OPEN, UNDECLARED_START, Admission


def req(ticket: str, user: str, at: float, *, priority: str = "normal", max_concurrent: int | None = 1,
        per_minute: int | None = None, lease_s: float = 600.0) -> SlotRequest:
    return SlotRequest(ticket=ticket, task_id=ticket, user_id=user, priority=priority, model="m", enqueued_at=at,
                       max_concurrent=max_concurrent, per_minute=per_minute, lease_s=lease_s)


def drain(a: Admission, now: float) -> list[str]:
    """Grant and release one at a time: the order slots are handed out in."""
    order = []
    for _ in range(100):
        grants = a.grant_what_fits(now)
        if not grants:
            break
        for g in grants:
            order.append(g.request.ticket)
            a.release(g.request.ticket, "ok", 1.0, now)
    return order


def test_round_robin_across_users_fifo_within_one():
    a = Admission(AdmissionState(model="m", aging_s=0))
    for i in range(5):
        a.request(req(f"a{i}", "alice", at=i))
    a.request(req("b0", "bob", at=10))
    a.request(req("c0", "carol", at=11))
    a.request(req("b1", "bob", at=12))
    assert drain(a, now=20) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]


def test_a_newcomer_goes_before_the_backlog_of_users_already_served():
    a = Admission(AdmissionState(model="m", aging_s=0))
    for i in range(40):
        a.request(req(f"a{i}", "alice", at=i))
    first = a.grant_what_fits(now=50)
    assert [g.request.ticket for g in first] == ["a0"]
    for user in ("bob", "carol", "dave", "erin"):
        a.request(req(f"{user}0", user, at=60))
    a.release("a0", "ok", 1.0, now=61)
    assert drain(a, now=61)[:5] == ["bob0", "carol0", "dave0", "erin0", "a1"]


def test_higher_lanes_first_and_low_ages_upward():
    a = Admission(AdmissionState(model="m", aging_s=100))
    a.request(req("low", "u1", at=0, priority="low"))
    a.request(req("n1", "u2", at=50))
    a.request(req("hi", "u3", at=60, priority="high"))
    assert [r.ticket for r in a.order(now=70)] == ["hi", "n1", "low"]
    # 100 s later the low entry is in the normal lane, and older than n1.
    assert [r.ticket for r in a.order(now=110)] == ["hi", "low", "n1"]
    # 200 s: it reached the high lane.
    assert [r.ticket for r in a.order(now=205)][0] == "low"


def test_never_more_in_flight_than_the_declared_limit():
    a = Admission(AdmissionState(model="m"))
    for i in range(10):
        a.request(req(f"t{i}", f"u{i % 3}", at=i, max_concurrent=3))
    assert len(a.grant_what_fits(now=20)) == 3
    assert a.grant_what_fits(now=20) == []
    a.release("t0", "ok", 2.0, now=21)
    assert len(a.grant_what_fits(now=21)) == 1
    assert a.stats(21).in_flight == 3


def test_per_minute_window():
    a = Admission(AdmissionState(model="m"))
    for i in range(5):
        a.request(req(f"t{i}", "u", at=i, max_concurrent=None, per_minute=2))
    granted = a.grant_what_fits(now=100)
    for g in granted:
        a.release(g.request.ticket, "ok", 0.1, now=100.5)
    assert len(granted) == 2
    assert a.grant_what_fits(now=120) == []
    assert a.next_wakeup(now=120) == 40.0
    assert len(a.grant_what_fits(now=160.01)) == 2


def test_429_below_the_quota_halves_the_limit_once_per_crowd_then_grows_back():
    a = Admission(AdmissionState(model="m"))
    for i in range(30):
        a.request(req(f"t{i}", "u", at=i, max_concurrent=8))
    grants = a.grant_what_fits(now=100)
    assert len(grants) == 8
    # Eight 429s from one crowd: one decrease, not eight.
    for g in grants:
        a.release(g.request.ticket, "busy", None, now=101)
    assert a.limit() == 4
    again = a.grant_what_fits(now=102)
    assert len(again) == 4
    a.release(again[0].request.ticket, "busy", None, now=103)  # granted after the decrease: news
    assert a.limit() == 2
    for _ in range(200):
        if a.limit() == 8:
            break
        for g in a.grant_what_fits(now=104):
            a.release(g.request.ticket, "ok", 1.0, now=104)
        for h in a.holders():
            a.release(h.ticket, "ok", 1.0, now=104)
        a.request(req(f"x{_}", "u", at=200 + _, max_concurrent=8))
    assert a.limit() == 8 and a.state.learned_limit is None


def test_undeclared_quota_starts_open_and_learns_half_of_what_was_in_flight():
    a = Admission(AdmissionState(model="m"))
    for i in range(20):
        a.request(req(f"t{i}", "u", at=i, max_concurrent=None))
    grants = a.grant_what_fits(now=100)
    assert len(grants) == 20 and a.limit() == UNDECLARED_OPEN  # no limit of ours until 429s teach one
    a.release(grants[0].request.ticket, "busy", None, now=101)
    assert a.limit() == UNDECLARED_OPEN  # one 429 alone is no evidence of a quota
    a.release(grants[1].request.ticket, "busy", None, now=101)
    assert a.limit() == 10  # half the 20 that were in flight


def test_histories_before_the_crowd_rules_keep_the_old_ones():
    """An admission workflow recorded before the patch replays with the rules it ran with:
    an undeclared model at 8, and a single 429 halving the limit."""
    a = Admission(AdmissionState(model="m"), from_crowds=False)
    for i in range(20):
        a.request(req(f"t{i}", "u", at=i, max_concurrent=None))
    grants = a.grant_what_fits(now=100)
    assert len(grants) == UNDECLARED_START
    a.release(grants[0].request.ticket, "busy", None, now=101)
    assert a.limit() == UNDECLARED_START // 2


@pytest.mark.parametrize("declared", [8, None])
def test_stray_429s_at_random_do_not_starve_the_line(declared):
    """The long chaos run's provider answers one call in twelve with 429 whatever the load: the
    limit must stay where it is (before, each stray 429 halved it, down to 1)."""
    a = Admission(AdmissionState(model="m"))
    n = 0
    for round_ in range(60):
        for i in range(8):
            a.request(req(f"r{round_}-{i}", f"u{i}", at=round_ * 10 + i, max_concurrent=declared))
        grants = a.grant_what_fits(now=round_ * 10 + 9)
        assert len(grants) == 8, f"round {round_}: limit fell to {a.limit()}"
        for g in grants:
            n += 1
            a.release(g.request.ticket, "busy" if n % 12 == 0 else "ok", 1.0, now=round_ * 10 + 9.5)
    assert a.state.busy == n // 12 and a.limit() == (declared or UNDECLARED_OPEN)


def test_a_quota_really_exceeded_halves_the_limit_until_429s_stop():
    """A provider that serves 3 at once behind an undeclared quota: 429s come in crowds and the
    limit comes down to where they stop."""
    a = Admission(AdmissionState(model="m"))
    limits, calls = [], 0
    for round_ in range(40):
        for i in range(8):
            a.request(req(f"r{round_}-{i}", "u", at=round_ * 10 + i, max_concurrent=None))
        grants = a.grant_what_fits(now=round_ * 10 + 9)
        for k, g in enumerate(grants):
            calls += 1
            a.release(g.request.ticket, "ok" if k < 3 else "busy", 1.0, now=round_ * 10 + 9.5)
        limits.append(a.limit())
    # Down at once, then a sawtooth around the quota: never back up to the start, and 429s a
    # small share of calls (without learning: 5 of every 8).
    assert limits[0] == 4 and min(limits) <= 3  # half of the 8 in flight
    assert max(limits[1:]) <= 2 * 3 and a.state.busy / calls < 0.3, (limits, a.state.busy, calls)


def test_duplicates_and_late_requests_are_ignored():
    a = Admission(AdmissionState(model="m"))
    assert a.request(req("t", "u", at=0))
    assert not a.request(req("t", "u", at=0))
    a.grant_what_fits(now=1)
    assert not a.request(req("t", "u", at=0))
    a.release("t", "ok", 1.0, now=2)
    assert not a.request(req("t", "u", at=0))  # a retried signal arriving after the release
    assert a.stats(3).waiting == 0


def test_withdraw_while_waiting_and_reclaim_of_a_gone_holder():
    a = Admission(AdmissionState(model="m"))
    a.request(req("h", "u", at=0, lease_s=10))
    a.request(req("w", "v", at=1))
    a.grant_what_fits(now=2)
    assert a.release("w", "withdrawn", None, now=3) is False
    assert a.stats(3).waiting == 0
    assert [h.ticket for h in a.expired(now=12.5)] == ["h"]
    assert a.reclaim("h") and a.stats(13).in_flight == 0 and a.state.reclaimed == 1


def test_position_and_estimate():
    a = Admission(AdmissionState(model="m", durations=[4.0, 6.0]))
    for i in range(6):
        a.request(req(f"t{i}", f"u{i}", at=i, max_concurrent=2))
    a.grant_what_fits(now=10)
    assert a.position("t2", now=10) == 1
    assert a.position("t5", now=10) == 4
    assert a.position("t0", now=10) is None  # holding, not waiting
    assert a.eta_s(1, now=10) == 5.0
    assert a.eta_s(4, now=10) == 10.0


def test_state_survives_continue_as_new():
    a = Admission(AdmissionState(model="m", recent_busy=[0, 1]))
    for i in range(4):
        a.request(req(f"t{i}", f"u{i}", at=i, max_concurrent=2))
    a.grant_what_fits(now=10)
    a.release("t0", "busy", None, now=11)  # the second 429 of the last three calls: a decrease
    carried = json.loads(json.dumps(dataclasses.asdict(a.snapshot())))
    state = AdmissionState(**{**carried, "waiting": [SlotRequest(**r) for r in carried["waiting"]]})
    from atelier.messages import SlotHolder

    state.holders = [SlotHolder(**h) for h in carried["holders"]]
    b = Admission(state)
    assert b.limit() == 1 and [h.ticket for h in b.holders()] == ["t1"] and b.state.recent_busy == [0, 1, 1]
    assert [r.ticket for r in b.order(now=12)] == ["t2", "t3"]
    assert not b.request(req("t0", "u0", at=0))
