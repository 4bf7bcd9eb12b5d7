"""notify: POST the final generation object to the user's webhook, signed per Standard
Webhooks. The URL goes through the same guard as image downloads."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from standardwebhooks.webhooks import Webhook
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import to_application_error
from atelier.downloader import Downloader
from atelier.errors import AtelierError, UrlRefused
from atelier.links import LinkSigner
from atelier.messages import NotifyRequest, NotifyResult, ProgressEvent
from atelier.representation import generation_object, view_of_result


def render_body(req: NotifyRequest, base_url: str, links: LinkSigner | None = None) -> str:
    """The webhook body. completed: the same generation object GET answers, with signed image
    links (made at delivery, valid ATELIER_URL_TTL_S) when a signing secret is set; started and
    progress: the change itself."""
    if req.event != "completed":
        c = req.change or ProgressEvent()
        data = {"id": req.task_id, "kind": req.result.kind, "seq": c.seq, "at": c.at, "status": c.status,
                "stage": c.stage, "progress": c.percent, "model": c.model, "attempt": c.attempt,
                "queue_position": c.queue_position, "eta_s": c.eta_s, "created_at": req.created_at or None}
        return json.dumps({"type": f"generation.{req.event}", "data": data}, separators=(",", ":"), sort_keys=True)
    view = view_of_result(req.result, created_at=req.created_at or None, completed_at=req.completed_at or None)
    image_url = (lambda key: links.sign(base_url, key, req.user_id)) if links is not None else None
    data = generation_object(view, base_url=base_url, image_url=image_url)
    return json.dumps({"type": f"generation.{view.status}", "data": data}, separators=(",", ":"), sort_keys=True)


def message_id(req: NotifyRequest) -> str:
    """The same id on every retry of one delivery, a distinct one per delivery: receivers deduplicate on it."""
    if req.event == "completed":
        return f"msg_{req.task_id}"
    if req.event == "started":
        return f"msg_{req.task_id}_started"
    return f"msg_{req.task_id}_progress_{req.change.seq if req.change else 0}"


class NotifyActivities:
    def __init__(self, sender: Downloader, *, secret: str | None, base_url: str,
                 links: LinkSigner | None = None) -> None:
        # The guarded downloader sends webhooks too: same URL guard, pinned to the checked address.
        self.sender = sender
        self.signer = Webhook(secret) if secret else None
        self.base_url = base_url
        self.links = links

    @activity.defn
    async def notify(self, req: NotifyRequest) -> NotifyResult:
        if self.signer is None:
            raise ApplicationError("ATELIER_WEBHOOK_SECRET is not set on the worker: webhooks cannot be signed",
                                   type="WebhookNotConfigured", non_retryable=True)
        body = render_body(req, self.base_url, self.links)
        msg_id = message_id(req)
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
            status = await self.sender.post(req.url, content=body.encode(), headers=headers)
        except UrlRefused as err:
            raise to_application_error(err) from None
        except AtelierError as err:
            raise ApplicationError(f"webhook delivery failed: {err.message}", type="WebhookFailed") from None
        if not 200 <= status < 300:
            raise ApplicationError(f"webhook receiver answered {status}", type="WebhookFailed")
        return NotifyResult(status_code=status, attempts=attempt)
