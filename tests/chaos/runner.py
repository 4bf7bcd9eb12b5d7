"""The chaos run: the whole system under faults, then an audit of what it left behind.

One Temporal dev server on a database file, worker processes and the API as subprocesses,
a fake Gemini dealing faults from a seeded deck (faults.py) and a loopback image host.
Generations are submitted through the API (with Idempotency-Key, retried like a careful
client while the API answers 5xx or not at all). Meanwhile the run SIGKILLs a worker at
random moments and starts it again, restarts the Temporal dev server once on the same
database file, and cancels some generations. Then it waits (bounded) for every generation
to close and checks invariants.py from the database, the blob store and Temporal.

    report = await ChaosRun(ChaosConfig(generations=60, seed=7)).run()
    assert report.violations == []

Every loop is bounded in count and in time; every process is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from temporalio.client import Client

from atelier.blobstore import BlobStore
from atelier.db import create_engine, create_schema_for_tests
from tests.chaos import invariants
from tests.chaos.faults import DEFAULT_WEIGHTS, FAULT_KINDS, ChaosGemini
from tests.chaos.invariants import Violation
from tests.chaos.processes import (
    Process,
    TemporalServer,
    api_process,
    clean_env,
    free_port,
    wait_http_ok,
    worker_process,
)
from tests.fakes import images as fake_images
from tests.fakes.http_server import FakeHttpServer
from tests.fakes.webhook_receiver import WebhookReceiver

COSTS = {"photography": 10, "fitting": 15}
IMAGE_COUNTS = {"photography": (1, 2), "fitting": (2, 3)}
URL_IMAGES = ["/in/a.jpg", "/in/b.png", "/in/c.jpg"]
HOLD_IMAGE = "/in/held.jpg"
QUOTA_MODELS = ("gemini-2.5-flash-image", "gemini-3-pro-image-preview")
# Quota phase: no hanging or slow replies. A call the system gave up on (timed out) would go on
# holding the fake's place, which no real quota counts for ever.
QUOTA_WEIGHTS = {name: weight for name, weight in DEFAULT_WEIGHTS.items() if name not in ("hang", "slow")}


@dataclass
class ChaosConfig:
    generations: int = 60
    seed: int = 1
    workers: int = 2
    users: int = 4
    # Submissions are spread over this many seconds.
    submit_window_s: float = 60.0
    cancel_fraction: float = 0.12
    # Share of submissions made by a user whose credits run out: some are refused (402), some rejected.
    poor_fraction: float = 0.08
    poor_credits: int = 25
    # Share of input images given by URL (the loopback image host) rather than as uploads.
    url_fraction: float = 0.4
    # Share of generations asking for a signed webhook (a receiver on loopback).
    webhook_fraction: float = 0.2
    # A worker is SIGKILLed every kill_every_s (drawn), stays down kill_down_s (drawn), from the
    # first submission until kill_tail_s after the last one.
    kill_every_s: tuple[float, float] = (6.0, 16.0)
    kill_down_s: tuple[float, float] = (0.5, 3.0)
    kill_tail_s: float = 15.0
    # When, as a share of the submit window, the dev server is restarted (None: never).
    server_restart_at: float | None = 0.45
    server_down_s: float = 2.0
    # Request timeouts (the API puts them in every GenerationRequest).
    deadline_s: float = 240.0
    ai_timeout_s: float = 20.0
    ai_heartbeat_s: float = 3.0
    ai_schedule_to_start_s: float = 90.0
    short_timeout_s: float = 5.0
    download_timeout_s: float = 20.0
    download_heartbeat_s: float = 5.0
    weights: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    work_dir: Path | None = None
    keep_work_dir: bool = False
    # How long past a generation's deadline the run waits before calling it stuck.
    stuck_grace_s: float = 60.0
    # Quota phase: each catalogue model declares max_concurrent=quota, and the fake provider
    # serves at most that many calls per model at once (2 x quota in all), answering 429 beyond.
    # None: no quota (the models' limits are learned from 429s).
    quota: int | None = None


@dataclass
class Submission:
    index: int
    key: str
    user: str  # user label: u0, u1, ... or "poor"
    kind: str
    at_s: float
    body: dict
    cancel_after_s: float | None
    task_id: str | None = None
    outcome: str = "pending"  # accepted | refused_402 | gave_up
    accepted_at: float | None = None
    attempts: int = 0
    cancel_answer: int | None = None
    final: str | None = None
    error_code: str | None = None
    webhook: bool = False


@dataclass
class ChaosReport:
    config: dict
    duration_s: float = 0.0
    submitted: int = 0
    accepted: int = 0
    refused_at_api: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)
    refunds: int = 0
    credits_charged: int = 0
    credits_refunded: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    provider_calls: int = 0
    worker_kills: int = 0
    unexpected_worker_exits: int = 0
    worker_exits_while_temporal_down: int = 0
    server_restarts: int = 0
    server_downtime_s: float = 0.0
    cancels_requested: int = 0
    cancels_accepted: int = 0
    api_answers: dict[str, int] = field(default_factory=dict)
    histories_replayed: int = 0
    webhooks_asked: int = 0
    webhooks_delivered: int = 0
    # Quota phase: the most calls the provider saw at once, and the 429s its quota answered.
    provider_max_in_flight: int = 0
    provider_quota_429s: int = 0
    # Per model: what its admission workflow did (granted slots, 429s it heard, its limit now).
    admission: dict[str, dict] = field(default_factory=dict)
    violations: list[dict] = field(default_factory=list)
    work_dir: str = ""
    # One line per submission: index, user, kind, task id, how the API answered, how it ended.
    generations: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ChaosRun:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.run_id = uuid.uuid4().hex[:8]
        self.work_dir = Path(config.work_dir or tempfile.mkdtemp(prefix="atelier-chaos-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs = self.work_dir / "logs"
        self.secrets = {
            "admin_token": "adm-" + secrets.token_urlsafe(18),
            "gemini_key": "gk-" + secrets.token_urlsafe(18),
            "webhook_secret": "whsec_" + __import__("base64").b64encode(secrets.token_bytes(24)).decode(),
        }
        self.server: TemporalServer | None = None
        self.workers: list[Process] = []
        self.api: Process | None = None
        self.api_url = ""
        self.client: Client | None = None
        self.submissions: list[Submission] = []
        self.users: dict[str, tuple[str, str]] = {}  # label -> (user_id, api_key)
        self.uploads: dict[str, list[str]] = {}  # label -> file ids
        self.api_answers: Counter[str] = Counter()
        self.violations: list[Violation] = []
        self.unexpected_exits = 0
        self.exits_while_temporal_down = 0
        self._server_down = False
        self._server_up_at = float("-inf")
        self.server_restarts = 0
        self.server_downtime_s = 0.0
        self._killing: set[int] = set()  # workers the run is killing or restarting on purpose
        self._chaos_over = asyncio.Event()

    # ---- set-up ------------------------------------------------------------------------

    def _env(self, temporal_address: str, **extra: str) -> dict[str, str]:
        c = self.config
        return clean_env(
            ATELIER_TEMPORAL_ADDRESS=temporal_address,
            ATELIER_DATABASE_URL=f"sqlite+aiosqlite:///{self.work_dir / 'atelier.db'}",
            ATELIER_BLOB_DIR=str(self.work_dir / "blobs"),
            ATELIER_TASK_QUEUE=f"chaos-{self.run_id}",
            ATELIER_AI_TASK_QUEUE=f"chaos-ai-{self.run_id}",
            ATELIER_ALLOW_PRIVATE_URLS="true",  # the image host is on loopback
            ATELIER_AI_PROVIDER="gemini",
            GEMINI_API_KEY=self.secrets["gemini_key"],
            GEMINI_BASE_URL=self.gemini.url,
            ATELIER_ADMIN_TOKEN=self.secrets["admin_token"],
            ATELIER_WEBHOOK_SECRET=self.secrets["webhook_secret"],
            ATELIER_SHORT_TIMEOUT_S=c.short_timeout_s,
            ATELIER_DOWNLOAD_TIMEOUT_S=c.download_timeout_s,
            ATELIER_DOWNLOAD_HEARTBEAT_S=c.download_heartbeat_s,
            ATELIER_DOWNLOAD_TOTAL_TIMEOUT_S=min(15.0, c.download_timeout_s * 0.75),
            ATELIER_AI_TIMEOUT_S=c.ai_timeout_s,
            ATELIER_AI_HEARTBEAT_S=c.ai_heartbeat_s,
            ATELIER_AI_SCHEDULE_TO_START_S=c.ai_schedule_to_start_s,
            ATELIER_GENERATION_DEADLINE_S=c.deadline_s,
            ATELIER_MAX_CACHED_WORKFLOWS="100",
            **({"ATELIER_MODEL_CATALOGUE": str(self.catalogue)} if self.catalogue else {}),
            **extra,
        )

    async def _set_up(self, stack: contextlib.AsyncExitStack) -> None:
        c = self.config
        engine = create_engine(f"sqlite+aiosqlite:///{self.work_dir / 'atelier.db'}")
        await create_schema_for_tests(engine)
        await engine.dispose()

        self.gemini = ChaosGemini(seed=c.seed, api_key=self.secrets["gemini_key"], weights=c.weights)
        self.catalogue: Path | None = None
        if c.quota is not None:
            # Both default Gemini models, each with the quota declared: fallback still has somewhere to go.
            self.catalogue = self.work_dir / "models.json"
            self.catalogue.write_text(json.dumps({"models": [
                {"name": name, "provider": "gemini", "priority": rank, "cost": 1, "max_concurrent": c.quota}
                for rank, name in enumerate(QUOTA_MODELS, start=1)]}))
            self.gemini.set_quota(max_in_flight=len(QUOTA_MODELS) * c.quota, retry_after="1")
        self.gemini.start()
        stack.callback(self.gemini.stop)
        self.images = FakeHttpServer().start()
        stack.callback(self.images.stop)
        self.receiver = WebhookReceiver(self.secrets["webhook_secret"]).start()
        stack.callback(self.receiver.stop)
        self.images.route("/in/a.jpg", body=fake_images.jpeg(360, 280), headers={"Content-Type": "image/jpeg"})
        self.images.route("/in/b.png", body=fake_images.png(300, 300), headers={"Content-Type": "image/png"})
        self.images.route("/in/c.jpg", body=fake_images.jpeg_with_orientation(320, 200),
                          headers={"Content-Type": "image/jpeg"})

        self.images.route(HOLD_IMAGE, body=fake_images.jpeg(200, 200), delay_s=25.0,
                          headers={"Content-Type": "image/jpeg"})

        self.server = TemporalServer(self.work_dir / "temporal.db", self.logs / "temporal.log")
        self.server.start()
        stack.callback(self.server.stop)
        await self.server.wait_ready()
        self.client = await Client.connect(self.server.address)

        api_port = free_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.api = api_process(self._env(self.server.address, ATELIER_API_HOST="127.0.0.1",
                                         ATELIER_API_PORT=str(api_port), ATELIER_PUBLIC_BASE_URL=self.api_url),
                               self.logs / "api.log")
        self.api.start()
        stack.callback(self.api.stop)
        await wait_http_ok(f"{self.api_url}/readyz", self.api, timeout_s=60)

        for i in range(c.workers):
            w = worker_process(f"worker-{i}", self._env(self.server.address), self.logs / f"worker-{i}.log")
            w.start()
            self.workers.append(w)
        stack.callback(lambda: [w.stop() for w in self.workers])

        self.http = httpx.AsyncClient(base_url=self.api_url, timeout=httpx.Timeout(15.0, connect=3.0))
        stack.push_async_callback(self.http.aclose)
        admin = {"Authorization": f"Bearer {self.secrets['admin_token']}"}
        labels = [f"u{i}" for i in range(c.users)] + ["poor"]
        for label in labels:
            r = await self.http.post("/v1/admin/users", headers=admin)
            r.raise_for_status()
            user_id, api_key = r.json()["user_id"], r.json()["api_key"]
            amount = c.poor_credits if label == "poor" else 100_000
            (await self.http.post(f"/v1/admin/users/{user_id}/credits", headers=admin,
                                  json={"amount": amount, "reason": "chaos run"})).raise_for_status()
            self.users[label] = (user_id, api_key)
            self.uploads[label] = []
            for n, data in enumerate([fake_images.jpeg(400 + 8 * len(self.uploads), 300), fake_images.png(256, 320)]):
                r = await self.http.post("/v1/uploads", headers={"Authorization": f"Bearer {api_key}"},
                                         files={"file": (f"photo{n}", data, "application/octet-stream")})
                r.raise_for_status()
                self.uploads[label].append(r.json()["file_id"])

    # ---- the plan ------------------------------------------------------------------------

    def _plan(self) -> None:
        c, rng = self.config, self.rng
        times = sorted(rng.uniform(0, c.submit_window_s) for _ in range(c.generations))
        for index, at_s in enumerate(times):
            user = "poor" if rng.random() < c.poor_fraction else f"u{rng.randrange(c.users)}"
            kind = rng.choice(["photography", "fitting"])
            low, high = IMAGE_COUNTS[kind]
            images = []
            for _ in range(rng.randint(low, high)):
                if rng.random() < c.url_fraction:
                    images.append({"url": self.images.url(rng.choice(URL_IMAGES))})
                else:
                    images.append({"file_id": rng.choice(self.uploads[user])})
            body = {"kind": kind, "images": images, "prompt": f"chaos {index}: soft window light",
                    "style": rng.choice(["studio", "editorial", ""])}
            webhook = rng.random() < c.webhook_fraction
            if webhook:
                body["webhook_url"] = self.receiver.url
            cancel = rng.uniform(0.5, 15.0) if rng.random() < c.cancel_fraction else None
            self.submissions.append(Submission(index=index, key=f"chaos-{self.run_id}-{index}", user=user,
                                               kind=kind, at_s=at_s, body=body, cancel_after_s=cancel,
                                               webhook=webhook))
        # The poor user's submissions arrive together: the API's quick balance check lets them
        # all through, and the workflow's atomic charge must refuse those the balance cannot pay.
        poor = [s for s in self.submissions if s.user == "poor"]
        if poor:
            burst_at = poor[0].at_s
            for s in poor:
                s.at_s = burst_at
        # One cancel is sure to land on a running generation: its first image is held back by
        # the image host, so the cancel arrives while it downloads.
        held = next((s for s in self.submissions if s.cancel_after_s is not None and s.user != "poor"), None)
        if held is not None:
            held.body["images"][0] = {"url": self.images.url(HOLD_IMAGE)}
            held.cancel_after_s = rng.uniform(1.0, 4.0)

    # ---- the client's side ---------------------------------------------------------------

    def _auth(self, label: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.users[label][1]}"}

    async def _call(self, method: str, path: str, *, label: str, give_up_s: float = 120.0,
                    **kw) -> httpx.Response | None:
        """One API call as a careful client makes it: retried on 5xx and transport errors,
        with the same Idempotency-Key, for at most `give_up_s`."""
        deadline = time.monotonic() + give_up_s
        headers = {**self._auth(label), **kw.pop("headers", {})}
        while True:
            try:
                r = await self.http.request(method, path, headers=headers, **kw)
            except httpx.TransportError as exc:
                self.api_answers[f"transport:{type(exc).__name__}"] += 1
                r = None
            else:
                self.api_answers[str(r.status_code)] += 1
                if r.status_code == 500:
                    self.violations.append(Violation("api_500", None, f"{method} {path}: {r.text[:300]}"))
                if r.status_code < 500:
                    return r
            if time.monotonic() > deadline:
                return r
            await asyncio.sleep(0.5)

    async def _submit(self, s: Submission, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + s.at_s - time.monotonic()))
        r = await self._call("POST", "/v1/generations", label=s.user, json=s.body,
                             headers={"Idempotency-Key": s.key})
        s.attempts = 1
        if r is None or r.status_code >= 500:
            s.outcome = "gave_up"
            self.violations.append(Violation("submit_gave_up", None, f"submission {s.index}: the API never accepted it"))
            return
        if r.status_code == 402:
            s.outcome = "refused_402"
            return
        if r.status_code != 202:
            s.outcome = f"refused_{r.status_code}"
            self.violations.append(Violation("unexpected_api_answer", None,
                                             f"submission {s.index}: {r.status_code} {r.text[:300]}"))
            return
        s.task_id, s.outcome, s.accepted_at = r.json()["id"], "accepted", time.monotonic()
        if s.cancel_after_s is not None:
            await asyncio.sleep(s.cancel_after_s)
            r = await self._call("POST", f"/v1/generations/{s.task_id}/cancel", label=s.user, give_up_s=60)
            s.cancel_answer = r.status_code if r is not None else None
            if r is not None and r.status_code not in (202, 409):
                self.violations.append(Violation("unexpected_api_answer", s.task_id,
                                                 f"cancel: {r.status_code} {r.text[:300]}"))

    # ---- the chaos -------------------------------------------------------------------------

    async def _kill_workers(self) -> None:
        c, rng = self.config, random.Random(self.config.seed + 1)
        while not self._chaos_over.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._chaos_over.wait(), timeout=rng.uniform(*c.kill_every_s))
                return
            index = rng.randrange(len(self.workers))
            worker = self.workers[index]
            self._killing.add(index)
            try:
                worker.kill()
                await asyncio.sleep(rng.uniform(*c.kill_down_s))
                if not worker.alive:
                    worker.start()
            finally:
                self._killing.discard(index)

    def _temporal_was_down_lately(self, grace_s: float = 15.0) -> bool:
        return self._server_down or time.monotonic() - self._server_up_at < grace_s

    async def _supervise(self) -> None:
        """Start again a worker that exited when nobody killed it, as a process manager would.
        A worker (re)started while Temporal is down exits at once (it cannot connect): that is
        counted, not a violation. Any other exit is a finding."""
        while True:
            await asyncio.sleep(1.0)
            for index, worker in enumerate(self.workers):
                if index not in self._killing and not worker.alive:
                    if self._temporal_was_down_lately():
                        self.exits_while_temporal_down += 1
                    else:
                        self.unexpected_exits += 1
                        self.violations.append(Violation("worker_exited", None,
                                                         f"{worker.name} exited with {worker.returncode} by itself"))
                    worker.start()

    async def _restart_server(self, at_s: float) -> None:
        await asyncio.sleep(at_s)
        assert self.server is not None
        started = time.monotonic()
        self._server_down = True
        try:
            await asyncio.to_thread(self.server.stop, 20.0)
            await asyncio.sleep(self.config.server_down_s)
            self.server.start()
            await self.server.wait_ready()
        finally:
            self._server_down = False
            self._server_up_at = time.monotonic()
        self.server_downtime_s = time.monotonic() - started
        self.server_restarts += 1

    # ---- waiting and auditing ------------------------------------------------------------------

    async def _wait_closed(self, accepted: list[Submission]) -> None:
        """Until every accepted generation is closed, or each is past its deadline and grace."""
        assert self.client is not None
        c = self.config
        open_ = {s.task_id: s for s in accepted}
        while open_:
            for task_id in list(open_):
                try:
                    status = await invariants.describe_status(self.client, task_id)
                except Exception:  # noqa: BLE001 - the server may be restarting: ask again
                    continue
                if status not in ("RUNNING", "MISSING"):
                    del open_[task_id]
            now = time.monotonic()
            if all(now > s.accepted_at + c.deadline_s + c.stuck_grace_s for s in open_.values()):
                return
            await asyncio.sleep(1.0)

    async def _audit(self, accepted: list[Submission]) -> tuple[dict, int]:
        assert self.client is not None
        task_ids = [s.task_id for s in accepted]
        states = await invariants.final_states(self.client, task_ids)
        self.violations += invariants.check_terminal(states)
        engine = create_engine(f"sqlite+aiosqlite:///{self.work_dir / 'atelier.db'}")
        try:
            costs = {s.task_id: COSTS[s.kind] for s in accepted}
            user_ids = {user_id for user_id, _ in self.users.values()}
            self.violations += await invariants.check_money_and_works(
                engine, BlobStore(self.work_dir / "blobs", fsync=False), states, costs, user_ids)
            ledger = await _ledger_totals(engine)
        finally:
            await engine.dispose()
        webhook_violations, delivered = await self._check_webhooks(accepted, states)
        self.violations += webhook_violations
        children = [f"{s.task_id}-webhook" for s in accepted if s.webhook]
        replay_violations, replayed = await invariants.check_replay(self.client, task_ids + children)
        self.violations += replay_violations
        self.violations += await self._check_api_agrees(accepted, states)
        self.violations += self._check_logs_hold_no_secret()
        self.webhooks_delivered = delivered
        for s in accepted:
            s.final, s.error_code = states[s.task_id].status, states[s.task_id].error_code
        return ledger, replayed

    async def _admission_stats(self) -> dict[str, dict]:
        """What each catalogue model's admission workflow says at the end (absent: none ran)."""
        from atelier.messages import admission_workflow_id
        from workflows.admission import ModelAdmissionWorkflow

        assert self.client is not None
        found: dict[str, dict] = {}
        for model in QUOTA_MODELS:
            handle = self.client.get_workflow_handle(admission_workflow_id(model, f"chaos-{self.run_id}"))
            try:
                st = await asyncio.wait_for(handle.query(ModelAdmissionWorkflow.status), 30)
            except Exception:  # noqa: BLE001 - no admission workflow for this model
                continue
            found[model] = {"granted": st.granted, "busy": st.busy, "reclaimed": st.reclaimed, "limit": st.limit,
                            "learned_limit": st.learned_limit, "in_flight": st.in_flight, "waiting": st.waiting}
        return found

    async def _check_webhooks(self, accepted: list[Submission], states, timeout_s: float = 60.0
                              ) -> tuple[list[Violation], int]:
        """Every generation that asked for a webhook gets a signed delivery of its final state
        (at least once: a worker killed mid-delivery may deliver twice, under the same webhook-id)."""
        wanted = {s.task_id: states[s.task_id].status for s in accepted if s.webhook}
        deadline = time.monotonic() + timeout_s

        def delivered() -> dict[str, set[str]]:
            seen: dict[str, set[str]] = {}
            for d in self.receiver.deliveries:
                if d.verified and d.succeeded and isinstance(d.payload, dict):
                    data = d.payload.get("data") or {}
                    seen.setdefault(data.get("id"), set()).add(d.payload.get("type"))
            return seen

        while time.monotonic() < deadline and not all(t in delivered() for t in wanted):
            await asyncio.sleep(0.5)
        seen, out = delivered(), []
        for task_id, status in wanted.items():
            if task_id not in seen:
                out.append(Violation("webhook_missing", task_id, f"{status}: no verified delivery in {timeout_s:g} s"))
            elif seen[task_id] != {f"generation.{status}"}:
                out.append(Violation("webhook_wrong", task_id, f"{status}: delivered {sorted(seen[task_id])}"))
        unsigned = [d for d in self.receiver.deliveries if not d.verified]
        if unsigned:
            out.append(Violation("webhook_unsigned", None, f"{len(unsigned)} deliveries failed verification"))
        return out, sum(1 for t in wanted if t in seen)

    def _check_logs_hold_no_secret(self) -> list[Violation]:
        """The processes' own logs (API, workers, Temporal) never hold a secret of the run."""
        values = {**self.secrets, "webhook_secret_body": self.secrets["webhook_secret"].removeprefix("whsec_")}
        values.update({f"api key of {label}": key for label, (_, key) in self.users.items()})
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace")
            out += [Violation("secret_in_log", None, f"{name} in {path.name}") for name, v in values.items() if v in text]
        return out

    async def _check_api_agrees(self, accepted: list[Submission], states) -> list[Violation]:
        """What a user reads through the API is what Temporal and the ledger say."""
        out = []
        for s in accepted:
            r = await self._call("GET", f"/v1/generations/{s.task_id}", label=s.user, give_up_s=30)
            if r is None or r.status_code != 200:
                out.append(Violation("api_read", s.task_id, f"GET answered {getattr(r, 'status_code', None)}"))
                continue
            view = r.json()
            if view["status"] != states[s.task_id].status:
                out.append(Violation("api_read", s.task_id,
                                     f"API says {view['status']}, Temporal says {states[s.task_id].status}"))
        return out

    # ---- the run ---------------------------------------------------------------------------------

    async def run(self) -> ChaosReport:
        c = self.config
        started = time.monotonic()
        report = ChaosReport(config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()},
                             work_dir=str(self.work_dir))
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._set_up(stack)
                self._plan()
                t0 = time.monotonic()
                supervisor = asyncio.create_task(self._supervise())
                killer = asyncio.create_task(self._kill_workers())
                restart = (asyncio.create_task(self._restart_server(c.server_restart_at * c.submit_window_s))
                           if c.server_restart_at is not None else None)
                try:
                    await asyncio.gather(*(self._submit(s, t0) for s in self.submissions))
                    await asyncio.sleep(max(0.0, t0 + c.submit_window_s + c.kill_tail_s - time.monotonic()))
                    self._chaos_over.set()
                    await killer
                    if restart is not None:
                        await restart
                    accepted = [s for s in self.submissions if s.outcome == "accepted"]
                    await self._wait_closed(accepted)
                finally:
                    self._chaos_over.set()
                    for task in (killer, restart):
                        if task is not None and not task.done():
                            task.cancel()
                supervisor.cancel()
                ledger, report.histories_replayed = await self._audit(accepted)
                report.admission = await self._admission_stats()
                # The processes must still be up after all of it.
                for p in [self.api, *self.workers]:
                    if not p.alive:
                        self.violations.append(Violation("process_down", None, f"{p.name} is not running at the end"))
        finally:
            report.duration_s = round(time.monotonic() - started, 1)
        accepted = [s for s in self.submissions if s.outcome == "accepted"]
        report.submitted = len(self.submissions)
        report.accepted = len(accepted)
        report.refused_at_api = sum(1 for s in self.submissions if s.outcome.startswith("refused"))
        report.statuses = dict(Counter(s.final or "unknown" for s in accepted))
        report.error_codes = dict(Counter(s.error_code for s in accepted if s.error_code))
        report.refunds, report.credits_charged, report.credits_refunded = (
            ledger["refunds"], ledger["charged"], ledger["refunded"])
        report.faults = self.gemini.faults()
        report.provider_calls = len(self.gemini.requests)
        report.worker_kills = sum(w.kills for w in self.workers)
        report.unexpected_worker_exits = self.unexpected_exits
        report.worker_exits_while_temporal_down = self.exits_while_temporal_down
        report.server_restarts = self.server_restarts
        report.server_downtime_s = round(self.server_downtime_s, 1)
        report.cancels_requested = sum(1 for s in accepted if s.cancel_after_s is not None)
        report.cancels_accepted = sum(1 for s in accepted if s.cancel_answer == 202)
        report.api_answers = dict(sorted(self.api_answers.items()))
        report.webhooks_asked = sum(1 for s in accepted if s.webhook)
        report.webhooks_delivered = getattr(self, "webhooks_delivered", 0)
        quota = self.gemini.quota_stats()
        report.provider_max_in_flight, report.provider_quota_429s = quota.max_in_flight_seen, quota.busy_answers
        if c.quota is not None and quota.max_in_flight_seen > len(QUOTA_MODELS) * c.quota:
            self.violations.append(Violation(
                "quota_exceeded", None, f"the provider saw {quota.max_in_flight_seen} calls at once; the quota "
                                        f"allows {len(QUOTA_MODELS) * c.quota} ({c.quota} per model)"))
        report.violations = [v.to_dict() for v in self.violations]
        report.generations = [
            {"index": s.index, "user": s.user, "kind": s.kind, "task_id": s.task_id, "outcome": s.outcome,
             "status": s.final, "error_code": s.error_code, "cancel_answer": s.cancel_answer, "webhook": s.webhook}
            for s in self.submissions
        ]
        if not c.keep_work_dir and not self.violations:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            report.work_dir = ""
        return report


async def _ledger_totals(engine) -> dict[str, int]:
    from sqlalchemy import func, select

    from atelier.db import ledger

    async with engine.connect() as conn:
        rows = dict((await conn.execute(select(ledger.c.entry, func.sum(ledger.c.amount)).group_by(ledger.c.entry))).all())
        refunds = (await conn.execute(select(func.count()).where(ledger.c.entry == "refund"))).scalar_one()
    return {"charged": -int(rows.get("charge") or 0), "refunded": int(rows.get("refund") or 0), "refunds": int(refunds)}


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    return await ChaosRun(config).run()


__all__ = ["ChaosConfig", "ChaosReport", "ChaosRun", "FAULT_KINDS", "QUOTA_WEIGHTS", "run_chaos"]
