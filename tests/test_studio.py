"""The web studio in a real browser (Debian's Chromium, driven by Playwright) against the real
API over HTTP, a real worker and the dev server: sign in, create, watch, keep, money, errors,
a phone-sized screen. Screenshots of each page go to ATELIER_STUDIO_SCREENSHOTS (default: a
folder in the system's temp dir)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path

from tests.fakes.http_server import FakeHttpServer
from tests.browser import PHONE, Studio, chromium, shoot, studio_factory  # noqa: F401 - fixtures

FIXTURES = Path(__file__).parent / "fixtures" / "studio"
PERSON = FIXTURES / "person.jpg"
SHIRT = FIXTURES / "shirt.png"
NOT_A_PHOTO = FIXTURES / "notes.txt"
EVENTS_ROUTE = r"/v1/generations/\{[^}]+\}/events"
TERMINAL_TITLES = re.compile("ready|did not finish|canceled", re.I)


async def sign_in(page, key: str) -> None:
    await page.goto("/")
    await page.fill("#api-key", key)
    await page.click("button:has-text('Sign in')")


async def signed_in(page, key: str) -> None:
    await sign_in(page, key)
    await page.wait_for_selector(".nav:not([hidden])")


async def steps_until_done(page, timeout: float = 90.0) -> list[str]:
    """The step names the watch page shows, read until the generation ends (bounded in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await page.locator(".outcome:not([hidden])").count():
            return await page.locator(".steps li").all_inner_texts()
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the generation did not end within {timeout} s")


async def result_image(page) -> dict:
    image = page.locator(".result-image").first
    await image.wait_for()
    await page.wait_for_function(
        "() => { const i = document.querySelector('.result-image'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=20_000)
    return await image.evaluate(
        "i => ({naturalWidth: i.naturalWidth, src: i.currentSrc, apiUrl: i.dataset.apiUrl, source: i.dataset.source})")


A11Y_PROBLEMS = """() => {
    const found = [];
    for (const el of document.querySelectorAll('input:not([type=hidden]), textarea, select')) {
        if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby')) {
            found.push(`a ${el.tagName.toLowerCase()} without a label (#${el.id})`);
        }
    }
    for (const img of document.querySelectorAll('img')) {
        if (!img.hasAttribute('alt')) found.push(`an image without alt text (${img.className})`);
    }
    for (const el of document.querySelectorAll('button, a[href]')) {
        if (el.offsetParent && !(el.textContent.trim() || el.getAttribute('aria-label'))) {
            found.push(`a ${el.tagName.toLowerCase()} without a name (${el.className})`);
        }
    }
    if (document.querySelectorAll('main h1').length !== 1) found.push('not exactly one h1 in main');
    return found;
}"""


async def accessible(page, name: str) -> None:
    """Every field labelled, every image with alt text, every control named, one heading per page."""
    problems = await page.evaluate(A11Y_PROBLEMS)
    assert not problems, f"{name}: {problems}"


def watched_id(page) -> str:
    match = re.search(r"#/g/([^/]+)$", page.url)
    assert match, page.url
    return match.group(1)


async def create_from_the_photo(page) -> str:
    """On the create page: add the person photo, send the form, wait for the watch page; the new
    generation's id."""
    await page.set_input_files("#file-photos", str(PERSON))
    await page.wait_for_selector(".preview:not(.bad) img")
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r"#/g/"))
    return watched_id(page)


async def watching_a_slow_generation(studio_factory, *, credits_: int) -> tuple[Studio, str, object, str]:
    """A studio whose AI call takes two minutes and a new user with `credits_`, signed in on a page
    that watches the user's new generation at its 'Creating your image' step:
    (studio, the user's key, the page, the generation's id)."""
    studio: Studio = await studio_factory(local_ai_delay_s=120.0)
    _, key = await studio.new_user(credits_=credits_)
    page = await studio.page()
    await signed_in(page, key)
    task_id = await create_from_the_photo(page)
    await page.wait_for_selector(".stage-name:has-text('Creating your image')", timeout=30_000)
    return studio, key, page, task_id


