"""Charge and refund activities: thin wrappers over the ledger."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from activities.errors import to_application_error
from atelier import credits
from atelier.errors import AtelierError
from atelier.messages import ChargeRequest, ChargeResult, RefundRequest, RefundResult


class CreditActivities:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @activity.defn
    async def charge_credits(self, req: ChargeRequest) -> ChargeResult:
        try:
            moved = await credits.charge(self.engine, task_id=req.task_id, user_id=req.user_id,
                                         amount=req.amount, reason=req.reason)
        except AtelierError as err:
            raise to_application_error(err) from None
        return ChargeResult(charged=moved.amount, balance=moved.balance, replayed=moved.replayed)

    @activity.defn
    async def refund_credits(self, req: RefundRequest) -> RefundResult:
        try:
            moved = await credits.refund(self.engine, task_id=req.task_id, user_id=req.user_id, reason=req.reason)
        except AtelierError as err:
            raise to_application_error(err) from None
        return RefundResult(refunded=moved.amount, balance=moved.balance, replayed=moved.replayed)
