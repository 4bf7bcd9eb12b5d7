"""GET /v1/generations/{id}/events: a generation's progress as Server-Sent Events.

The workflow stays the one source of truth. The API reads its `events` query (the bounded log of
visible changes after a sequence number) and forwards what is new. A query, not an update: an
update would write two events into the generation's history for every look of every watcher (and
needs a worker to accept it), a query writes nothing. While the generation runs, the process's
watcher of it (starter/watch.py) asks that query only after the workflow has acted (a long poll
on its history says when) and wakes the stream; without one (too many watched, or no worker
answered), the stream asks every ATELIER_EVENTS_POLL_S. Nothing a client needs is kept only in
one API process: any replica can serve any stream, and a reconnect to another one resumes from
`Last-Event-ID`. With no worker up, the query has nobody to answer it: the stream sends its
keep-alives and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from atelier.messages import EventsPage, ProgressEvent, Status
from atelier.representation import generation_object
from starter import service
from starter.api.auth import current_user
from starter.api.context import ApiContext, context
from starter.api.errors import ApiError, not_found
from starter.api.schemas import ErrorResponse

router = APIRouter(prefix="/v1/generations", tags=["generations"])

TERMINAL = frozenset(s.value for s in Status if s.terminal)
MAX_ID_CHARS = 128
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
# A stream ends after this long at most (the client reconnects with Last-Event-ID), so a stuck
# generation cannot hold a connection forever.
MAX_STREAM_S = 3600.0
# A watched stream looks again at least this often (its watcher kept alive, the time limit checked).
WATCH_WAIT_S = 15.0

STREAM_DOC = """An event at every visible change of the generation, then its end:

- `event: progress`, `id: <seq>`, data `{id, seq, at, status, stage, progress, model, attempt,
  queue_position, eta_s, error_code}`: the ids increase with every change;
- then one final event named after the outcome (`completed`, `failed`, `canceled` or `rejected`)
  whose data is the whole generation object, exactly as `GET /v1/generations/{id}` answers it;
  the stream then closes.