async def no_horizontal_scroll(page, name: str) -> None:
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"{name}: the page is {width} px wide on a {PHONE['width']} px screen"


async def test_wrong_key_then_photography_from_upload_to_result(studio_factory):
    studio: Studio = await studio_factory(local_ai_delay_s=3.0)
    user_id, key = await studio.new_user(credits_=40)
    page = await studio.page()
    requests: list = []
    page.on("request", lambda r: requests.append(r))

    await page.goto("/")
    await page.wait_for_selector("#api-key")
    await shoot(page, "01-sign-in")
    await sign_in(page, "atl_not-a-real-key")
    error = page.locator("#api-key-error")
    await error.wait_for()
    assert "not accepted" in await error.inner_text()
    assert await page.get_attribute("#api-key", "aria-invalid") == "true"
    assert await page.evaluate("sessionStorage.length") == 0
    await shoot(page, "02-wrong-key")

    # By keyboard: the key typed into the field and Enter.
    await page.fill("#api-key", key)
    await page.press("#api-key", "Enter")
    await page.wait_for_selector("#file-photos", state="attached")
    assert await page.evaluate("document.activeElement.tagName") == "H1"  # focus moved to the new page
    assert "40 credits" in await page.inner_text(".balance")
    assert "10 credits" in await page.inner_text(".cost-line")
    await shoot(page, "03-create")

    await page.set_input_files("#file-photos", str(PERSON))
    preview = page.locator(".preview img")
    await preview.wait_for()
    assert await preview.evaluate("i => i.naturalWidth") > 0
    # The style presets are radio buttons: arrow keys move between them.
    await page.focus("#preset-studio")
    await page.keyboard.press("ArrowRight")
    assert await page.is_checked("#preset-noir")
    await page.fill("#prompt", "a portrait for the studio's front page")
    await shoot(page, "04-create-filled")

    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r"#/g/"))
    task_id = watched_id(page)
    await page.wait_for_selector(".stage-name:has-text('Creating your image')", timeout=30_000)
    assert await page.inner_text(".connection") == "Live"
    await shoot(page, "05-watch")
    steps = await steps_until_done(page)
    # The progress moved through at least three stages a person can read.
    assert len(set(steps)) >= 3, steps
    assert steps[-1] == "Ready"
    assert len(steps) == len(set(steps)), f"a step was listed twice: {steps}"
    # The stream misses no stage: each one the workflow went through, in its order.
    assert [s for s in steps if s in ("Reserving your credits", "Creating your image", "Saving your picture")] == [
        "Reserving your credits", "Creating your image", "Saving your picture"], steps

    shown = await result_image(page)
    assert shown["naturalWidth"] > 0
    generation = await studio.generation(key, task_id)
    assert generation["status"] == "completed"
    api_url = generation["result"]["images"][0]["url"]
    assert shown["apiUrl"].split("?")[0] == api_url.split("?")[0]
    if "?" in api_url:  # a signed link: loaded as it is, without the key
        assert shown["source"] == "link" and shown["src"] == shown["apiUrl"]
    else:
        assert shown["source"] == "fetched"
    download = page.locator(".result a[download]")
    assert await download.get_attribute("href")
    await page.wait_for_function("() => document.querySelector('.balance').textContent.includes('30 credits')")
    await shoot(page, "06-result")

    # The one POST that started it carried an Idempotency-Key; the key was never in a URL.
    posts = [r for r in requests if r.method == "POST" and r.url.endswith("/v1/generations")]
    assert len(posts) == 1
    assert (await posts[0].all_headers()).get("idempotency-key", "").startswith("studio-")
    assert not [r.url for r in requests if key in r.url]
    # The progress came through the API's stream (Server-Sent Events), not by polling.
    assert studio.offers("get", EVENTS_ROUTE)
    streams = [r for r in requests if r.url.endswith(f"/v1/generations/{task_id}/events")]
    assert streams, "the studio did not use the progress stream"
    assert (await streams[0].all_headers()).get("authorization") == f"Bearer {key}"
    assert not [r for r in requests if r.method == "GET" and r.url.endswith(f"/v1/generations/{task_id}")][2:], \
        "the studio polled although the stream was there"

    # The work is in the gallery with its prompt, and the ledger shows the charge.
    await page.click(".nav a[data-nav='works']")
    card = page.locator(".work-card").first
    await card.wait_for()
    assert "front page" in await card.inner_text()
    await page.wait_for_function(
        "() => { const i = document.querySelector('.work-card img'); return i && i.complete && i.naturalWidth > 0; }")
    await shoot(page, "07-works")
    await card.locator("a").click()
    await page.wait_for_url(re.compile(r"#/works/"))
    assert "front page" in await page.inner_text(".prompt-text")
    shown = await result_image(page)
    assert shown["naturalWidth"] > 0
    assert await page.locator(".work-detail a[download]").get_attribute("href")
    await accessible(page, "work")
    await shoot(page, "07-work")

    # Deleting the work: asked once more, then gone from the gallery, its image link with it.
    image_link = shown["apiUrl"]
    await page.click("button:has-text('Delete')")
    await page.click("button:has-text('Delete for good')")
    await page.wait_for_url(re.compile(r"#/works$"))
    await page.wait_for_selector(".empty:has-text('No works yet')")
    gone = await studio.http.get(image_link)
    assert gone.status_code in (403, 404), gone.status_code
    listed = await studio.http.get("/v1/works", headers={"Authorization": f"Bearer {key}"})
    assert listed.json()["items"] == []
    await page.click(".nav a[data-nav='credits']")
    await page.wait_for_selector(".ledger tr.row-charge")
    assert "−10" in await page.inner_text(".ledger tr.row-charge")
    assert "30 credits" in await page.inner_text(".balance-big")
    await shoot(page, "08-credits")


