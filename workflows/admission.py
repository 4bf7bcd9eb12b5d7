"""ModelAdmissionWorkflow: one long-lived workflow per model hands out call slots.

A generation about to call a model asks for a slot (the `request_slot` local activity sends
this workflow the `join_line` update, starting it if need be). When a slot is free and nobody
waits ahead, the update's answer is the grant itself; otherwise it answers the generation's
place in line, and this workflow sends a `slot_granted` signal when the model's quota and the
fair order allow (a request that reached it as a `request_slot` signal, the fallback, is always
answered so). The generation signals `release_slot` when its call is over (ok, busy: the
provider answered 429, failed, or withdrawn: it stopped waiting). Its state lives in workflow
history: a worker killed mid-way or a Temporal restart loses no slot and no waiting generation,
and any number of workers and hosts share one quota.

Slots whose holder is gone come back: every grant carries a lease, and holders are checked
every `check_every_s` for a generation workflow that has closed (terminated, reset away).
The decisions themselves live in `workflows.admission_queue` (pure, unit-tested).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.admission import AdmissionActivities
    from atelier.messages import (
        ADMISSION_WORKFLOW_TYPE,
        AdmissionState,
        AdmissionStatus,
        HolderCheck,
        LineAnswer,
        QueueUpdate,
        SlotGrant,
        SlotRelease,
        SlotRequest,
    )
    from workflows.admission_queue import Admission

# Signals a generation workflow receives from here.
SIGNAL_GRANTED = "slot_granted"
SIGNAL_QUEUE_UPDATE = "queue_update"
# A new arrival is told its place only while the line is this short and fewer than this many
# signals are on their way: in a long burst each update is one more signal and one more task of
# the generation, for a number that is stale at once (the API asks the live one).
MAX_LINE_FOR_UPDATES = 100
MAX_PENDING_UPDATES = 100
# Learning from crowds of 429s (not each one), halving the calls in flight, an undeclared model
# open until it learns (workflows/admission_queue.py); runs recorded before it keep the old rules.
PATCH_LEARNING_FROM_CROWDS = "admission-learning-from-crowds"
# At most this many generations are described per holder check.
CHECK_BATCH = 200
# A run takes at most this many join_line updates, then continues as new: Temporal refuses more
# than 2,000 updates in one run's history (history.maxTotalUpdates' default).
MAX_UPDATES_PER_RUN = 1000

CHECK_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10),
                          maximum_attempts=3)


# Unsandboxed: one workflow takes every generation's signals for its model, and a burst brings
# hundreds in one activation; the sandbox's per-signal cost made such an activation overrun the
# deadlock detector (2 s) on a loaded machine. Its code imports only deterministic modules.
@workflow.defn(name=ADMISSION_WORKFLOW_TYPE, sandboxed=False)
class ModelAdmissionWorkflow:
    @workflow.init
    def __init__(self, state: AdmissionState) -> None:
        # Built here, not in run: the signal that started this run is delivered before run.
        self._admission = Admission(state)
        self._state = state
        self._wake = False
        self._new: list[SlotRequest] = []
        self._outgoing: set[asyncio.Task] = set()
        self._check: asyncio.Task | None = None
        self._last_check = 0.0
        self._updates = 0
        self._closing = False

    def _now(self) -> float:
        return workflow.now().timestamp()

    # ---- what generations send --------------------------------------------------------

    @workflow.update(name="join_line")
    def join_line(self, req: SlotRequest) -> LineAnswer:
        """Queue `req` and answer at once: the slot itself when it is free and nobody waits ahead
        (no grant signal, no extra task for the generation), else its place in line. Asked again
        for the same ticket (an answer that was lost), it answers the same way."""
        self._updates += 1
        now = self._now()
        a = self._admission
        fresh = a.request(req)
        if fresh and not self._closing:
            # (Closing: the request is carried to the next run, which grants it by signal.)
            self._wake = True
            self._grant(now, answered=req.ticket)
        if a.is_holder(req.ticket):
            if fresh:
                self._state.granted_at_once += 1
            return LineAnswer(granted=True)
        if not a.is_waiting(req.ticket) or len(a.waiting()) > MAX_LINE_FOR_UPDATES:
            return LineAnswer()
        place = self.position(req.task_id)
        return LineAnswer(position=place.position, eta_s=place.eta_s)

    @workflow.signal(name="request_slot")
    def request_slot(self, req: SlotRequest) -> None:
        if self._admission.request(req):
            self._new.append(req)
            self._wake = True
        elif self._admission.is_holder(req.ticket):
            # A join_line answer granted it and was lost on its way (the activity fell back to
            # this signal): the grant goes again; the generation takes a repeated grant once.
            self._signal(req.task_id, SIGNAL_GRANTED, SlotGrant(ticket=req.ticket, model=self._state.model),
                         ticket=req.ticket)

    @workflow.signal(name="release_slot")
    def release_slot(self, release: SlotRelease) -> None:
        self._admission.release(release.ticket, release.outcome, release.duration_s, self._now())
        self._wake = True

    # ---- what readers ask -------------------------------------------------------------

    @workflow.query
    def status(self) -> AdmissionStatus:
        s, stats = self._state, self._admission.stats(self._now())
        return AdmissionStatus(model=s.model, in_flight=stats.in_flight, waiting=stats.waiting, limit=stats.limit,
                               max_concurrent=s.max_concurrent, per_minute=s.per_minute,
                               learned_limit=s.learned_limit, started_last_minute=stats.started_last_minute,
                               mean_call_s=stats.mean_call_s, granted=s.granted,
                               granted_at_once=s.granted_at_once, busy=s.busy,
                               reclaimed=s.reclaimed, runs=s.runs)

    @workflow.query
    def position(self, task_id: str) -> QueueUpdate:
        """Where a generation stands in line (position None: it is not waiting)."""
        now = self._now()
        place = self._admission.position(task_id, now)
        eta = self._admission.eta_s(place, now) if place is not None else None
        return QueueUpdate(model=self._state.model, position=place, eta_s=eta)

    # ---- the loop ------------------------------------------------------------------------

    @workflow.run
    async def run(self, state: AdmissionState) -> None:
        a = self._admission
        a.from_crowds = workflow.patched(PATCH_LEARNING_FROM_CROWDS)
        while True:
            now = self._now()
            for holder in a.expired(now):
                a.reclaim(holder.ticket)
                workflow.logger.warning("%s: lease of %s ran out; slot taken back", state.model, holder.ticket)
            self._grant(now)
            self._tell_new_positions(now)
            self._maybe_check_holders(now)
            self._describe(now)
            if self._should_continue_as_new():
                self._closing = True
                break
            timeout = a.next_wakeup(now)
            if a.holders() or a.waiting():
                until_check = max(1.0, self._last_check + state.check_every_s - now)
                timeout = until_check if timeout is None else min(timeout, until_check)
            self._wake = False
            try:
                await workflow.wait_condition(lambda: self._wake, timeout=timeout,
                                              timeout_summary="next lease end, quota window or holder check")
            except asyncio.TimeoutError:
                pass
        await self._drain()
        state = a.snapshot()
        state.runs += 1
        workflow.continue_as_new(state)

    def _grant(self, now: float, *, answered: str | None = None) -> None:
        """Hand out what fits, in the fair order: a grant signal to each grantee except `answered`,
        whose join_line answer carries its grant."""
        for grant in self._admission.grant_what_fits(now):
            ticket = grant.request.ticket
            if ticket != answered:
                self._signal(grant.request.task_id, SIGNAL_GRANTED, SlotGrant(ticket=ticket, model=self._state.model),
                             ticket=ticket)

    def _tell_new_positions(self, now: float) -> None:
        new, self._new = self._new, []
        waiting = [r for r in new if self._admission.is_waiting(r.ticket)]
        if not waiting or len(self._admission.waiting()) > MAX_LINE_FOR_UPDATES:
            return
        order = {r.ticket: i for i, r in enumerate(self._admission.order(now), start=1)}
        for req in waiting:
            if len(self._outgoing) >= MAX_PENDING_UPDATES:
                break
            place = order.get(req.ticket)
            if place is not None:
                update = QueueUpdate(model=self._state.model, position=place, eta_s=self._admission.eta_s(place, now))
                self._signal(req.task_id, SIGNAL_QUEUE_UPDATE, update)

    def _signal(self, workflow_id: str, name: str, arg, *, ticket: str | None = None) -> None:
        async def send() -> None:
            try:
                await workflow.get_external_workflow_handle(workflow_id).signal(name, arg)
            except Exception as err:  # noqa: BLE001 - the generation is gone: its slot comes back
                if ticket is not None and self._admission.reclaim(ticket):
                    workflow.logger.info("%s: %s is gone (%s); slot taken back", self._state.model, workflow_id, err)
                    self._wake = True

        task = asyncio.create_task(send())
        self._outgoing.add(task)
        task.add_done_callback(self._outgoing.discard)

    def _maybe_check_holders(self, now: float) -> None:
        """Ask, now and then, whether the generations holding or awaiting slots still run."""
        if self._check is not None or now - self._last_check < self._state.check_every_s:
            return
        old = now - self._state.check_every_s
        ids = [h.task_id for h in self._admission.holders() if h.granted_at <= old]
        ids += [r.task_id for r in self._admission.waiting() if r.enqueued_at <= old]
        self._last_check = now
        if not ids:
            return
        self._check = asyncio.create_task(self._check_holders(list(dict.fromkeys(ids))[:CHECK_BATCH]))

    async def _check_holders(self, task_ids: list[str]) -> None:
        try:
            result = await workflow.execute_activity_method(
                AdmissionActivities.check_holders, HolderCheck(task_ids=task_ids),
                start_to_close_timeout=timedelta(seconds=30), retry_policy=CHECK_RETRY,
                summary=f"Are {len(task_ids)} generation(s) of {self._state.model} still running?",
            )
            closed = set(result.closed)
            for holder in self._admission.holders():
                if holder.task_id in closed and self._admission.reclaim(holder.ticket):
                    workflow.logger.warning("%s: %s closed holding a slot; taken back", self._state.model,
                                            holder.task_id)
            for req in self._admission.waiting():
                if req.task_id in closed:
                    self._admission.reclaim(req.ticket)
            if closed:
                self._wake = True
        except Exception as err:  # noqa: BLE001 - the next check tries again; leases bound the rest
            workflow.logger.warning("%s: holder check failed: %s", self._state.model, err)
        finally:
            self._check = None

    def _describe(self, now: float) -> None:
        stats = self._admission.stats(now)
        workflow.set_current_details(
            f"{self._state.model}: {stats.in_flight} call(s) in flight of {stats.limit}, {stats.waiting} waiting"
        )

    def _should_continue_as_new(self) -> bool:
        info = workflow.info()
        if self._state.max_history_events and info.get_current_history_length() >= self._state.max_history_events:
            return True
        if self._updates >= MAX_UPDATES_PER_RUN:
            return True
        return info.is_continue_as_new_suggested()

    async def _drain(self) -> None:
        """Before continuing as new: every signal sent, the holder check over, every handler done."""
        while self._outgoing or self._check is not None:
            await asyncio.gather(*list(self._outgoing), *([self._check] if self._check else []),
                                 return_exceptions=True)
        await workflow.wait_condition(workflow.all_handlers_finished)
