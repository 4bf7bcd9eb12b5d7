"""Reads: GET /v1/credits and GET /v1/generations/{id} (running and finished) beside GET /healthz,
at C concurrent keep-alive clients, while N generations are in flight.

The stack as `make run` ships it: the API (`python -m starter.api`, one uvicorn process) and
one worker (`python worker.py`, the `local` provider) on a dev server and a SQLite database.
One generation is run to the end first (the worker with no delay), then the worker restarts
with a long delay and N generations are submitted, so they sit in the AI call (stage
`generating`) while the reads run. Arms, each a closed loop of C clients for D seconds, in
turn: /healthz (the HTTP stack alone), /v1/credits, the finished generation, the running
ones (cycled); users' keys cycled. Per arm: requests per second, p50/p99 and the CPU per
request of the API process, the Temporal server and the worker. `--py-spy DIR` records the
API with py-spy (collapsed stacks, one file per arm).

Goals (issue 13, goal 5): at C = 20, /v1/credits at least 1/2 of /healthz's rate, a running
generation at least 1/3, with p99 under 100 ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import psutil

from atelier import credits, users
from atelier.db import create_engine
from bench.common import (
    free_port,
    dev_server_flags,
    ImageServer,
    ManagedProcess,
    console,
    parser,
    prepare_database,
    print_table,
    ratio,
    resolve_paths,
    run_main,
    settings_env,
    small_jpeg,
    stack,
    start_project_worker,
    wait_for_pollers,
    write_result,
)
from bench.submit import RawHttpPool, closed_loop, wait_healthy

NAME = "reads"
GOAL_CREDITS_RATIO = 0.5
GOAL_RUNNING_RATIO = 1 / 3
GOAL_P99_MS = 100.0
ADMIN = "bench-admin-token"


async def _json(http: RawHttpPool, method: str, path: str, key: str, body: dict | None = None) -> dict:
    """One request through a throw-away httpx client (setup only, not measured)."""
    import httpx

    async with httpx.AsyncClient(base_url=f"http://{http.host}:{http.port}", timeout=30, trust_env=False) as c:
        r = await c.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
        r.raise_for_status()
        return r.json()


async def _wait_stage(http: RawHttpPool, key: str, task_id: str, done: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        g = await _json(http, "GET", f"/v1/generations/{task_id}", key)
        if g["status"] in done or g.get("stage") in done:
            return g
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{task_id} not in {done} within {timeout} s")


async def bench(args) -> None:
    started = time.time()
    n = 5 if args.quick else args.in_flight
    duration, warmup, c = (1.5, 0.3, 5) if args.quick else (args.duration, args.warmup, args.concurrency)
    async with stack(NAME, keep_tmp=args.keep_tmp, server_args=dev_server_flags(args)) as s:
        port = free_port()
        settings = s.settings(api_host="127.0.0.1", api_port=port, admin_token=ADMIN)
        await prepare_database(settings)
        engine = create_engine(settings.database_url)
        keys = []
        for _ in range(args.users):
            new = await users.create_user(engine)
            await credits.grant(engine, user_id=new.user_id, amount=10**9, reason="benchmark")
            keys.append(new.api_key)
        await engine.dispose()
        env = settings_env(settings, ATELIER_API_HOST="127.0.0.1", ATELIER_API_PORT=str(port),
                           ATELIER_ADMIN_TOKEN=ADMIN, **dict(kv.split("=", 1) for kv in args.api_env))
        api = ManagedProcess("api", [sys.executable, "-m", "starter.api"], env=env, log_dir=s.tmp).start()
        s.children.append(api)
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base, api)
        http = RawHttpPool("127.0.0.1", port)
        with ImageServer() as images:
            url = images.add("/p.jpg", small_jpeg(1))
            body = {"kind": "photography", "images": [{"url": url}], "style": "studio"}
            # One generation to the end, then the worker again with a long delay for the rest.
            worker = start_project_worker(s, settings, "worker-quick")
            await wait_for_pollers(s.client, [(settings.task_queue, "workflow")], worker)
            finished = (await _json(http, "POST", "/v1/generations", keys[0], body))["id"]
            await _wait_stage(http, keys[0], finished, {"completed"}, 120)
            worker.stop()
            slow = s.settings(delay_s=args.delay, task_queue=settings.task_queue,
                              ai_task_queue=settings.ai_task_queue, database_url=settings.database_url,
                              blob_dir=settings.blob_dir)
            worker = start_project_worker(s, slow, "worker")
            await wait_for_pollers(s.client, [(settings.task_queue, "workflow")], worker)
            running: list[tuple[str, str]] = []
            for i in range(n):
                key = keys[i % len(keys)]
                running.append((key, (await _json(http, "POST", "/v1/generations", key, body))["id"]))
            await _wait_stage(http, running[-1][0], running[-1][1], {"generating"}, 300)
            console.print(f"{n} generations in flight (last one generating); reads at {c} clients")
            owner_of_finished = keys[0]
            counter = 0

            def auth(key: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {key}"}

            async def healthz() -> bool:
                return await http.request("GET", "/healthz") == 200

            async def credits_call() -> bool:
                nonlocal counter
                counter += 1
                return await http.request("GET", "/v1/credits?limit=20", headers=auth(keys[counter % len(keys)])) == 200

            async def get_finished() -> bool:
                return await http.request("GET", f"/v1/generations/{finished}", headers=auth(owner_of_finished)) == 200

            async def get_running() -> bool:
                nonlocal counter
                counter += 1
                key, task_id = running[counter % len(running)]
                return await http.request("GET", f"/v1/generations/{task_id}", headers=auth(key)) == 200

            procs = {"api": api.ps, "server": s.server, "worker": worker.ps}
            arms = {"healthz": healthz, "credits": credits_call, "finished": get_finished, "running": get_running}
            results: dict = {"in_flight": n, "concurrency": c, "arms": {}}
            for name, call in arms.items():
                if args.py_spy is not None:
                    args.py_spy.mkdir(parents=True, exist_ok=True)
                    api.profile(args.py_spy / f"reads-api-{name}.txt", rate=100)
                results["arms"][name] = await closed_loop(call, c, duration, warmup, procs)
                if api.profiler is not None:
                    import signal

                    api.profiler.send_signal(signal.SIGINT)
                    api.profiler.wait(timeout=60)
                    api.profiler = None
            still = await _json(http, "GET", f"/v1/generations/{running[0][1]}", running[0][0])
            results["running_stage_at_end"] = still.get("stage")
        await http.aclose()
    a = results["arms"]
    results["credits_vs_healthz"] = ratio(a["credits"]["rps"], a["healthz"]["rps"])
    results["running_vs_healthz"] = ratio(a["running"]["rps"], a["healthz"]["rps"])
    results["finished_vs_healthz"] = ratio(a["finished"]["rps"], a["healthz"]["rps"])
    results["goals_met"] = {
        "credits": bool(results["credits_vs_healthz"] >= GOAL_CREDITS_RATIO),
        "running": bool(results["running_vs_healthz"] >= GOAL_RUNNING_RATIO),
        "running_p99": bool(a["running"]["latency_ms"].get("p99", 1e9) < GOAL_P99_MS),
    }
    results["load_average_1m"] = round(psutil.getloadavg()[0], 2)
    print_table(f"Reads at {c} clients, {n} generations in flight (CPU ms per request)",
                ["arm", "req/s", "x healthz", "p50 ms", "p99 ms", "errors", "API CPU", "server CPU", "worker CPU"],
                [[name, r["rps"], ratio(r["rps"], a["healthz"]["rps"]), r["latency_ms"].get("p50"),
                  r["latency_ms"].get("p99"), r["errors"], r["cpu_ms_per_request"].get("api"),
                  r["cpu_ms_per_request"].get("server"), r["cpu_ms_per_request"].get("worker")]
                 for name, r in a.items()],
                caption=f"goals: credits >= {GOAL_CREDITS_RATIO}x healthz, running >= 1/3 with p99 < "
                        f"{GOAL_P99_MS:g} ms: {results['goals_met']}")
    write_result(NAME, args, results, goals={"credits_ratio_min": GOAL_CREDITS_RATIO,
                                             "running_ratio_min": round(GOAL_RUNNING_RATIO, 3),
                                             "running_p99_max_ms": GOAL_P99_MS}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--in-flight", type=int, default=200, help="generations in flight during the reads")
    p.add_argument("--concurrency", type=int, default=20, help="concurrent clients")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per arm")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each arm")
    p.add_argument("--delay", type=float, default=900.0, help="the local provider's delay while reads run")
    p.add_argument("--users", type=int, default=20, help="distinct users (API keys)")
    p.add_argument("--py-spy", type=Path, default=None, metavar="DIR", help="record the API with py-spy per arm")
    p.add_argument("--api-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the API process (to measure a variant)")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