async def test_fitting_by_drag_and_drop_with_a_refused_file(studio_factory):
    """Also the fallbacks: a server without signed links (images fetched with the key) and a
    stream that answers 404 (as before it existed: the studio asks every second)."""
    studio: Studio = await studio_factory(url_signing_secret=None)
    _, key = await studio.new_user(credits_=40)
    page = await studio.page()
    await page.route("**/events", lambda route: route.fulfill(status=404, content_type="application/json",
                                                              body='{"error":{"code":"NotFound","message":"no"}}'))
    uploads: list = []
    page.on("request", lambda r: uploads.append(r) if r.url.endswith("/v1/uploads") else None)
    await signed_in(page, key)
    await page.click("label[for='kind-fitting']")
    await page.wait_for_selector("#file-garments", state="attached")
    assert "15 credits" in await page.inner_text(".cost-line")

    # The person photo is dropped onto its zone, as a person would drag it from their files.
    data = base64.b64encode(PERSON.read_bytes()).decode()
    transfer = await page.evaluate_handle(
        """([data, name]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: 'image/jpeg' }));
            return transfer;
        }""", [data, PERSON.name])
    await page.dispatch_event(".drop[data-slot='person']", "drop", {"dataTransfer": transfer})
    await page.wait_for_selector(".drop[data-slot='person'] .preview img")

    # A file that is no photo is refused here, before any upload.
    await page.set_input_files("#file-garments", str(NOT_A_PHOTO))
    bad = page.locator(".drop[data-slot='garments'] .preview.bad")
    await bad.wait_for()
    assert "not a photo the studio accepts" in await bad.inner_text()
    await page.click("button[type=submit]")
    problems = page.locator(".problems")
    await problems.wait_for()
    assert "notes.txt" in await problems.inner_text()
    assert uploads == []
    await shoot(page, "09-create-refused-file")

    await page.click("button[aria-label='Remove notes.txt']")
    await page.set_input_files("#file-garments", str(SHIRT))
    await page.wait_for_selector(".drop[data-slot='garments'] .preview:not(.bad) img")
    await shoot(page, "10-create-fitting")
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r"#/g/"))
    task_id = watched_id(page)
    await page.wait_for_selector(".connection:has-text('Checking every second')")
    steps = await steps_until_done(page)
    assert steps[-1] == "Ready", steps
    shown = await result_image(page)
    assert shown["naturalWidth"] > 0
    generation = await studio.generation(key, task_id)
    assert generation["kind"] == "fitting" and generation["status"] == "completed"
    # An unsigned link needs the key: fetched with it into an object URL.
    assert "/v1/files/" in generation["result"]["images"][0]["url"]
    assert shown["source"] == "fetched" and shown["src"].startswith("blob:")
    assert len(uploads) == 2


