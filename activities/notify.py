"""notify: POST the final generation object to the user's webhook, signed per Standard
Webhooks. The URL goes through the same guard as image downloads."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import httpx
from standardwebhooks.webhooks import Webhook
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import to_application_error
from atelier.downloader import UrlGuard
from atelier.errors import AtelierError
from atelier.messages import NotifyRequest, NotifyResult, Stage
from atelier.representation import GenerationView, generation_object

WEBHOOK_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def render_body(req: NotifyRequest, base_url: str) -> str:
    r = req.result
    view = GenerationView(
        id=r.task_id, kind=r.kind, status=r.status, stage=Stage.DONE.value, progress=100, model=r.model,
        error={"code": r.error_code, "message": r.error or ""} if r.error_code else None,
        created_at=req.created_at or None, completed_at=req.completed_at or None,
        charged=r.credits_charged, refunded=r.credits_refunded, work_id=r.work_id, images=r.images,
    )
    return json.dumps({"type": f"generation.{r.status}", "data": generation_object(view, base_url=base_url)},
                      separators=(",", ":"), sort_keys=True)


class NotifyActivities:
    def __init__(self, client: httpx.AsyncClient, guard: UrlGuard, *, secret: str | None, base_url: str) -> None:
        self.client = client
        self.guard = guard
        self.signer = Webhook(secret) if secret else None
        self.base_url = base_url

    @activity.defn
    async def notify(self, req: NotifyRequest) -> NotifyResult:
        if self.signer is None:
            raise ApplicationError("ATELIER_WEBHOOK_SECRET is not set on the worker: webhooks cannot be signed",
                                   type="WebhookNotConfigured", non_retryable=True)
        try:
            await self.guard.check(req.url)
        except AtelierError as err:
            raise to_application_error(err) from None
        body = render_body(req, self.base_url)
        msg_id = f"msg_{req.task_id}"  # the same id on every retry: receivers deduplicate on it
        now = datetime.now(timezone.utc)
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(msg_id, now, body),
            "user-agent": "atelier-webhooks/1",
        }
        attempt = activity.info().attempt
        try:
            response = await self.client.post(req.url, content=body.encode(), headers=headers,
                                              timeout=WEBHOOK_TIMEOUT, follow_redirects=False)
        except httpx.HTTPError as err:
            raise ApplicationError(f"webhook delivery failed: {type(err).__name__}", type="WebhookFailed") from None
        if not 200 <= response.status_code < 300:
            raise ApplicationError(f"webhook receiver answered {response.status_code}", type="WebhookFailed")
        return NotifyResult(status_code=response.status_code, attempts=attempt)
