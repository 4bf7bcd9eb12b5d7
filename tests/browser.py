"""Browser tests' machinery: Debian's Chromium driven by Playwright, the real API served over
HTTP on loopback (uvicorn, in the test's event loop) beside a real worker and the dev server,
and screenshots of each page.

Chromium comes from the system (`apt-get install chromium`): Playwright's own browser downloads
are not used. Without it the browser tests are skipped, and the run's summary says so loudly;
with ATELIER_REQUIRE_BROWSER=1 (CI) a missing Chromium fails them instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from starter.api import create_app
from tests.api_fixtures import free_port
from tests.conftest import Harness

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]


def _viewport(variable: str, default: dict) -> dict:
    """A viewport from WIDTHxHEIGHT in `variable` (e.g. 1400x900 for the README's screenshots)."""
    configured = os.environ.get(variable, "").strip()
    if not configured:
        return default
    size = re.fullmatch(r"(\d{2,5})x(\d{2,5})", configured.lower())
    if size is None:
        raise ValueError(f"{variable}={configured!r}: expected WIDTHxHEIGHT, e.g. 1400x900")
    return {"width": int(size[1]), "height": int(size[2])}


DESKTOP = _viewport("ATELIER_STUDIO_DESKTOP", {"width": 1280, "height": 860})
PHONE = _viewport("ATELIER_STUDIO_PHONE", {"width": 390, "height": 844})
BROWSER_TESTS = "tests/test_studio.py"


def _runnable(path: str) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def chromium_path() -> str | None:
    """ATELIER_CHROMIUM when set (and only it), else Debian's chromium."""
    configured = os.environ.get("ATELIER_CHROMIUM")
    if configured:
        return configured if _runnable(configured) else None
    for candidate in CHROMIUM_CANDIDATES:
        if _runnable(candidate):
            return candidate
    return shutil.which("chromium")


def _missing_reason() -> str | None:
    if chromium_path() is None:
        return "no Chromium found (install Debian's: apt-get install -y chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (make install)"
    return None


def require_browser():
    """Skip (or, with ATELIER_REQUIRE_BROWSER=1, fail) when there is no browser to drive."""
    reason = _missing_reason()
    if reason is None:
        return
    if os.environ.get("ATELIER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required but {reason}")
    pytest.skip(f"BROWSER TEST SKIPPED: {reason}")


def report_skipped(terminalreporter) -> None:
    """The skip of a browser test is said loudly, by name, at the end of the run (conftest's hook)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if r.nodeid.startswith(BROWSER_TESTS)]
    if not skipped:
        return
    terminalreporter.write_sep("!", "BROWSER TESTS SKIPPED", red=True, bold=True)
    reason = _missing_reason() or "see the skip reasons above"
    terminalreporter.write_line(f"{len(skipped)} browser test(s) did not run: {reason}", red=True, bold=True)
    for report in skipped:
        terminalreporter.write_line(f"  skipped: {report.nodeid}", red=True)


# ---- screenshots ----------------------------------------------------------------------------

_SHOTS: list[Path] = []


def screenshot_dir() -> Path:
    if not _SHOTS:
        configured = os.environ.get("ATELIER_STUDIO_SCREENSHOTS")
        path = Path(configured) if configured else Path(tempfile.gettempdir()) / "atelier-studio-screenshots"
        path.mkdir(parents=True, exist_ok=True)
        _SHOTS.append(path)
    return _SHOTS[0]


async def shoot(page, name: str) -> Path:
    """A full-page screenshot, named for the page and the viewport (desktop or phone)."""
    width = page.viewport_size["width"] if page.viewport_size else 0
    path = screenshot_dir() / f"{name}-{'phone' if width <= 480 else 'desktop'}.png"
    await page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the picture
    await page.screenshot(path=str(path), full_page=True)
    return path


# ---- the served API ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_api(harness: Harness):
    """The real API app over HTTP on a loopback port, in this event loop; yields its base URL."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # pytest keeps its own signal handling
            yield

    app = create_app(harness.settings, client=harness.client, engine=harness.engine, blobs=harness.deps.blobs)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off", access_log=False,
                            timeout_graceful_shutdown=3)
    server = Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):  # up to 10 s
            if server.started or task.done():
                break
            await asyncio.sleep(0.05)
        if not server.started:
            raise RuntimeError("the API server did not start")
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=10)
        except asyncio.TimeoutError:
            server.force_exit = True
            await asyncio.wait_for(task, timeout=5)


@dataclass
class Studio:
    """One test's world: the served API, a worker, and a browser to open pages with."""

    harness: Harness
    base: str
    app: object
    http: httpx.AsyncClient
    browser: object
    contexts: list = field(default_factory=list)
    # Uncaught script errors and Content-Security-Policy violations: every test ends with none.
    script_errors: list = field(default_factory=list)

    @property
    def admin_token(self) -> str:
        return self.harness.settings.admin_token.get_secret_value()

    async def new_user(self, credits_: int) -> tuple[str, str]:
        """(user_id, api_key) of a new user with `credits_` credits, made through the admin API."""
        admin = {"Authorization": f"Bearer {self.admin_token}"}
        created = await self.http.post("/v1/admin/users", headers=admin)
        assert created.status_code == 201, created.text
        user = created.json()
        if credits_:
            granted = await self.http.post(f"/v1/admin/users/{user['user_id']}/credits", headers=admin,
                                           json={"amount": credits_, "reason": "test"})
            assert granted.status_code == 200, granted.text
        return user["user_id"], user["api_key"]

    async def page(self, viewport: dict | None = None):
        context = await self.browser.new_context(viewport=viewport or DESKTOP, device_scale_factor=1,
                                                 base_url=self.base, reduced_motion="reduce")
        self.contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda error: self.script_errors.append(f"uncaught: {error}"))
        page.on("console", lambda message: self.script_errors.append(message.text)
                if "Content Security Policy" in message.text else None)
        return page

    async def generation(self, api_key: str, task_id: str) -> dict:
        response = await self.http.get(f"/v1/generations/{task_id}", headers={"Authorization": f"Bearer {api_key}"})
        assert response.status_code == 200, response.text
        return response.json()

    def offers(self, method: str, path_pattern: str) -> bool:
        """Whether the served API has this route (the newer ones land while the studio is built)."""
        import re

        paths = self.app.openapi().get("paths", {})
        return any(re.fullmatch(path_pattern, p) and method in ops for p, ops in paths.items())


@pytest.fixture(scope="session")
async def chromium():
    require_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def studio_factory(harness_factory, chromium):
    """Build a Studio on a fresh harness with settings overrides, its worker running."""
    made: list = []
    made_studios: list[Studio] = []

    async def make(**overrides) -> Studio:
        overrides.setdefault("local_ai_delay_s", 2.0)
        harness = await harness_factory(**overrides)
        stack = contextlib.AsyncExitStack()
        made.append(stack)
        await stack.enter_async_context(harness.worker())
        base, app = await stack.enter_async_context(serve_api(harness))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30.0))
        studio = Studio(harness=harness, base=base, app=app, http=http, browser=chromium)

        async def close_contexts():
            for context in studio.contexts:
                await context.close()

        stack.push_async_callback(close_contexts)
        made_studios.append(studio)
        return studio

    yield make
    studios_errors = []
    for stack in reversed(made):
        await stack.aclose()
    for studio in made_studios:
        studios_errors.extend(studio.script_errors)
    assert not studios_errors, f"the studio's scripts failed in the browser: {studios_errors}"