async def test_cancel_ends_in_a_refund_shown_on_the_page(studio_factory):
    studio, key, page, task_id = await watching_a_slow_generation(studio_factory, credits_=25)
    await page.wait_for_function("() => document.querySelector('.balance').textContent.includes('15 credits')")

    await page.click("button:has-text('Cancel and refund')")
    refund = page.locator(".outcome .refund-note")
    await refund.wait_for(timeout=30_000)
    assert "10 credits returned" in await refund.inner_text()
    assert await page.inner_text("h1") == "Canceled"
    await page.wait_for_function("() => document.querySelector('.balance').textContent.includes('25 credits')")
    steps = await page.locator(".steps li").all_inner_texts()
    assert steps[-2:] == ["Returning your credits", "Canceled"], steps
    await shoot(page, "11-canceled")
    generation = await studio.generation(key, task_id)
    assert generation["status"] == "canceled"
    assert generation["credits"] == {"charged": 10, "refunded": 10}

    # The ledger shows it as a refund, not as a second charge.
    await page.click(".nav a[data-nav='credits']")
    row = page.locator(".ledger tr.row-refund")
    await row.wait_for()
    text = await row.inner_text()
    assert "refund" in text.lower() and "you canceled" in text and "+10" in text
    # A row of the table like the others (a style meant for the refund note once broke it apart).
    assert await row.evaluate("r => getComputedStyle(r).display") == "table-row"
    assert await page.locator(".ledger tr.row-charge").count() == 1
    await shoot(page, "12-credits-refund")


async def test_not_enough_credits_says_how_many_are_needed(studio_factory):
    studio: Studio = await studio_factory()
    user_id, key = await studio.new_user(credits_=5)
    page = await studio.page()
    answers: list = []
    page.on("response", lambda r: answers.append(r) if r.url.endswith("/v1/generations") else None)
    await signed_in(page, key)
    await page.set_input_files("#file-photos", str(PERSON))
    await page.wait_for_selector(".preview:not(.bad) img")
    await page.click("button[type=submit]")
    problems = page.locator(".problems")
    await problems.wait_for()
    assert "This needs 10 credits, you have 5." in await problems.inner_text()
    assert [a.status for a in answers] == [402]
    assert "#/g/" not in page.url
    await shoot(page, "13-not-enough-credits")
    assert await studio.harness.balance(user_id) == 5


async def test_reload_and_a_new_tab_find_the_running_generation(studio_factory):
    studio, key, page, task_id = await watching_a_slow_generation(studio_factory, credits_=40)

    await page.reload()
    await page.wait_for_selector(".stage-name:has-text('Creating your image')")
    assert watched_id(page) == task_id

    # Closing the tab forgets the key; signing in again shows the generation still in progress.
    await page.context.close()
    again = await studio.page()
    await signed_in(again, key)
    running = again.locator(f".running a[href='#/g/{task_id}']")
    await running.wait_for()
    await shoot(again, "14-create-in-progress")
    await running.click()
    await again.wait_for_selector(".stage-name:has-text('Creating your image')")
    await again.click("button:has-text('Cancel and refund')")
    await again.locator(".outcome .refund-note").wait_for(timeout=30_000)


