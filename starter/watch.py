"""Running generations being read, watched so that reads and event streams cost no query each.

A generation's state changes only when one of its workflow tasks completes, and every
completion adds events to its history. A watcher long-polls the history for new events (the
server holds the request until one arrives: nothing is spent while the AI call runs) and asks
the workflow its `events` query only after a workflow task has completed (and once a minute,
so that a worker gone is noticed). Reads of a watched
generation, and its event streams, are then answered from what the watcher last heard: the
workflow stays the only writer of its state, and what is served is never older than its last
completed workflow task plus one query.

A watcher lives while it is read (it stops after `idle_s` without a reader), while the number
watched stays under `max_watched`, and while its queries are answered: when the workflow closes,
or no worker answers (the read then goes to describe, which knows pending activities), it stops
and readers fall back to reading the generation in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio.api.common.v1 import WorkflowExecution as WorkflowExecutionProto
from temporalio.api.enums.v1 import EventType, HistoryEventFilterType
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryRequest
from temporalio.client import Client, WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.common import QueryRejectCondition
from temporalio.service import RPCError

from atelier.messages import EventsPage, EventsRequest, Progress, ProgressEvent
from workflows.generation import GenerationWorkflow

log = logging.getLogger(__name__)

LONG_POLL_TIMEOUT_S = 30.0  # the server itself answers an idle long poll after ~20 s
QUERY_TIMEOUT_S = 2.0
MAX_EVENTS = 500  # a generation records a few dozen visible changes; a bound all the same
_CLOSING = frozenset({
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
})


@dataclass
class Watched:
    """What a watcher last heard from one generation's workflow."""

    task_id: str
    progress: Progress
    events: list[ProgressEvent] = field(default_factory=list)
    live: bool = True  # False once the watcher has stopped: read the generation in full
    last_read: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def heard(self, page: EventsPage) -> None:
        known = self.events[-1].seq if self.events else 0
        fresh = [e for e in page.events if e.seq > known]
        if fresh or page.progress != self.progress:
            self.events = (self.events + fresh)[-MAX_EVENTS:]
            self.progress = page.progress
            self._bump()

    def stop(self) -> None:
        if self.live:
            self.live = False
            self._bump()

    def _bump(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class GenerationWatchers:
    """The watchers of one API process (bounded; each one task and one pending long poll)."""

    def __init__(self, client: Client, *, max_watched: int = 2_000, idle_s: float = 60.0,
                 refresh_s: float = 60.0) -> None:
        self.client = client
        self.max_watched, self.idle_s, self.refresh_s = max_watched, idle_s, refresh_s
        self._watched: dict[str, Watched] = {}
        self.queries = 0  # `events` queries asked (tests and benchmarks read it)

    def __len__(self) -> int:
        return len(self._watched)

    def __contains__(self, task_id: str) -> bool:
        """Whether a watch of it runs (without counting as a read, unlike `get`)."""
        return task_id in self._watched

    def get(self, task_id: str) -> Watched | None:
        """The live watch of a generation, marked as read; None when none is running."""
        w = self._watched.get(task_id)
        if w is None or not w.live:
            return None
        w.last_read = time.monotonic()
        return w

    def watch(self, task_id: str, page: EventsPage) -> Watched | None:
        """Start watching a generation whose `events` query just answered `page` (from seq 0);
        None when too many are watched already (reads then stay direct)."""
        w = self.get(task_id)
        if w is not None:
            return w
        if len(self._watched) >= self.max_watched:
            return None
        w = Watched(task_id, page.progress, list(page.events)[-MAX_EVENTS:])
        w.task = asyncio.create_task(self._run(w), name=f"watch {task_id}")
        self._watched[task_id] = w
        return w

    async def close(self) -> None:
        tasks = [w.task for w in self._watched.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._watched.clear()

    async def _run(self, w: Watched) -> None:
        try:
            await self._follow(w)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - a watcher that fails only sends readers back to full reads
            log.info("watch of %s stopped: %s", w.task_id, err)
        finally:
            w.stop()
            if self._watched.get(w.task_id) is w:
                del self._watched[w.task_id]

    async def _follow(self, w: Watched) -> None:
        token = b""
        asked_at = time.monotonic()
        while True:
            now = time.monotonic()
            idle_left = self.idle_s - (now - w.last_read)
            if idle_left <= 0:
                return  # nobody reads it any more
            refresh_left = self.refresh_s - (now - asked_at)
            if refresh_left > 0:
                request = GetWorkflowExecutionHistoryRequest(
                    namespace=self.client.namespace, execution=WorkflowExecutionProto(workflow_id=w.task_id),
                    maximum_page_size=200, next_page_token=token, wait_new_event=True,
                    history_event_filter_type=HistoryEventFilterType.HISTORY_EVENT_FILTER_TYPE_ALL_EVENT,
                    skip_archival=True)
                try:
                    response = await asyncio.wait_for(
                        self.client.workflow_service.get_workflow_execution_history(request),
                        timeout=min(idle_left, refresh_left, LONG_POLL_TIMEOUT_S))
                except asyncio.TimeoutError:
                    continue
                types = {e.event_type for e in response.history.events}
                if types & _CLOSING or not response.next_page_token:
                    return  # closed: its history has ended
                token = response.next_page_token
                if EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED not in types:
                    continue  # the workflow has not acted: its state is what we heard
            asked_at = time.monotonic()
            if not await self._ask(w):
                return

    async def _ask(self, w: Watched) -> bool:
        """Ask the workflow what changed; False when it cannot say (closed, or no worker)."""
        after = w.events[-1].seq if w.events else 0
        handle = self.client.get_workflow_handle(w.task_id)
        self.queries += 1
        try:
            page: EventsPage = await handle.query(
                GenerationWorkflow.events, EventsRequest(after_seq=after),
                reject_condition=QueryRejectCondition.NOT_OPEN, rpc_timeout=timedelta(seconds=QUERY_TIMEOUT_S))
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
            return False
        w.heard(page)
        return True

