"""/v1/generations: start, read, list and cancel generations. Nothing here waits on the work
or writes a generation's status: the workflow is its one writer; the API starts and reads."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from atelier import deletion, users
from atelier.errors import InvalidRequest
from atelier.messages import GenerationRequest, ImageInput, Kind, Status
from atelier.representation import generation_object
from starter import service
from starter.api import cursors, idempotency, preferences
from starter.api.auth import current_user
from starter.api.context import ApiContext, context
from starter.api.errors import ApiError, not_found
from starter.api.schemas import (
    ErrorResponse,
    GenerationAccepted,
    GenerationCreate,
    GenerationList,
    GenerationOut,
    GenerationSummary,
)
from starter.api.submission import SubmissionFacts, read_facts
from starter.api.urls import check_url

router = APIRouter(prefix="/v1/generations", tags=["generations"])

ERRORS = {status: {"model": ErrorResponse} for status in (401, 403, 404, 413, 422, 503)}
MAX_ID_CHARS = 128
TERMINAL = frozenset(s.value for s in Status if s.terminal)
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _urls(base: str, task_id: str) -> dict[str, str]:
    return {"get": f"{base}/v1/generations/{task_id}", "cancel": f"{base}/v1/generations/{task_id}/cancel"}


def _plausible_id(task_id: str) -> bool:
    return 0 < len(task_id) <= MAX_ID_CHARS and set(task_id) <= _ID_CHARS


def _check_inputs(ctx: ApiContext, user_id: str, body: GenerationCreate, *, deadline_s: float) -> GenerationRequest:
    """Everything that can be refused without I/O, answered 422."""
    timeouts = dataclasses.replace(service.timeouts_from(ctx.settings), deadline_s=deadline_s)
    try:
        req = service.build_request(
            ctx.settings, user_id=user_id, kind=body.kind.value,
            images=[ImageInput(url=i.url, file_id=i.file_id) for i in body.images],
            prompt=body.prompt, style=body.style, parameters=body.parameters, webhook_url=body.webhook_url,
            priority=body.priority.value, timeouts=timeouts,
            webhook_events=list(dict.fromkeys(e.value for e in body.webhook_events)),
        )
        allow_private = ctx.settings.allow_private_urls
        ports = frozenset(ctx.settings.allowed_url_ports)
        for index, image in enumerate(req.images):
            if image.url:
                check_url(image.url, f"images[{index}].url", allow_private=allow_private, allowed_ports=ports)
        if req.webhook_url:
            check_url(req.webhook_url, "webhook_url", allow_private=allow_private, allowed_ports=ports)
    except InvalidRequest as err:
        raise ApiError(422, err.code, err.message) from None
    return req


def _check_files(ctx: ApiContext, req: GenerationRequest, facts: SubmissionFacts) -> None:
    for index, image in enumerate(req.images):
        if image.file_id:
            # Someone else's file id is answered exactly like a forged one.
            key = facts.uploads.get(image.file_id)
            if key is None or not ctx.blobs.exists(key):
                raise ApiError(422, "UnknownFile", f"images[{index}]: unknown file {image.file_id!r}")


async def _ensure_started(ctx: ApiContext, req: GenerationRequest) -> bool:
    """Start the workflow for `req.task_id`; False when it already exists (that is fine)."""
    try:
        await service.start_generation(ctx.client, req, task_queue=ctx.settings.task_queue)
    except WorkflowAlreadyStartedError:
        return False
    ctx.metrics.generations_started.labels(req.kind).inc()
    return True


async def _replay(ctx: ApiContext, req: GenerationRequest, record: idempotency.KeyRecord, body_hash: str,
                  response: Response) -> str:
    """Answer a request whose key was used before: the same generation, or 409."""
    if record.body_hash != body_hash:
        raise ApiError(409, "IdempotencyKeyReused",
                       "this Idempotency-Key was already used with a different request body")
    response.headers["Idempotent-Replayed"] = "true"
    ctx.metrics.idempotent_replays.inc()
    existing = await service.describe_generation(ctx.client, record.task_id)
    if existing is not None:
        return existing.status
    # The first request stored the key but its start never happened (it died, or Temporal
    # was down): start it now, under the same task id.
    await _ensure_started(ctx, dataclasses.replace(req, task_id=record.task_id))
    return Status.QUEUED.value


PREFER_DOC = ("`wait=N` (N ≤ 60): answer with the finished generation (200, `Preference-Applied: wait=N`) if it "
              "ends within N seconds, else 202 as without it")
CANCEL_AFTER_DOC = ("a deadline for this generation: `90s`, `5m`, `1h30m` or seconds; bounded by the server's "
                    "ATELIER_GENERATION_DEADLINE_S (as `deadline_s` in the body; the smaller wins)")


PREFER_HEADERS = {
    "Preference-Applied": {"schema": {"type": "string"}, "description": "`wait=N` when the API waited (N ≤ 60)"},
    "Location": {"schema": {"type": "string"}, "description": "the generation's URL"},
    "Idempotent-Replayed": {"schema": {"type": "string"}, "description": "`true` on an Idempotency-Key replay"},
}


def _deadline(ctx: ApiContext, body: GenerationCreate, cancel_after: str | None) -> float:
    """This generation's deadline: the smallest of the body's, the header's and the server's."""
    asked = [ctx.settings.generation_deadline_s]
    if body.deadline_s is not None:
        asked.append(body.deadline_s)
    if cancel_after is not None:
        asked.append(preferences.duration_seconds(cancel_after))
    return min(asked)


async def _finished(ctx: ApiContext, request: Request, user_id: str, task_id: str, headers: dict[str, str]
                    ) -> JSONResponse | None:
    """The generation as GET answers it, with 200, if it has ended; None while it runs."""
    state = await service.read_generation(ctx.client, task_id, engine=ctx.engine)
    if state is None or state.view.status not in TERMINAL:
        return None
    return JSONResponse(generation_object(state.view, image_url=ctx.image_url(request, user_id)), status_code=200,
                        headers=headers)


@router.post(
    "", status_code=202, response_model=GenerationAccepted,
    responses={**ERRORS, 400: {"model": ErrorResponse}, 402: {"model": ErrorResponse},
               409: {"model": ErrorResponse},
               200: {"model": GenerationOut, "headers": PREFER_HEADERS,
                     "description": "the generation ended within `Prefer: wait=N`, or an Idempotency-Key replay "
                                    "of an ended generation"},
               202: {"headers": PREFER_HEADERS, "description": "started (or replayed) and still running"}},
    summary="Start a generation",
)
async def create_generation(
    body: GenerationCreate,
    request: Request,
    response: Response,
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
    idempotency_key: str | None = Header(
        default=None, alias="Idempotency-Key",
        description="the same key and body return the same generation for 24 h; another body answers 409"),
    prefer: str | None = Header(default=None, alias="Prefer", max_length=preferences.MAX_HEADER_CHARS,
                                description=PREFER_DOC),
    cancel_after: str | None = Header(default=None, alias="Cancel-After", max_length=32,
                                      description=CANCEL_AFTER_DOC),
):
    key = idempotency.check_key(idempotency_key) if idempotency_key is not None else None
    wait_s = preferences.wait_seconds(prefer)
    req = _check_inputs(ctx, user_id, body, deadline_s=_deadline(ctx, body, cancel_after))
    facts = await read_facts(ctx.engine, user_id=user_id, file_ids=[i.file_id for i in req.images if i.file_id],
                             idempotency_key=key, ttl_hours=ctx.settings.idempotency_ttl_hours)
    _check_files(ctx, req, facts)
    if not users.allows(facts.max_priority, req.priority):
        raise ApiError(403, "PriorityNotAllowed",
                       f"priority {req.priority!r} is above the highest lane this account may use "
                       f"({facts.max_priority!r}); an operator can raise it")
    base = ctx.base_url(request)
    status = Status.QUEUED.value

    digest = idempotency.body_hash(body) if key else ""
    record = facts.key_record
    if record is None:
        # A quick refusal; the workflow's atomic charge stays the authority.
        if facts.balance < req.cost:
            raise ApiError(402, "InsufficientCredits",
                           f"a {req.kind} generation costs {req.cost} credits; your balance is {facts.balance}",
                           needed=req.cost, balance=facts.balance)
        if key:
            record = await idempotency.claim(ctx.engine, user_id=user_id, key=key, body_hash=digest,
                                             task_id=req.task_id, ttl_hours=ctx.settings.idempotency_ttl_hours)
    replayed = record is not None and not record.won
    if replayed:
        status = await _replay(ctx, req, record, digest, response)
        task_id = record.task_id
    else:
        task_id = req.task_id
        # The generation holds its uploads from now on: retention never deletes an input of a
        # generation that has not ended, even one still waiting for a worker.
        await deletion.record_inputs(ctx.engine, task_id=task_id, user_id=user_id,
                                     keys=[facts.uploads[i.file_id] for i in req.images if i.file_id])
        await _ensure_started(ctx, req)
    response.headers["Location"] = f"{base}/v1/generations/{task_id}"
    if wait_s:
        response.headers["Preference-Applied"] = f"wait={wait_s}"
    headers = dict(response.headers)
    if replayed and status in TERMINAL:
        # A replay of an ended generation answers with what it became.
        finished = await _finished(ctx, request, user_id, task_id, headers)
        if finished is not None:
            return finished
    if wait_s and status not in TERMINAL:
        # Waiting reads the workflow's result (a long poll on its history): nothing is written.
        if await service.wait_closed(ctx.client, task_id, timeout_s=wait_s):
            finished = await _finished(ctx, request, user_id, task_id, headers)
            if finished is not None:
                return finished
    return {"id": task_id, "status": status, "urls": _urls(base, task_id)}


@router.get("", response_model=GenerationList, responses={**ERRORS, 400: {"model": ErrorResponse}},
            summary="List your generations")
async def list_generations(
    request: Request,
    status: Status | None = Query(default=None),
    kind: Kind | None = Query(default=None),
    limit: int = Query(default=20, ge=1, le=100),
    cursor: str | None = Query(default=None, max_length=cursors.MAX_CURSOR_CHARS),
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> dict:
    status_value = status.value if status else None
    kind_value = kind.value if kind else None
    scope = (user_id, status_value or "", kind_value or "")
    token = cursors.open_sealed(ctx.cursor_key, cursor, scope) if cursor else None
    try:
        page, next_token = await service.list_generations(ctx.client, user_id, status=status_value,
                                                          kind=kind_value, page_size=limit, page_token=token)
    except RPCError as err:
        if err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise ApiError(400, "BadCursor", "invalid or expired cursor") from None
        raise
    base = ctx.base_url(request)
    items = [
        GenerationSummary(id=g.id, kind=g.kind, status=g.status, created_at=g.created_at,
                          completed_at=g.completed_at, urls=_urls(base, g.id))
        for g in page
    ]
    next_cursor = cursors.seal(ctx.cursor_key, next_token, scope) if next_token else None
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{task_id}", response_model=GenerationOut, responses=ERRORS, summary="Read a generation")
async def get_generation(
    task_id: str,
    request: Request,
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> dict:
    state = await service.read_generation(ctx.client, task_id, engine=ctx.engine,
                                          admission_queue=ctx.settings.task_queue,
                                          known=ctx.generations, watchers=ctx.watchers,
                                          ) if _plausible_id(task_id) else None
    if state is None or state.user_id != user_id:
        raise not_found(f"no generation {task_id!r}" if _plausible_id(task_id) else "no such generation")
    return generation_object(state.view, image_url=ctx.image_url(request, user_id))


@router.post("/{task_id}/cancel", status_code=202, response_model=GenerationAccepted,
             responses={**ERRORS, 409: {"model": ErrorResponse}}, summary="Cancel a generation")
async def cancel_generation(
    task_id: str,
    request: Request,
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> dict:
    summary = await service.describe_generation(ctx.client, task_id) if _plausible_id(task_id) else None
    if summary is None or summary.user_id != user_id:
        raise not_found(f"no generation {task_id!r}" if _plausible_id(task_id) else "no such generation")
    # A workflow past its final status (still starting its webhook) is as good as closed:
    # a cancel must not race its last step.
    if not summary.running or summary.status in TERMINAL:
        raise _already_closed(task_id, summary.status)
    try:
        await service.cancel_generation(ctx.client, task_id)
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        # It closed between the describe and the cancel.
        closed = await service.describe_generation(ctx.client, task_id)
        raise _already_closed(task_id, closed.status if closed else Status.FAILED.value) from None
    return {"id": task_id, "status": summary.status, "urls": _urls(ctx.base_url(request), task_id)}


def _already_closed(task_id: str, status: str) -> ApiError:
    return ApiError(409, "AlreadyClosed", f"generation {task_id} is already {status}; it cannot be canceled",
                    status=status)

