"""/v1/admin: operators create users and add credits. Guarded by ATELIER_ADMIN_TOKEN."""

from __future__ import annotations

import hashlib
import uuid

from fastapi import APIRouter, Body, Depends, Header, Path, Response

from atelier import credits, deletion, users
from starter import service
from atelier.errors import UnknownUser
from starter.api.auth import require_admin
from starter.api.context import ApiContext, context
from starter.api import idempotency
from starter.api.errors import ApiError, not_found
from starter.api.schemas import (
    Balance,
    CreditGrant,
    ErasedUser,
    ErrorResponse,
    UserCreate,
    UserCreated,
    UserOut,
    UserUpdate,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses={s: {"model": ErrorResponse} for s in (401, 403, 413, 422)})


@router.post("/users", status_code=201, response_model=UserCreated, responses={400: {"model": ErrorResponse}},
             summary="Create a user and its API key")
async def create_user(body: UserCreate | None = Body(default=None), ctx: ApiContext = Depends(context)) -> dict:
    max_priority = (body or UserCreate()).max_priority.value
    new = await users.create_user(ctx.engine, max_priority=max_priority)
    return {"user_id": new.user_id, "api_key": new.api_key, "max_priority": max_priority}


@router.patch("/users/{user_id}", response_model=UserOut,
              responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
              summary="Change a user's highest priority lane")
async def update_user(body: UserUpdate, user_id: str = Path(max_length=64), ctx: ApiContext = Depends(context)) -> dict:
    try:
        await users.set_max_priority(ctx.engine, user_id, body.max_priority.value)
    except UnknownUser:
        raise not_found("no such user") from None
    return {"user_id": user_id, "max_priority": body.max_priority.value}


# Grant keys live beside the user's own Idempotency-Keys, under a prefix no user key can take
# (user keys are printable ASCII).
GRANT_KEY_PREFIX = "\u00a7admin-credits:"


@router.post("/users/{user_id}/credits", response_model=Balance,
             responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                        409: {"model": ErrorResponse}},
             summary="Add credits to a user's balance")
async def add_credits(
    grant: CreditGrant,
    response: Response,
    user_id: str = Path(max_length=64),
    idempotency_key: str | None = Header(
        default=None, alias="Idempotency-Key",
        description="the same key and body add the credits once for 24 h (ATELIER_IDEMPOTENCY_TTL_HOURS); "
                    "another body answers 409"),
    ctx: ApiContext = Depends(context),
) -> dict:
    grant_id = None
    if idempotency_key is not None:
        key = idempotency.check_key(idempotency_key)
        if not await users.user_exists(ctx.engine, user_id):
            raise not_found("no such user")
        digest = idempotency.body_hash(grant)
        # Same semantics as POST /v1/generations: the key names one grant (the winner's id) until
        # it expires; the same body replays it, another body is refused.
        record = await idempotency.claim(
            ctx.engine, user_id=user_id, key=GRANT_KEY_PREFIX + hashlib.sha256(key.encode()).hexdigest(),
            body_hash=digest, task_id=f"grant-{uuid.uuid4().hex}", ttl_hours=ctx.settings.idempotency_ttl_hours)
        if record.body_hash != digest:
            raise ApiError(409, "IdempotencyKeyReused",
                           "this Idempotency-Key was already used with a different request body")
        if not record.won:
            response.headers["Idempotent-Replayed"] = "true"
        grant_id = record.task_id  # a replay completes a first request that died before granting
    try:
        moved = await credits.grant(ctx.engine, user_id=user_id, amount=grant.amount,
                                    reason=grant.reason or "credits added by an operator", grant_id=grant_id)
    except UnknownUser:
        raise not_found("no such user") from None
    return {"user_id": user_id, "balance": moved.balance}


@router.post("/users/{user_id}/erase", response_model=ErasedUser, responses={404: {"model": ErrorResponse}},
             summary="Erase everything a user has (the ledger and the account stay)")
async def erase_user(user_id: str = Path(max_length=64), ctx: ApiContext = Depends(context)) -> dict:
    """Cancels the user's running generations (they refund), deletes their uploads, inputs, works
    and images (a blob another user also holds stays theirs) and the workflow histories of their
    generations. The ledger stays for accounting: amounts and reasons, no prompts, no images.
    Safe to repeat; `still_running` or `histories_left` > 0 means some histories are still there
    (a generation still closing, or a passing Temporal error): erase again."""
    if not await users.user_exists(ctx.engine, user_id):
        raise not_found("no such user")
    generations = await service.erase_generations(ctx.client, user_id)
    erased = await deletion.erase_user(ctx.engine, ctx.blobs, user_id)
    return {"user_id": user_id, "works": erased.works, "uploads": erased.uploads, "inputs": erased.inputs,
            "blobs_deleted": len(erased.blobs_deleted), "generations_canceled": generations.canceled,
            "histories_deleted": generations.histories_deleted, "still_running": generations.still_running,
            "histories_left": generations.histories_left}
