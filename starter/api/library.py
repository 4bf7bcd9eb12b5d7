"""/v1/works and /v1/credits: what a user has made and what it cost them."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request, Response

from atelier import credits, deletion, works
from atelier.representation import ImageUrl
from starter.api import cursors
from starter.api.auth import current_user
from starter.api.context import ApiContext, context
from starter.api.errors import not_found
from starter.api.schemas import Account, ErrorResponse, WorkList, WorkOut

router = APIRouter(tags=["works and credits"], responses={s: {"model": ErrorResponse} for s in (401, 422)})


def _iso(value: datetime) -> str:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()


def _work(work: works.Work, link: ImageUrl) -> dict:
    return {
        "id": work.id, "generation_id": work.task_id, "kind": work.kind, "model": work.model,
        "prompt": work.prompt, "created_at": _iso(work.created_at),
        "images": [{"url": link(i.key), "width": i.width, "height": i.height,
                    "content_type": i.content_type} for i in work.images],
    }


@router.get("/v1/works", response_model=WorkList, responses={400: {"model": ErrorResponse}},
            summary="List your works, newest first")
async def list_works(
    request: Request,
    limit: int = Query(default=20, ge=1, le=100),
    cursor: str | None = Query(default=None, max_length=cursors.MAX_CURSOR_CHARS),
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> dict:
    before = cursors.decode_time(cursor) if cursor else None
    page = await works.list_works(ctx.engine, user_id, limit=limit + 1, before=before)
    link = ctx.image_url(request, user_id)
    next_cursor = cursors.encode_time(page[limit - 1].created_at) if len(page) > limit else None
    return {"items": [_work(w, link) for w in page[:limit]], "next_cursor": next_cursor}


@router.get("/v1/works/{work_id}", response_model=WorkOut, responses={404: {"model": ErrorResponse}},
            summary="Read one of your works")
async def get_work(
    work_id: str,
    request: Request,
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> dict:
    work = await works.get_work(ctx.engine, work_id) if len(work_id) <= 64 else None
    if work is None or work.user_id != user_id:
        raise not_found("no such work")
    return _work(work, ctx.image_url(request, user_id))


@router.delete("/v1/works/{work_id}", status_code=204, response_class=Response,
               responses={404: {"model": ErrorResponse}}, summary="Delete one of your works and its images")
async def delete_work(
    work_id: str,
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> Response:
    """The work, its images and its generation's input images are deleted at once (a blob another
    user also holds stays theirs); signed links to them stop working. The ledger keeps the charge."""
    deleted = await deletion.delete_work(ctx.engine, ctx.blobs, user_id=user_id, work_id=work_id) \
        if len(work_id) <= 64 else None
    if deleted is None:
        raise not_found("no such work")
    return Response(status_code=204)


@router.get("/v1/credits", response_model=Account, summary="Your balance and recent ledger entries")
async def get_credits(
    limit: int = Query(default=50, ge=1, le=200),
    user_id: str = Depends(current_user),
    ctx: ApiContext = Depends(context),
) -> dict:
    balance, entries = await credits.account(ctx.engine, user_id, limit=limit)
    return {
        "balance": balance,
        "entries": [{"id": e.id, "generation_id": e.task_id, "entry": e.entry, "amount": e.amount,
                     "reason": e.reason, "created_at": _iso(e.created_at)} for e in entries],
    }