Send `Last-Event-ID` (browsers' EventSource does it on reconnect) or `?after=` to resume after that
event: nothing is lost and nothing repeats. A resume after the final event answers 204 (EventSource
then stops reconnecting), and so does a resume of a generation that has closed while no worker is up
to replay its log: GET it for the outcome. A comment line (`: ping`) is sent every ATELIER_EVENTS_KEEPALIVE_S (15 s)
while nothing happens, including while no worker is up."""


def _plausible_id(task_id: str) -> bool:
    return 0 < len(task_id) <= MAX_ID_CHARS and set(task_id) <= _ID_CHARS


def _resume_point(last_event_id: str | None, after: int | None) -> int:
    if last_event_id is not None and last_event_id.strip():
        value = last_event_id.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 12):
            raise ApiError(422, "InvalidRequest", "Last-Event-ID must be the id of an event of this stream (a number)")
        return int(value)
    return after or 0


def _progress_data(task_id: str, e: ProgressEvent) -> str:
    return json.dumps({
        "id": task_id, "seq": e.seq, "at": e.at, "status": e.status, "stage": e.stage, "progress": e.percent,
        "model": e.model, "attempt": e.attempt, "queue_position": e.queue_position, "eta_s": e.eta_s,
        "error_code": e.error_code,
    }, separators=(",", ":"))


class _Watch:
    """One stream's reading of one generation: which events are new, and when it has ended."""

    def __init__(self, ctx: ApiContext, request: Request, task_id: str, user_id: str, after: int) -> None:
        self.ctx, self.request, self.task_id, self.user_id = ctx, request, task_id, user_id
        self.after = after
        self.final_seq: int | None = None  # the seq of the change that ended it, when seen

    def new_events(self, read: service.EventsRead) -> list[ProgressEvent]:
        """Events after the resume point, up to (not including) the one that ended the generation."""
        fresh = []
        for e in sorted(read.events, key=lambda e: e.seq):
            if e.seq <= self.after:
                continue
            if e.status in TERMINAL:
                self.final_seq = e.seq
                break
            fresh.append(e)
        if read.progress is not None and read.progress.status in TERMINAL and self.final_seq is None:
            self.final_seq = max(read.progress.seq, self.after + 1)
        return fresh

    def ended(self, read: service.EventsRead) -> bool:
        return self.final_seq is not None or not read.running

    async def final(self) -> ServerSentEvent | None:
        """The closing event: the whole generation object, named after its status."""
        state = await service.read_generation(self.ctx.client, self.task_id, engine=self.ctx.engine)
        if state is None:
            return None
        # No worker could say which change ended it: the workflow's result says (generations
        # started before it did: the next id after the last one sent).
        seq = self.final_seq if self.final_seq is not None else state.view.seq or self.after + 1
        body = generation_object(state.view, image_url=self.ctx.image_url(self.request, self.user_id))
        name = state.view.status if state.view.status in TERMINAL else "done"
        return ServerSentEvent(data=json.dumps(body, separators=(",", ":")), event=name, id=str(seq))


async def _stream(watch: _Watch, first: service.EventsRead) -> AsyncIterator[ServerSentEvent]:
    ctx = watch.ctx
    read: service.EventsRead | None = first
    began = time.monotonic()
    while read is not None:
        for e in watch.new_events(read):
            yield ServerSentEvent(data=_progress_data(watch.task_id, e), event="progress", id=str(e.seq))
            watch.after = e.seq
        if watch.ended(read):
            final = await watch.final()
            if final is not None:
                yield final
            return
        if time.monotonic() - began > MAX_STREAM_S:
            return
        read = await _next_read(watch, read)


def _start_watch(ctx: ApiContext, task_id: str, read: service.EventsRead) -> None:
    """Watch a running generation from a read of its whole log (from seq 0) that a worker answered."""
    if ctx.watchers is not None and read.running and read.progress is not None:
        ctx.watchers.watch(task_id, EventsPage(events=list(read.events), progress=read.progress))


async def _next_read(watch: _Watch, last: service.EventsRead) -> service.EventsRead | None:
    """The generation's next changes: from its watcher when there is one (woken when the workflow
    has acted, no query of our own), else by asking the workflow after `events_poll_s`."""
    ctx = watch.ctx
    watchers = ctx.watchers
    w = watchers.get(watch.task_id) if watchers is not None else None
    if w is None:
        await asyncio.sleep(ctx.settings.events_poll_s)
        if watchers is None:
            return await service.read_events(ctx.client, watch.task_id, watch.after)
        # The whole (bounded) log, so that a watch can start from it.
        read = await service.read_events(ctx.client, watch.task_id, 0)
        if read is not None:
            _start_watch(ctx, watch.task_id, read)
        return read
    if not any(e.seq > watch.after for e in w.events) and w.live:
        changed = w.changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=WATCH_WAIT_S)
    if not w.live:
        # Closed, or no worker answers: ask in full (describe says which).
        return await service.read_events(ctx.client, watch.task_id, watch.after)
    return service.EventsRead(watch.user_id, True, list(w.events), w.progress)


@router.get(
    "/{task_id}/events", response_class=Response, summary="Watch a generation (Server-Sent Events)",
    description=STREAM_DOC,
    responses={
        200: {"description": "the event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        204: {"description": "resumed after the final event: nothing more will come"},
        **{s: {"model": ErrorResponse} for s in (401, 404, 422, 503)},
    },
)
async def stream_events(
    task_id: str,
    request: Request,
    last_event_id: str | None = Header(default=None, alias="Last-Event-ID", max_length=64,
                                       description="resume after this event (sent by EventSource on reconnect)"),
    after: int | None = Query(default=None, ge=0, le=10**12,
                              description="resume after this event id (for clients that cannot set headers)"),
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> Response:
    resume = _resume_point(last_event_id, after)
    # The whole (bounded) log: it tells which change ended the generation, if one did.
    first = await service.read_events(ctx.client, task_id, 0) if _plausible_id(task_id) else None
    if first is None or first.user_id != user_id:
        raise not_found(f"no generation {task_id!r}" if _plausible_id(task_id) else "no such generation")
    ending = [e.seq for e in first.events if e.status in TERMINAL]
    # Resumed after the final event, or resumed once the generation had closed with no worker to
    # tell which changes are left: nothing more will come (EventSource stops on 204; GET it).
    if resume and ((ending and resume >= min(ending)) or (not first.running and first.progress is None)):
        return Response(status_code=204)
    watch = _Watch(ctx, request, task_id, user_id, resume)
    _start_watch(ctx, task_id, first)
    return EventSourceResponse(_stream(watch, first), ping=ctx.settings.events_keepalive_s,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
