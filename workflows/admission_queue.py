"""The admission state of one model and the decisions made on it: who gets the next slot,
how many slots there are, what a waiting generation's position and estimate are.

Pure and deterministic (times come in as arguments): the admission workflow owns one of
these and carries it across continue-as-new; unit tests drive it without a server.

The order of the waiting line:
  1. lane: high before normal before low; an entry moves up one lane for every `aging_s`
     it has waited, so `low` never starves;
  2. round-robin across users within a lane: the k-th waiting entry of each user comes
     before any user's (k+1)-th, and among users of the same round the one served least
     recently goes first;
  3. first in, first out within one user.
The limit on calls in flight is the declared `max_concurrent`, lowered by what 429s taught
(additive increase, multiplicative decrease); `per_minute` bounds the grants of any 60 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from atelier.messages import AdmissionState, Priority, SlotHolder, SlotRequest

LANES = {Priority.HIGH.value: 0, Priority.NORMAL.value: 1, Priority.LOW.value: 2}
# A model that declares no quota has no limit of ours (the workers' own slots bound its calls)
# until a crowd of 429s teaches one: half the calls that were in flight when it came.
UNDECLARED_OPEN = 10_000
# Before the patch "admission-learning-from-crowds" (histories recorded before it replay with
# these rules): an undeclared model started at 8, and every 429 halved the limit.
UNDECLARED_START = 8
# A learned limit that grows back to this opens again (for a declared quota: to the declared one).
UNDECLARED_MAX = 256
# How many recent call durations the estimate averages, and how many finished tickets are
# remembered so that a late duplicate request is not queued again.
DURATIONS_KEPT = 20
DONE_KEPT = 2000
WINDOW_S = 60.0
# The limit halves on a 429 only when 429s are at least this share of the last OUTCOMES_KEPT
# calls (and at least BUSY_MIN of them): a quota really exceeded answers a crowd of 429s, while a
# provider answering one call in twelve with 429 at random (as the chaos run's does) would
# otherwise halve the limit over and over and starve the line (docs/quotas.md).
OUTCOMES_KEPT = 20
BUSY_SHARE = 0.25
BUSY_MIN = 2


@dataclass
class Grant:
    request: SlotRequest
    holder: SlotHolder


@dataclass
class QueueStats:
    in_flight: int = 0
    waiting: int = 0
    limit: int = 0
    started_last_minute: int = 0
    mean_call_s: float | None = None


@dataclass
class Admission:
    state: AdmissionState
    # ticket -> request, and ticket -> holder: lookups without scanning.
    _waiting: dict[str, SlotRequest] = field(default_factory=dict)
    _holders: dict[str, SlotHolder] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    # The learning rules: from crowds of 429s and the calls in flight, an undeclared model open
    # (True); or the rules before that (False: histories recorded before them replay so).
    from_crowds: bool = True

    def __post_init__(self) -> None:
        self._waiting = {r.ticket: r for r in self.state.waiting}
        self._holders = {h.ticket: h for h in self.state.holders}
        self._done = set(self.state.done)

    # ---- the state carried across continue-as-new ------------------------------------

    def snapshot(self) -> AdmissionState:
        s = self.state
        s.waiting = list(self._waiting.values())
        s.holders = list(self._holders.values())
        active_users = {r.user_id for r in s.waiting} | {h.user_id for h in s.holders}
        s.served = {u: n for u, n in s.served.items() if u in active_users}
        return s

    # ---- limits ------------------------------------------------------------------------

    def limit(self) -> int:
        s = self.state
        declared = s.max_concurrent if s.max_concurrent else None
        if s.learned_limit is None:
            return declared or (UNDECLARED_OPEN if self.from_crowds else UNDECLARED_START)
        learned = max(1, math.floor(s.learned_limit))
        return min(learned, declared) if declared else learned

    def _trim_window(self, now: float) -> None:
        starts = self.state.recent_starts
        while starts and starts[0] <= now - WINDOW_S:
            starts.pop(0)

    def _started_in_window(self, now: float) -> int:
        # Read-only (queries call it): trimming happens only where grants are decided.
        return sum(1 for t in self.state.recent_starts if t > now - WINDOW_S)

    def free_slots(self, now: float) -> int:
        free = self.limit() - len(self._holders)
        if self.state.per_minute:
            free = min(free, self.state.per_minute - self._started_in_window(now))
        return max(0, free)

    # ---- requests, grants, releases -----------------------------------------------------

    def request(self, req: SlotRequest) -> bool:
        """Queue a request; False for a duplicate (already queued, held or done)."""
        if req.ticket in self._waiting or req.ticket in self._holders or req.ticket in self._done:
            return False
        if req.priority not in LANES:
            req.priority = Priority.NORMAL.value
        # The latest catalogue wins: a changed quota takes effect with the next request.
        self.state.max_concurrent = req.max_concurrent
        self.state.per_minute = req.per_minute
        self._waiting[req.ticket] = req
        return True

    def grant_what_fits(self, now: float) -> list[Grant]:
        self._trim_window(now)
        free = self.free_slots(now)
        if free <= 0 or not self._waiting:
            return []
        grants = []
        for req in self.order(now)[:free]:
            del self._waiting[req.ticket]
            self.state.serial += 1
            self.state.served[req.user_id] = self.state.serial
            holder = SlotHolder(ticket=req.ticket, task_id=req.task_id, user_id=req.user_id, granted_at=now,
                                lease_until=now + req.lease_s, serial=self.state.serial)
            self._holders[req.ticket] = holder
            if self.state.per_minute:
                self.state.recent_starts.append(now)
            self.state.granted += 1
            grants.append(Grant(req, holder))
        self.state.peak_in_flight = max(self.state.peak_in_flight, len(self._holders))
        return grants

    def release(self, ticket: str, outcome: str, duration_s: float | None, now: float) -> bool:
        """A holder is done (or a waiting entry withdrew). True when a slot came free."""
        self._remember_done(ticket)
        if self._waiting.pop(ticket, None) is not None:
            return False
        holder = self._holders.pop(ticket, None)
        if holder is None:
            return False
        if outcome == "busy":
            self._learn_busy(holder)
        elif outcome in ("ok", "succeeded"):
            if duration_s is not None and duration_s >= 0:
                durations = self.state.durations
                durations.append(duration_s)
                del durations[:-DURATIONS_KEPT]
            self._learn_ok()
        return True

    def reclaim(self, ticket: str) -> bool:
        """Take back a slot whose holder is gone (lease over, workflow closed)."""
        self._remember_done(ticket)
        self._waiting.pop(ticket, None)
        if self._holders.pop(ticket, None) is None:
            return False
        self.state.reclaimed += 1
        return True

    def expired(self, now: float) -> list[SlotHolder]:
        return [h for h in self._holders.values() if h.lease_until <= now]

    def _remember_done(self, ticket: str) -> None:
        if ticket in self._done:
            return
        self._done.add(ticket)
        done = self.state.done
        done.append(ticket)
        if len(done) > DONE_KEPT:
            for old in done[:-DONE_KEPT]:
                self._done.discard(old)
            del done[:-DONE_KEPT]

    # ---- learning (AIMD) ------------------------------------------------------------------

    def _outcome(self, busy: bool) -> float:
        """Record one call's outcome; the share of 429s among the recent ones."""
        recent = self.state.recent_busy
        recent.append(1 if busy else 0)
        del recent[:-OUTCOMES_KEPT]
        return sum(recent) / len(recent)

    def _learn_busy(self, holder: SlotHolder) -> None:
        s = self.state
        s.busy += 1
        share = self._outcome(True)
        if holder.serial <= s.decreased_at_serial:
            return  # granted before the last decrease: that decrease already answered this crowd
        if not self.from_crowds:
            s.learned_limit = max(1.0, self.limit() / 2)
            s.decreased_at_serial = s.serial
            return
        if share < BUSY_SHARE or sum(s.recent_busy) < BUSY_MIN:
            return  # a stray 429, not a quota: waited out by its generation, the limit stays
        # Half of what was in flight when the crowd came (an open limit is no measure of that).
        s.learned_limit = max(1.0, min(self.limit(), s.peak_in_flight or self.limit()) / 2)
        s.decreased_at_serial = s.serial
        s.peak_in_flight = len(self._holders)

    def _learn_ok(self) -> None:
        s = self.state
        self._outcome(False)
        if s.learned_limit is None:
            return
        s.learned_limit += 1.0 / max(1.0, s.learned_limit)
        ceiling = s.max_concurrent or UNDECLARED_MAX
        if s.learned_limit >= ceiling:
            s.learned_limit = None if (s.max_concurrent or self.from_crowds) else float(UNDECLARED_MAX)

    # ---- the fair order -----------------------------------------------------------------

    def lane_of(self, req: SlotRequest, now: float) -> int:
        lane = LANES.get(req.priority, 1)
        if self.state.aging_s > 0:
            lane -= int(max(0.0, now - req.enqueued_at) // self.state.aging_s)
        return max(0, lane)

    def order(self, now: float) -> list[SlotRequest]:
        """The waiting line, first = next to get a slot."""
        keyed = []
        rounds: dict[tuple[int, str], int] = {}
        for req in sorted(self._waiting.values(), key=lambda r: (r.enqueued_at, r.ticket)):
            lane = self.lane_of(req, now)
            k = rounds.get((lane, req.user_id), 0)
            rounds[(lane, req.user_id)] = k + 1
            keyed.append(((lane, k, self.state.served.get(req.user_id, 0), req.enqueued_at, req.ticket), req))
        keyed.sort(key=lambda pair: pair[0])
        return [req for _, req in keyed]

    def position(self, task_id: str, now: float) -> int | None:
        for index, req in enumerate(self.order(now), start=1):
            if req.task_id == task_id:
                return index
        return None

    def mean_call_s(self) -> float | None:
        d = self.state.durations
        return sum(d) / len(d) if d else None

    def eta_s(self, position: int, now: float) -> float | None:
        """About when the entry at `position` gets its slot: the rounds of calls ahead of it."""
        mean = self.mean_call_s()
        if mean is None:
            return None
        limit = max(1, self.limit())
        ahead = position - self.free_slots(now)
        eta = 0.0 if ahead <= 0 else math.ceil(ahead / limit) * mean
        if self.state.per_minute:
            eta = max(eta, (position - 1) / self.state.per_minute * WINDOW_S)
        return round(eta, 1)

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until something may change without a signal: a lease ends, the per-minute
        window frees a start, a waiting entry ages into a higher lane."""
        times = [h.lease_until for h in self._holders.values()]
        if self._waiting and self.state.per_minute:
            live = [t for t in self.state.recent_starts if t > now - WINDOW_S]
            if live:
                times.append(min(live) + WINDOW_S)
        if self._waiting and self.state.aging_s > 0 and len({r.priority for r in self._waiting.values()}) > 1:
            times.append(now + self.state.aging_s / 4)
        if not times:
            return None
        return max(0.05, min(times) - now)

    def is_waiting(self, ticket: str) -> bool:
        return ticket in self._waiting

    def is_holder(self, ticket: str) -> bool:
        return ticket in self._holders

    def holders(self) -> list[SlotHolder]:
        return list(self._holders.values())

    def waiting(self) -> list[SlotRequest]:
        return list(self._waiting.values())

    def stats(self, now: float) -> QueueStats:
        return QueueStats(in_flight=len(self._holders), waiting=len(self._waiting), limit=self.limit(),
                          started_last_minute=self._started_in_window(now), mean_call_s=self.mean_call_s())
