"""A stand-in generation for admission tests: asks for a slot, holds it, releases it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.admission import AdmissionActivities
    from atelier.messages import QueueUpdate, SlotGrant, SlotRelease, SlotRequest


@dataclass
class ProbeInput:
    request: SlotRequest = field(default_factory=SlotRequest)
    admission_queue: str = ""
    hold_s: float = 0.0  # 0: hold until the `let_go` signal
    outcome: str = "ok"


@dataclass
class ProbeResult:
    granted_at: float = 0.0
    released_at: float = 0.0
    updates: list[QueueUpdate] = field(default_factory=list)


@workflow.defn(name="SlotProbe")
class SlotProbe:
    def __init__(self) -> None:
        self.granted: set[str] = set()
        self.updates: list[QueueUpdate] = []
        self.let_go_now = False
        self.probe_ticket = ""

    @workflow.signal(name="slot_granted")
    def slot_granted(self, grant: SlotGrant) -> None:
        self.granted.add(grant.ticket)

    @workflow.signal(name="queue_update")
    def queue_update(self, update: QueueUpdate) -> None:
        self.updates.append(update)

    @workflow.signal
    def let_go(self) -> None:
        self.let_go_now = True

    @workflow.query
    def holding(self) -> bool:
        return self.probe_ticket in self.granted

    @workflow.run
    async def run(self, p: ProbeInput) -> ProbeResult:
        self.probe_ticket = p.request.ticket
        ticket = await workflow.execute_activity_method(
            AdmissionActivities.request_slot, p.request, task_queue=p.admission_queue,
            start_to_close_timeout=timedelta(seconds=10))
        # The join_line answer: the slot itself, or the place in line (as a queue_update would tell).
        if ticket.granted:
            self.granted.add(p.request.ticket)
        elif ticket.position is not None:
            self.updates.append(QueueUpdate(model=p.request.model, position=ticket.position, eta_s=ticket.eta_s))
        await workflow.wait_condition(lambda: p.request.ticket in self.granted)
        granted_at = workflow.now().timestamp()
        if p.hold_s > 0:
            await workflow.sleep(p.hold_s)
        else:
            await workflow.wait_condition(lambda: self.let_go_now)
        released_at = workflow.now().timestamp()
        await workflow.get_external_workflow_handle(ticket.workflow_id).signal(
            "release_slot", SlotRelease(ticket=p.request.ticket, outcome=p.outcome,
                                        duration_s=released_at - granted_at))
        return ProbeResult(granted_at=granted_at, released_at=released_at, updates=self.updates)
