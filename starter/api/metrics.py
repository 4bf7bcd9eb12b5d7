"""Prometheus metrics, one registry per app (tests build many apps in one process).

Every label comes from a known set, so no client can blow up the number of series: requests
are labelled by route template (`/v1/generations/{task_id}`, or "unmatched"), never by the raw
path; by method among the standard ones, any other token being "other"; by status code.
"""

from __future__ import annotations

import time

import asyncio
from datetime import timedelta

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.service import RPCError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atelier.messages import admission_workflow_id
from workflows.admission import ModelAdmissionWorkflow

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("atelier_api_requests", "HTTP requests answered, by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("atelier_api_request_duration_seconds", "time to answer an HTTP request",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generations_started = Counter("atelier_generations_started", "generation workflows started",
                                           ["kind"], registry=self.registry)
        self.model_in_flight = Gauge("atelier_model_calls_in_flight", "AI calls holding a slot of the model's quota",
                                     ["model"], registry=self.registry)
        self.model_waiting = Gauge("atelier_model_generations_waiting", "generations waiting for a slot of the model",
                                   ["model"], registry=self.registry)
        self.model_limit = Gauge("atelier_model_call_limit",
                                 "calls in flight the model's admission allows now (declared, or learned from 429s)",
                                 ["model"], registry=self.registry)
        self.idempotent_replays = Counter("atelier_idempotent_replays",
                                          "POST /v1/generations answered from an earlier request with the same key",
                                          registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def refresh_models(self, client: Client, models: list[str], admission_queue: str) -> None:
        """Read each model's admission workflow (a query; bounded in time) into the gauges.
        A model whose admission workflow never started has nothing in flight and no one waiting."""
        async def one(model: str) -> None:
            handle = client.get_workflow_handle(admission_workflow_id(model, admission_queue))
            try:
                status = await handle.query(ModelAdmissionWorkflow.status, rpc_timeout=timedelta(seconds=2))
            except (RPCError, WorkflowQueryFailedError):
                self.model_in_flight.labels(model).set(0)
                self.model_waiting.labels(model).set(0)
                return
            self.model_in_flight.labels(model).set(status.in_flight)
            self.model_waiting.labels(model).set(status.waiting)
            self.model_limit.labels(model).set(status.limit)

        await asyncio.gather(*(one(m) for m in models))


class MetricsMiddleware:
    """Counts and times every request, including the ones answered by an error."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in KNOWN_METHODS else "other"
            code = str(status) if isinstance(status, int) and 100 <= status <= 599 else "other"
            self.metrics.requests.labels(method, template, code).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