async def test_phone_layout_has_no_horizontal_scroll(studio_factory):
    studio: Studio = await studio_factory(local_ai_delay_s=4.0)
    _, key = await studio.new_user(credits_=40)
    page = await studio.page(PHONE)
    await page.goto("/")
    await page.wait_for_selector("#api-key")
    await no_horizontal_scroll(page, "sign in")
    await accessible(page, "sign in")
    await shoot(page, "01-sign-in")
    await signed_in(page, key)
    await page.wait_for_selector("#file-photos", state="attached")
    await page.set_input_files("#file-photos", str(PERSON))
    await page.wait_for_selector(".preview:not(.bad) img")
    await page.fill("#prompt", "a long prompt " * 20)
    await no_horizontal_scroll(page, "create")
    await accessible(page, "create")
    await shoot(page, "04-create-filled")
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r"#/g/"))
    await page.wait_for_selector(".stage-name:has-text('Creating your image')", timeout=30_000)
    await no_horizontal_scroll(page, "watch")
    await accessible(page, "watch")
    await shoot(page, "05-watch")
    await steps_until_done(page)
    await result_image(page)
    await no_horizontal_scroll(page, "result")
    await accessible(page, "result")
    await shoot(page, "06-result")
    for nav, name, ready in (("works", "07-works", ".work-card img"), ("credits", "08-credits", ".ledger tbody tr")):
        await page.click(f".nav a[data-nav='{nav}']")
        await page.wait_for_selector(ready)
        await no_horizontal_scroll(page, nav)
        await accessible(page, nav)
        await shoot(page, name)
        if nav == "works":
            await page.locator(".work-card a").first.click()
            await result_image(page)
            await no_horizontal_scroll(page, "work")
            await accessible(page, "work")
            await shoot(page, "07-work")


async def test_operator_token_creates_a_user_and_links_to_the_temporal_ui(studio_factory):
    studio: Studio = await studio_factory()
    page = await studio.page()
    requests: list = []
    page.on("request", lambda r: requests.append(r))
    await sign_in(page, studio.admin_token)
    await page.wait_for_selector("h1:has-text('Operator')")
    await page.fill("#new-credits", "30")
    await page.click("button:has-text('Create user')")
    key_field = page.locator("#new-key")
    await key_field.wait_for()
    assert (await key_field.input_value()).startswith("atl_")
    await shoot(page, "15-operator")
    await page.click("button:has-text('Continue as this user')")
    await page.wait_for_selector("#file-photos", state="attached")
    await page.wait_for_function("() => document.querySelector('.balance').textContent.includes('30 credits')")
    task_id = await create_from_the_photo(page)
    link = page.locator(".operator-link")
    await link.wait_for()
    settings = studio.harness.settings
    assert await link.get_attribute("href") == (
        f"{settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}/workflows/{task_id}")
    await steps_until_done(page)
    assert not [r.url for r in requests if studio.admin_token in r.url]



async def test_a_failed_generation_is_explained_with_its_refund(studio_factory):
    studio: Studio = await studio_factory()
    _, key = await studio.new_user(credits_=40)
    auth = {"Authorization": f"Bearer {key}"}
    with FakeHttpServer() as files:
        # Served as a JPEG, but not an image: the generation fails after its charge.
        files.route("/photo.jpg", status=200, headers={"Content-Type": "image/jpeg"}, body=b"not an image at all")
        started = await studio.http.post("/v1/generations", headers=auth, json={
            "kind": "photography", "images": [{"url": files.url("/photo.jpg")}]})
        assert started.status_code == 202, started.text
        task_id = started.json()["id"]
        page = await studio.page()
        await page.goto(f"/#/g/{task_id}")
        await signed_in(page, key)  # the link is kept through the sign-in
        await page.wait_for_url(re.compile(f"#/g/{task_id}$"))
        outcome = page.locator(".outcome-panel")
        await outcome.wait_for(timeout=60_000)
    text = await outcome.inner_text()
    assert "could not be used as an image" in text and "JPEG, PNG or WebP" in text
    assert "Refund" in text and "10 credits returned" in text
    # Plain words: no error code, no JSON.
    assert "BadImage" not in text and "{" not in text
    assert await page.inner_text("h1") == "It did not finish"
    await accessible(page, "failed")
    await shoot(page, "17-failed")
    generation = await studio.generation(key, task_id)
    assert generation["status"] == "failed" and generation["credits"] == {"charged": 10, "refunded": 10}


