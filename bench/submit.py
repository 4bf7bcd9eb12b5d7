"""Submit latency: POST /v1/generations through the API, beside bare start_workflow calls.

The API runs as it ships (`python -m starter.api`: uvicorn, one process) on loopback,
against the same dev server and a SQLite app database; no worker runs (the API never
waits on the work, so the workflows just queue). The client is a minimal keep-alive HTTP/1.1
client (httpx's pool costs more CPU than the API at 50 clients on these two shared cores),
authenticating as users with enough credits; every request starts a new generation of one
image URL. A third arm, GET /healthz, is the HTTP stack alone. The baseline, in this process, calls `client.start_workflow` exactly as the
API's start does (starter.service.start_generation: same request, search attributes and
summary), at the same concurrency.

* closed loop: C clients, each sending its next request when the last one answered, for
  a fixed time; p50/p99 latency and requests per second. The two arms alternate per C.
* open loop: requests sent on a fixed schedule (100 per second), latency measured from
  each request's scheduled time, so a stall is counted in full (no coordinated omission).

Goals (issues 3 and 6): open loop at 100/s p99 < 50 ms; closed loop at 1, 10 and 50
clients p50 and p99 within 1.2x bare; requests per second at saturation >= 0.8x bare.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import psutil

from atelier import credits, users
from atelier.db import create_engine
from atelier.messages import ImageInput
from bench.common import (
    free_port,
    dev_server_flags,
    ManagedProcess,
    console,
    cpu_seconds,
    parser,
    pct,
    prepare_database,
    print_table,
    ratio,
    resolve_paths,
    run_main,
    settings_env,
    stack,
    summary,
    write_result,
)
from starter.service import build_request, start_generation

NAME = "submit"
GOAL_OPEN_P99_MS = 50.0
GOAL_LATENCY_RATIO = 1.2
GOAL_RPS_RATIO = 0.8
IMAGE_URL = "http://127.0.0.1:9/photo.jpg"  # never fetched: no worker runs
BODY = {"kind": "photography", "images": [{"url": IMAGE_URL}], "style": "studio"}


class _Closed(Exception):
    """The server closed a kept-alive connection before answering."""


class RawHttpPool:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for loopback load only.

    httpx is a fine client but not a load generator: its connection pool costs ~15 ms of CPU
    per request at 50 concurrent requests (measured here), on the same two cores as the API,
    which made the benchmark measure itself. This one parses only what uvicorn sends back
    (status line, Content-Length body) and costs a fraction of a millisecond."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        while self._idle:  # a kept-alive connection the server may have closed meanwhile
            conn = self._idle.pop()
            try:
                return await self._exchange(conn, message)
            except (ConnectionError, asyncio.IncompleteReadError, _Closed):
                conn[1].close()
        return await self._exchange(await asyncio.open_connection(self.host, self.port), message)

    async def _exchange(self, conn, message: bytes) -> int:
        reader, writer = conn
        writer.write(message)
        try:
            status_line = await reader.readline()
            if not status_line:
                raise _Closed()
            status = int(status_line.split(b" ", 2)[1])
            length, keep = 0, True
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    keep = False
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if keep:
            self._idle.append(conn)
        else:
            writer.close()
        return status

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def closed_loop(call, concurrency: int, duration: float, warmup: float, procs: dict | None = None) -> dict:
    """C clients in a loop for `warmup` + `duration` s; only the last `duration` s count.
    `procs`: name -> psutil.Process whose CPU per request is reported."""
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    t_measure, t_stop = t_start + warmup, t_start + warmup + duration
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        while loop.time() < t_stop:
            t = loop.time()
            ok = await call()
            if t >= t_measure:
                if ok:
                    latencies.append(loop.time() - t)
                else:
                    errors += 1

    cpu_at_measure: dict = {}

    async def mark() -> None:
        await asyncio.sleep(max(0.0, t_measure - loop.time()))
        cpu_at_measure.update({name: cpu_seconds(p) for name, p in (procs or {}).items()})

    marker = asyncio.ensure_future(mark())
    await asyncio.gather(*(client() for _ in range(concurrency)))
    await marker
    cpu_ms = {name: round((cpu_seconds(p) - cpu_at_measure[name]) / max(1, len(latencies)) * 1000, 2)
              for name, p in (procs or {}).items()}
    elapsed = max(loop.time(), t_stop) - t_measure
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "rps": round(len(latencies) / elapsed, 1), "latency_ms": summary(latencies, 1000),
            "cpu_ms_per_request": cpu_ms}


async def open_loop(call, rate: float, duration: float) -> dict:
    """`rate` requests per second for `duration` s, each timed from its scheduled start."""
    loop = asyncio.get_running_loop()
    n = int(rate * duration)
    t0 = loop.time() + 0.2
    latencies: list[float] = []
    errors = 0
    late: list[float] = []

    async def one(i: int) -> None:
        nonlocal errors
        scheduled = t0 + i / rate
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        late.append(loop.time() - scheduled)
        ok = await call()
        if ok:
            latencies.append(loop.time() - scheduled)
        else:
            errors += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return {"rate": rate, "requests": len(latencies), "errors": errors, "latency_ms": summary(latencies, 1000),
            "send_lag_ms_p99": round(pct(late, 99) * 1000, 2)}


async def wait_healthy(base: str, proc: ManagedProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2, trust_env=False) as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"the API exited:\n{proc.log_tail()}")
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the API did not answer /healthz within {timeout} s:\n{proc.log_tail()}")


def chart(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["closed_loop"]
    cs = [r["concurrency"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, color in (("api", "tab:blue"), ("bare", "tab:gray")):
        label = "POST /v1/generations" if arm == "api" else "bare start_workflow"
        ax.plot(cs, [r[arm]["latency_ms"]["p50"] for r in rows], "o-", color=color, label=f"{label} p50")
        ax.plot(cs, [r[arm]["latency_ms"]["p99"] for r in rows], "s--", color=color, label=f"{label} p99")
        ax2.plot(cs, [r[arm]["rps"] for r in rows], "o-", color=color, label=label)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xticks(cs, [str(c) for c in cs])
        a.set_xlabel("concurrent clients (closed loop)")
        a.grid(True, alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Submit latency against concurrency")
    ax2.set_ylabel("requests per second")
    ax2.set_title("Submit throughput")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def bench(args) -> None:
    started = time.time()
    if args.quick:
        levels, duration, warmup, rate, open_s = [1, 5], 1.5, 0.3, 20.0, 1.0
    else:
        levels = [int(c) for c in args.concurrency.split(",")]
        duration, warmup, rate, open_s = args.duration, args.warmup, args.rate, args.open_seconds
    async with stack(NAME, keep_tmp=args.keep_tmp, server_args=dev_server_flags(args)) as s:
        port = free_port()
        settings = s.settings(api_host="127.0.0.1", api_port=port, admin_token="bench-admin-token")
        await prepare_database(settings)
        engine = create_engine(settings.database_url)
        keys, user_ids = [], []
        for _ in range(args.users):
            new = await users.create_user(engine)
            await credits.grant(engine, user_id=new.user_id, amount=10**9, reason="benchmark")
            keys.append(new.api_key)
            user_ids.append(new.user_id)
        await engine.dispose()
        env = settings_env(settings, ATELIER_API_HOST="127.0.0.1", ATELIER_API_PORT=str(port),
                           ATELIER_ADMIN_TOKEN="bench-admin-token",
                           **dict(kv.split("=", 1) for kv in args.api_env))
        api = ManagedProcess("api", [__import__("sys").executable, "-m", "starter.api"], env=env,
                             log_dir=s.tmp).start()
        s.children.append(api)
        base = f"http://127.0.0.1:{port}"
        await wait_healthy(base, api)
        if args.py_spy is not None:
            args.py_spy.mkdir(parents=True, exist_ok=True)
            api.profile(args.py_spy / "submit-api.txt")
        counter = 0
        http = RawHttpPool("127.0.0.1", port)
        body = json.dumps(BODY).encode()
        try:

            async def api_call() -> bool:
                nonlocal counter
                counter += 1
                status = await http.request("POST", "/v1/generations", body, {
                    "Authorization": f"Bearer {keys[counter % len(keys)]}", "Content-Type": "application/json"})
                return status == 202

            async def healthz_call() -> bool:
                return await http.request("GET", "/healthz") == 200

            async def bare_call() -> bool:
                nonlocal counter
                counter += 1
                req = build_request(settings, user_id=user_ids[counter % len(user_ids)], kind="photography",
                                    images=[ImageInput(url=IMAGE_URL)], style="studio")
                await start_generation(s.client, req, task_queue=settings.task_queue)
                return True

            if not await api_call():
                raise RuntimeError(f"the API refused the benchmark's request:\n{api.log_tail()}")
            procs = {"api": api.ps, "server": s.server, "bench": psutil.Process()}
            arms = {"api": api_call, "bare": bare_call, "healthz": healthz_call}
            closed = []
            for i, c in enumerate(levels):
                console.print(f"closed loop, {c} client(s)")
                # Alternate which arm goes first, so a drifting load hits both alike.
                order = ("bare", "api", "healthz") if i % 2 == 0 else ("api", "bare", "healthz")
                row: dict = {"concurrency": c}
                for arm in order:
                    if args.only == "api" and arm != "api":
                        row[arm] = {"rps": float("nan"), "latency_ms": {"p50": float("nan"), "p99": float("nan")},
                                    "cpu_ms_per_request": {}}
                        continue
                    # /healthz: the HTTP stack alone (uvicorn, FastAPI, middleware, httpx client), shorter.
                    row[arm] = await closed_loop(arms[arm], c, duration / (2 if arm == "healthz" else 1), warmup,
                                                 procs)
                row["p50_ratio"] = ratio(row["api"]["latency_ms"]["p50"], row["bare"]["latency_ms"]["p50"])
                row["p99_ratio"] = ratio(row["api"]["latency_ms"]["p99"], row["bare"]["latency_ms"]["p99"])
                row["rps_ratio"] = ratio(row["api"]["rps"], row["bare"]["rps"])
                closed.append(row)
            console.print(f"open loop, {rate:g} per second for {open_s:g} s")
            open_bare = await open_loop(bare_call, rate, open_s)
            open_api = await open_loop(api_call, rate, open_s)
        finally:
            await http.aclose()
        api.stop()

    sat_api = max(r["api"]["rps"] for r in closed)
    sat_bare = max(r["bare"]["rps"] for r in closed)
    gated = [r for r in closed if r["concurrency"] <= 50]
    results = {
        "closed_loop": closed,
        "open_loop": {"api": open_api, "bare": open_bare},
        "saturation_rps": {"api": sat_api, "bare": sat_bare, "ratio": ratio(sat_api, sat_bare)},
        "open_loop_p99_ms": open_api["latency_ms"].get("p99"),
    }
    results["goals_met"] = {
        "open_loop_p99": bool(results["open_loop_p99_ms"] < GOAL_OPEN_P99_MS),
        "latency_within_1_2x_at_1_10_50": bool(gated) and all(
            r["p50_ratio"] <= GOAL_LATENCY_RATIO and r["p99_ratio"] <= GOAL_LATENCY_RATIO for r in gated),
        "saturation_rps": bool(results["saturation_rps"]["ratio"] >= GOAL_RPS_RATIO),
    }
    rows = []
    for r in closed:
        rows.append([r["concurrency"], r["bare"]["latency_ms"]["p50"], r["api"]["latency_ms"]["p50"], r["p50_ratio"],
                     r["bare"]["latency_ms"]["p99"], r["api"]["latency_ms"]["p99"], r["p99_ratio"],
                     r["bare"]["rps"], r["api"]["rps"], r["rps_ratio"], r["healthz"]["latency_ms"].get("p50")])
    print_table("Submit: where a request's CPU goes (ms per request: API process, Temporal server, this "
                "benchmark's client)",
                ["clients", "arm", "API", "server", "client"],
                [[r["concurrency"], arm, r[arm]["cpu_ms_per_request"].get("api"),
                  r[arm]["cpu_ms_per_request"].get("server"), r[arm]["cpu_ms_per_request"].get("bench")]
                 for r in closed for arm in ("bare", "api", "healthz")])
    print_table("Submit: closed loop (ms, requests/s)",
                ["clients", "bare p50", "API p50", "x", "bare p99", "API p99", "x", "bare req/s", "API req/s", "x",
                 "/healthz p50"],
                rows, caption=f"goals: p50/p99 <= {GOAL_LATENCY_RATIO}x bare at 1, 10, 50 clients; "
                              f"req/s at saturation >= {GOAL_RPS_RATIO}x bare ({results['saturation_rps']['ratio']}x)")
    print_table(f"Submit: open loop at {rate:g}/s for {open_s:g} s (ms from the scheduled send)",
                ["arm", "requests", "errors", "p50", "p99", "max"],
                [[arm, r["requests"], r["errors"], r["latency_ms"].get("p50"), r["latency_ms"].get("p99"),
                  r["latency_ms"].get("max")] for arm, r in (("bare start_workflow", open_bare),
                                                             ("POST /v1/generations", open_api))],
                caption=f"goal: API p99 < {GOAL_OPEN_P99_MS:g} ms "
                        f"({'met' if results['goals_met']['open_loop_p99'] else 'missed'})")
    results["chart"] = str(chart(results, args.chart))
    write_result(NAME, args, results, goals={"open_loop_p99_max_ms": GOAL_OPEN_P99_MS,
                                             "latency_ratio_max": GOAL_LATENCY_RATIO,
                                             "saturation_rps_ratio_min": GOAL_RPS_RATIO}, started=started)


def main() -> None:
    p = parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,10,50,200", help="closed-loop client counts")
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per arm and client count")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument("--rate", type=float, default=100.0, help="open-loop requests per second")
    p.add_argument("--open-seconds", type=float, default=10.0, help="open-loop duration")
    p.add_argument("--users", type=int, default=20, help="distinct users (API keys) sending")
    p.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                   help="profile the API process with py-spy (must be installed); collapsed stacks into DIR")
    p.add_argument("--only", choices=["both", "api"], default="both", help="api: skip the bare arm (profiling)")
    p.add_argument("--api-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the API process (to measure a variant)")
    p.add_argument("--chart", type=Path, default=None, help="latency-against-concurrency chart (default: beside the JSON)")
    args = resolve_paths(p.parse_args(), NAME)
    run_main(lambda: bench(args))


if __name__ == "__main__":
    main()
