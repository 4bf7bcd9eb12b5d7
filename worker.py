"""The worker: builds every dependency once and runs the Temporal worker(s).

Two workers share one process and one client: the generation queue (workflows and the short
activities) and the AI queue (only `call_ai`, with its own concurrency limit: the provider's
quota), so long AI calls never starve the short steps. Scaling out is starting more of these.

    python worker.py            # both queues
    python worker.py --only ai  # only the AI queue (a separate pool of AI workers)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from datetime import timedelta
from dataclasses import dataclass

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
)
from temporalio.service import RPCError
from temporalio.worker import PollerBehaviorSimpleMaximum, UnsandboxedWorkflowRunner, Worker

from activities.admission import AdmissionActivities
from activities.ai import AiActivities
from activities.credits import CreditActivities
from activities.images import ImageActivities
from activities.models import ModelActivities
from activities.notify import NotifyActivities
from activities.retention import RetentionActivities
from activities.works import WorkActivities
from atelier.blobstore import BlobStore
from atelier.catalogue import ModelEntry, load_catalogue
from atelier.db import create_engine
from atelier.downloader import Downloader, UrlGuard, build_http_client
from atelier.links import signer_from
from atelier.messages import RetentionRequest, admission_task_queue
from atelier.providers import build_providers
from atelier.providers.base import Provider
from atelier.settings import Settings, load_settings
from workflows.admission import ModelAdmissionWorkflow
from workflows.generation import GenerationWorkflow, WebhookDeliveryWorkflow
from workflows.retention import RetentionWorkflow

log = logging.getLogger("atelier.worker")


@dataclass
class Dependencies:
    settings: Settings
    engine: AsyncEngine
    blobs: BlobStore
    http: httpx.AsyncClient
    provider_http: httpx.AsyncClient
    guard: UrlGuard
    downloader: Downloader
    providers: dict[str, Provider]
    catalogue: list[ModelEntry]

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
        await self.http.aclose()
        await self.provider_http.aclose()
        await self.engine.dispose()


def build_dependencies(settings: Settings) -> Dependencies:
    engine = create_engine(settings.database_url, pool_size=settings.database_pool_size)
    blobs = BlobStore(settings.blob_dir, fsync=settings.blob_fsync)
    http = build_http_client(settings.connect_timeout_s, settings.read_timeout_s)
    guard = UrlGuard(allow_private=settings.allow_private_urls, allowed_ports=frozenset(settings.allowed_url_ports))
    downloader = Downloader(http, guard, max_bytes=settings.max_download_bytes,
                            max_redirects=settings.max_redirects, total_timeout_s=settings.download_total_timeout_s)
    # Providers get their own pooled client: user URLs are fetched without keep-alive (each
    # request pinned to the address the guard checked), provider calls reuse connections.
    provider_http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.gemini_timeout_s, connect=settings.connect_timeout_s),
        limits=httpx.Limits(max_connections=settings.max_concurrent_ai_calls, max_keepalive_connections=100),
        trust_env=False,
    )
    providers = build_providers(settings, provider_http, blobs)
    catalogue = load_catalogue(settings)
    return Dependencies(settings, engine, blobs, http, provider_http, guard, downloader, providers, catalogue)


def build_workers(client: Client, deps: Dependencies, *, task_queue: str | None = None,
                  ai_task_queue: str | None = None, only: str = "all", **worker_options) -> list[Worker]:
    """The workers of one process. `only` is 'all', 'main' (workflows and short steps) or 'ai'."""
    s = deps.settings
    task_queue = task_queue or s.task_queue
    ai_task_queue = ai_task_queue or s.ai_task_queue
    ai = AiActivities(deps.engine, deps.blobs, deps.providers, client)
    admission = AdmissionActivities(client, task_queue=task_queue, aging_s=s.admission_aging_s,
                                    check_every_s=s.admission_check_s)
    short = [
        CreditActivities(deps.engine).charge_credits,
        CreditActivities(deps.engine).refund_credits,
        ModelActivities(deps.engine, deps.catalogue, failure_threshold=s.model_failure_threshold,
                        failure_window_s=s.model_failure_window_s,
                        available_providers=set(deps.providers)).select_model,
        ImageActivities(deps.engine, deps.blobs, deps.downloader, max_side=s.max_image_side,
                        max_pixels=s.max_image_pixels).download_and_convert,
        WorkActivities(deps.engine).save_work,
        RetentionActivities(deps.engine, deps.blobs, client, retention_hours=s.input_retention_hours).clean_inputs,
        admission.request_slot,
        admission.check_holders,
        NotifyActivities(deps.downloader,
                         secret=s.webhook_secret.get_secret_value() if s.webhook_secret else None,
                         base_url=s.public_base_url or f"http://{s.api_host}:{s.api_port}",
                         links=signer_from(s)).notify,
    ]
    # A fixed number of long polls per queue, not the SDK's autoscaling pollers: while tasks keep
    # arriving those poll with an 11 s deadline, and on a saturated server a deadline can run
    # out just as the server hands the poll a task. The task is then recorded as started and
    # never reaches the worker: an AI call lost that way waited out its 55 s heartbeat timeout
    # (temporalio/temporal#1058; docs/benchmarks.md, issue 13, sixth pass). A fixed poll waits
    # the server's full long poll, which the server ends itself.
    common = dict(
        workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(maximum=s.task_queue_polls),
        activity_task_poller_behavior=PollerBehaviorSimpleMaximum(maximum=s.task_queue_polls),
    )
    common.update(worker_options)
    if not s.workflow_sandbox:
        # The default. The sandbox re-imports a workflow's module for every new instance and
        # proxies its calls: a third of the worker's CPU in a burst. The workflows are still
        # checked in it: the tests run them sandboxed and replay every recorded history under
        # both runners (docs/benchmarks.md, issue 13, fifth and sixth passes).
        common.setdefault("workflow_runner", UnsandboxedWorkflowRunner())
    workers: list[Worker] = []
    same_queue = ai_task_queue == task_queue
    if only in ("all", "main"):
        workers.append(Worker(
            client, task_queue=task_queue,
            workflows=[GenerationWorkflow, WebhookDeliveryWorkflow, ModelAdmissionWorkflow, RetentionWorkflow],
            activities=short + ([ai.call_ai] if same_queue else []),
            max_concurrent_activities=s.max_concurrent_activities + (s.max_concurrent_ai_calls if same_queue else 0),
            max_concurrent_workflow_tasks=s.max_concurrent_workflow_tasks,
            max_cached_workflows=s.max_cached_workflows,
            graceful_shutdown_timeout=timedelta(seconds=10),
            **common,
        ))
    if only in ("all", "main"):
        # The admission workflows on a queue of their own (see atelier.messages.admission_task_queue).
        # The main worker above still runs any started on the main queue before this queue existed.
        workers.append(Worker(
            client, task_queue=admission_task_queue(task_queue), workflows=[ModelAdmissionWorkflow],
            activities=[admission.check_holders],
            graceful_shutdown_timeout=timedelta(seconds=10),
            **common,
        ))
    if only in ("all", "ai") and not same_queue:
        workers.append(Worker(
            client, task_queue=ai_task_queue, activities=[ai.call_ai],
            max_concurrent_activities=s.max_concurrent_ai_calls,
            graceful_shutdown_timeout=timedelta(seconds=10),
            **common,
        ))
    return workers


async def connect(settings: Settings, *, patience_s: float = 120.0) -> Client:
    """Connect to Temporal, waiting for it (with backoff) if it is not up yet: a worker started
    while the server restarts should wait for it, not die."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    delay = 0.5
    while True:
        try:
            return await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
        except RuntimeError as err:  # the SDK's "Failed client connect"
            if loop.time() + delay > deadline:
                raise
            log.warning("Temporal at %s not reachable (%s); retrying in %.1f s",
                        settings.temporal_address, str(err).splitlines()[0][:120], delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def retention_schedule_id(task_queue: str) -> str:
    return f"atelier-retention-{task_queue}"


async def ensure_retention_schedule(client: Client, settings: Settings) -> str:
    """Create the retention Schedule, or bring an existing one to these settings (every worker
    start does this; the Temporal UI lists it under Schedules). Returns its id."""
    schedule_id = retention_schedule_id(settings.task_queue)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            RetentionWorkflow.run, RetentionRequest(), id=f"atelier-retention-{settings.task_queue}",
            task_queue=settings.task_queue),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.retention_interval_s))]),
        # A run still going when the next is due: skip the next, never run two at once.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(schedule_id).update(lambda _input: ScheduleUpdate(schedule=schedule))
    return schedule_id


async def run(only: str) -> None:
    settings = load_settings()
    deps = build_dependencies(settings)
    client = await connect(settings)
    workers = build_workers(client, deps, only=only)
    if only in ("all", "main"):
        try:
            log.info("retention schedule %s: every %.0f s, inputs kept %.1f h after their generation",
                     await ensure_retention_schedule(client, settings), settings.retention_interval_s,
                     settings.input_retention_hours)
        except RPCError as err:
            # The worker still serves generations; the next worker start tries again.
            log.error("retention schedule not created or updated (inputs are not being deleted): %s", err)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker up: queues %s, provider %s, models %s",
             [w.task_queue for w in workers], settings.provider, [m.name for m in deps.catalogue])
    try:
        async with contextlib.AsyncExitStack() as stack:
            for w in workers:
                await stack.enter_async_context(w)
            await stop.wait()
            log.info("draining: no new tasks taken, running ones finish (up to 10 s)")
    finally:
        await deps.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the Atelier Temporal worker.")
    parser.add_argument("--only", choices=["all", "main", "ai"], default="all",
                        help="which task queues this process serves (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args.only))
    # Everything is closed; skip interpreter teardown, where the Temporal SDK can abort
    # (PyGILState_Release) and turn a clean stop into exit code 134.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