async def test_waiting_for_a_model_shows_the_place_in_line(studio_factory, tmp_path):
    catalogue = tmp_path / "models.json"
    catalogue.write_text(json.dumps({"models": [
        {"name": "local-studio", "provider": "local", "priority": 1, "cost": 0, "max_concurrent": 1},
    ]}))
    studio: Studio = await studio_factory(local_ai_delay_s=8.0, model_catalogue=catalogue)
    _, first_key = await studio.new_user(credits_=40)
    _, key = await studio.new_user(credits_=40)
    first_auth = {"Authorization": f"Bearer {first_key}"}
    upload = await studio.http.post("/v1/uploads", headers=first_auth,
                                    files={"file": ("p.jpg", PERSON.read_bytes(), "image/jpeg")})
    file_id = upload.json()["file_id"]

    async def someone_else(until: set[str]) -> None:
        started = await studio.http.post("/v1/generations", headers=first_auth, json={
            "kind": "photography", "images": [{"file_id": file_id}]})
        assert started.status_code == 202, started.text
        deadline = time.monotonic() + 30
        while True:
            state = await studio.generation(first_key, started.json()["id"])
            if state["stage"] in until or state["status"] in until:
                return
            assert time.monotonic() < deadline, f"someone else's generation stuck: {state}"
            await asyncio.sleep(0.2)

    page = await studio.page()
    await signed_in(page, key)
    await page.set_input_files("#file-photos", str(PERSON))
    await page.wait_for_selector(".preview:not(.bad) img")
    # One call finishes (the line learns how long a call takes), then another holds the one slot.
    await someone_else({"completed"})
    await someone_else({"generating"})
    await page.click("button[type=submit]")
    # The place in line comes from the model's admission workflow, a moment after the wait begins.
    queue = page.locator(".queue:not([hidden]):has-text('in line')")
    await queue.wait_for(timeout=30_000)
    text = await queue.inner_text()
    assert "1st in line" in text and "to go" in text, text
    assert await page.inner_text(".stage-name") == "Waiting for a free model"
    await shoot(page, "16-waiting-in-line")
    steps = await steps_until_done(page)
    assert "Waiting for a free model" in steps and steps[-1] == "Ready", steps


async def test_a_lost_answer_is_retried_with_the_same_key_and_charged_once(studio_factory):
    studio: Studio = await studio_factory()
    user_id, key = await studio.new_user(credits_=40)
    page = await studio.page()
    sent: list[dict] = []
    answers: list[tuple[int, str | None]] = []  # (status, Idempotent-Replayed) as the server answered each

    async def lose_the_first_answer(route):
        request = route.request
        if request.method != "POST":
            await route.continue_()
            return
        sent.append(await request.all_headers())
        first = len(sent) == 1
        try:
            # Bounded: a slow server fails this test here, not with a request left paused for ever.
            answer = await route.fetch(timeout=30_000)
            answers.append((answer.status, answer.headers.get("idempotent-replayed")))
        except BaseException:
            await route.abort("failed")
            raise
        if first:
            await route.abort("connectionreset")  # the server started it and answered; the page never hears
        else:
            await route.fulfill(response=answer)

    await page.route("**/v1/generations", lose_the_first_answer)
    await signed_in(page, key)
    await page.set_input_files("#file-photos", str(PERSON))
    await page.wait_for_selector(".preview:not(.bad) img")
    await page.dblclick("button[type=submit]")  # a double click on top of it
    await page.wait_for_url(re.compile(r"#/g/"))
    task_id = watched_id(page)
    assert len(sent) == 2, sent
    assert sent[0]["idempotency-key"] == sent[1]["idempotency-key"]
    # The first request started the generation; the retry was answered by the key's replay.
    assert answers == [(202, None), (202, "true")], answers
    await steps_until_done(page)
    listed = await studio.http.get("/v1/generations", headers={"Authorization": f"Bearer {key}"})
    assert [g["id"] for g in listed.json()["items"]] == [task_id]
    assert await studio.harness.ledger(task_id) == (10, 0)
    assert await studio.harness.balance(user_id) == 30
