"""The dashboard at /ui in a real headless Chromium (Debian's, driven by Playwright) against a real
`modelyard serve` with the demo models and an API key: the key prompt, the model list, a load changing a status
live, the playground streaming a reply while its model loads, and that request and load on the activity and
decisions pages. One server and one browser for the module, the tests run in order on one page (each builds on
the state the previous one left), synchronised on what the page shows, never on sleeps.

Screenshots go to tests/artifacts/ (ignored by git) for inspection; docs/dashboard.png is a copy of
tests/artifacts/models.png, made by hand when the page changes.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from modelyard.api.ui import CONTENT_SECURITY_POLICY
from modelyard.demo import GEMMA3, SMOLLM2
from tests.conftest import Router

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# Without these Chromium opens many connections to Google at start, which are refused here (no internet).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts"
KEY = "dashboard-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BROKEN = "broken"
LOAD_TIMEOUT_MS = 90_000  # a model load on a busy 2-core machine


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory, demo_models: dict[str, Path]) -> Iterator[Router]:
    tmp = tmp_path_factory.mktemp("dashboard")
    preset = tmp / "models.ini"  # aliases, a keep-alive and a pin, for the page to show
    broken = tmp / "broken.gguf"  # a GGUF header and nothing else: the child fails to load it, and says why
    broken.write_bytes(b"GGUF" + bytes(60))
    preset.write_text(f"[{SMOLLM2}]\nmodel = {demo_models[SMOLLM2]}\nalias = chat\nkeep-alive = 10m\n\n"
                      f"[{GEMMA3}]\nmodel = {demo_models[GEMMA3]}\nalias = base\npin = true\npriority = 5\n\n"
                      f"[{BROKEN}]\nmodel = {broken}\n")
    # one thread per child: the two models share 2 cores with the browser; a small budget makes the bars visible
    # --no-webui: / sends browsers to the dashboard whether or not llama.cpp's web UI is built here
    router = Router(["--models-preset", str(preset), "--threads", "1", "--memory-budget", "2GiB", "--no-webui"],
                    tmp, env={"LLAMA_API_KEY": KEY})
    try:
        yield router.wait_ready()
    finally:
        router.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (`make test` installs Debian's chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def dashboard(browser: Browser, router: Router) -> Iterator[Page]:
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(base_url=router.url, viewport={"width": 1360, "height": 760})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def shoot(page: Page, name: str) -> None:
    page.locator("body").screenshot(path=ARTIFACTS / f"{name}.png")  # the content, not the empty viewport


def model_row(page: Page, model: str) -> Locator:
    return page.locator(f'#models tr[data-model="{model}"]')


def test_root_sends_browsers_to_the_dashboard_and_assets_are_strict(router: Router) -> None:
    with httpx.Client(base_url=router.url) as client:
        # No key: a browser opening the server's address must reach the page that asks for one.
        redirect = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert (redirect.status_code, redirect.headers["Location"]) == (302, "/ui")
        assert client.get("/").text == "Ollama is running"  # Ollama's clients probe it without a key
        page = client.get("/ui")  # no key: the assets hold no data
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
        script = client.get("/ui/app.js")
        assert script.headers["Content-Type"].startswith("text/javascript")
        assert script.headers["X-Content-Type-Options"] == "nosniff"
        assert client.get("/ui/__init__.py").status_code == 404  # in the package, but not an asset
        assert client.get("/models").status_code == 401  # every data call needs the key


def test_models_page_asks_for_the_key_once_and_lists_both_models(dashboard: Page) -> None:
    refused: list[str] = []
    dashboard.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)
    dashboard.goto("/ui", wait_until="load")
    dialog = dashboard.locator("#key-dialog")
    expect(dialog).to_be_visible()
    dashboard.fill("#key-input", KEY)
    dashboard.click("#key-dialog button[value=ok]")
    expect(dialog).not_to_be_visible()
    for model, alias in ((SMOLLM2, "chat"), (GEMMA3, "base")):
        expect(model_row(dashboard, model).locator('[data-role="status"]')).to_have_text("unloaded")
        expect(model_row(dashboard, model).locator(".aliases")).to_have_text(f"aka {alias}")
    expect(model_row(dashboard, GEMMA3)).to_contain_text("priority 5")
    expect(dashboard.locator("#live")).to_have_text("live")
    assert len(refused) >= 2  # the listing and the stream were both refused, and one prompt served both
    assert dashboard.evaluate("localStorage.getItem('modelyard.apiKey')") == KEY

    dashboard.reload(wait_until="load")  # the key is kept: no prompt again
    expect(model_row(dashboard, SMOLLM2)).to_be_visible()
    expect(dialog).not_to_be_visible()


def test_load_button_changes_the_status_live(dashboard: Page) -> None:
    row = model_row(dashboard, GEMMA3)
    row.get_by_role("button", name="Load", exact=True).click()
    status = row.locator('[data-role="status"]')
    expect(status).to_have_text("loaded", timeout=LOAD_TIMEOUT_MS)
    expect(row.locator(".memory")).to_contain_text("measured")
    expect(row.get_by_role("button", name="Unload", exact=True)).to_be_enabled()
    shoot(dashboard, "models-loaded")


def test_playground_streams_a_reply_while_its_model_loads(dashboard: Page) -> None:
    dashboard.goto(f"/ui#/playground/{SMOLLM2}", wait_until="load")
    expect(dashboard.locator("#live")).to_have_text("live")
    dashboard.fill("#max-tokens", "60")
    dashboard.fill("#prompt", "Count from one to ten.")
    with dashboard.expect_response("**/v1/chat/completions") as answer:
        dashboard.click("#send")
    response = answer.value
    assert response.headers["content-type"].startswith("text/event-stream")
    assert json.loads(response.request.post_data or "{}")["stream"] is True
    reply = dashboard.locator(".message.assistant.done")
    expect(reply.locator(".stats")).to_contain_text("tokens out", timeout=LOAD_TIMEOUT_MS)
    assert reply.locator(".content").inner_text().strip()
    # shown piece by piece as the deltas arrived, not at once at the end (counted by the page: a check of the
    # text while it streams would race a short reply)
    assert int(reply.get_attribute("data-chunks") or 0) > 1
    expect(dashboard.locator(".note.loaded")).to_contain_text(f"{SMOLLM2} loaded in")  # it watched the load
    shoot(dashboard, "playground")

    dashboard.goto("/ui#/models", wait_until="load")
    expect(model_row(dashboard, SMOLLM2).locator('[data-role="status"]')).to_have_text("loaded")
    # its preset's 10 minutes, counting down since the reply ended
    expect(model_row(dashboard, SMOLLM2).locator(".keepalive")).to_have_text(re.compile(r"unloads in 9:[0-5]\d"))
    expect(model_row(dashboard, GEMMA3).locator(".keepalive")).to_have_text("pinned")
    shoot(dashboard, "models")


def _stream_until_it_ends(url: str, model: str, seen: list[str]) -> None:
    """A long streamed generation, read to its end (the test cancels it from the page)."""
    body = {"model": model, "stream": True, "max_tokens": 4000, "messages": [{"role": "user", "content": "Go on."}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        seen.extend(line for line in response.iter_lines() if line)


def test_activity_page_shows_that_request_and_cancels_one_in_flight(dashboard: Page, router: Router) -> None:
    dashboard.goto("/ui#/activity", wait_until="load")
    chat = dashboard.locator("#activity tbody tr", has_text=SMOLLM2).filter(has_text="/v1/chat/completions")
    expect(chat.locator(".badge")).to_have_text("200")  # the playground's request
    expect(dashboard.locator("#live")).to_have_text("live")

    seen: list[str] = []
    generation = threading.Thread(target=_stream_until_it_ends, args=(router.url, GEMMA3, seen))
    generation.start()
    try:
        running = dashboard.locator('#in-flight tr[data-state="running"]', has_text=GEMMA3)
        running.get_by_role("button", name="Cancel").click(timeout=LOAD_TIMEOUT_MS)
        expect(running).to_have_count(0)
        cancelled = dashboard.locator("#activity tbody tr", has_text=GEMMA3)
        expect(cancelled.locator(".error")).to_contain_text("cancelled by an admin")
    finally:
        generation.join(timeout=60)
    assert not generation.is_alive() and seen[-1] == "data: [DONE]"
    assert any("cancelled" in line for line in seen)

    dashboard.select_option("#page select", GEMMA3)  # the model filter
    expect(dashboard.locator("#activity tbody tr", has_text=GEMMA3)).to_have_count(1)
    expect(dashboard.locator("#activity tbody tr", has_text=SMOLLM2)).to_have_count(0)
    shoot(dashboard, "activity")


def test_decisions_page_shows_the_load_with_its_reason(dashboard: Page) -> None:
    dashboard.goto("/ui#/decisions", wait_until="load")
    load = dashboard.locator(f'#decisions li[data-kind="load"][data-model="{GEMMA3}"]')
    expect(load.locator(".reason")).to_have_text(re.compile(r"\w"))
    expect(dashboard.locator("#live")).to_have_text("live")
    shoot(dashboard, "decisions")


def test_decisions_page_says_why_a_request_waits(dashboard: Page, router: Router) -> None:
    """A busy model unloaded by hand drains (never killed mid-request); a request for it meanwhile waits for
    the old instance to stop, and the page says so, with what blocks it."""
    dashboard.goto("/ui#/decisions", wait_until="load")
    expect(dashboard.locator("#waiting tbody")).to_contain_text("none")
    seen: list[str] = []
    generation = threading.Thread(target=_stream_until_it_ends, args=(router.url, GEMMA3, seen))
    generation.start()
    answered: list[int] = []
    waiter = threading.Thread(target=lambda: answered.append(router.client.post(
        "/v1/completions", headers=AUTH, timeout=120,
        json={"model": GEMMA3, "prompt": "Hi", "max_tokens": 2}).status_code))
    try:
        stream = _wait_in_flight(router, GEMMA3)
        assert router.client.post("/models/unload", headers=AUTH, json={"model": GEMMA3}).status_code == 200
        _poll(lambda: _status(router, GEMMA3) == "stopping", "the busy model drains")  # the stream goes on
        waiter.start()
        row = dashboard.locator("#waiting tbody tr", has_text=GEMMA3)
        expect(row).to_contain_text(f"waiting for the previous instance of '{GEMMA3}' to stop", timeout=10_000)
        expect(row).to_contain_text("finishing 1 request(s)")
        shoot(dashboard, "decisions-waiting")
        assert router.client.post(f"/activity/{stream}/cancel", headers=AUTH).status_code == 200
    finally:
        generation.join(timeout=60)
        if waiter.ident is not None:  # started
            waiter.join(timeout=LOAD_TIMEOUT_MS / 1000)
    assert answered == [200]
    expect(dashboard.locator("#waiting tbody")).to_contain_text("none")  # served: it loaded the model again
    unload = dashboard.locator(f'#decisions li[data-kind="unload"][data-model="{GEMMA3}"]')
    expect(unload.first).to_be_visible()


def _wait_in_flight(router: Router, model: str) -> int:
    """The activity id of `model`'s request in flight, once the router has one."""
    found: list[int] = []

    def running() -> bool:
        found.extend(r["id"] for r in router.client.get("/activity", headers=AUTH).json()["in_flight"]
                     if r["model"] == model and r["state"] == "running")
        return bool(found)

    _poll(running, f"a request for {model} comes in flight")
    return found[0]


def _status(router: Router, model: str) -> str:
    entries = router.client.get("/models", headers=AUTH).json()["data"]
    return str(next(e["status"]["value"] for e in entries if e["id"] == model))


def _poll(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT_MS / 1000
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def test_logs_page_shows_the_child_output_and_tails_it(dashboard: Page, router: Router) -> None:
    dashboard.goto(f"/ui#/logs/{SMOLLM2}", wait_until="load")
    lines = dashboard.locator("#log .line")
    expect(lines.first).to_be_visible()
    expect(dashboard.locator("#live")).to_have_text("live")
    before = lines.count()
    reply = router.client.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json={"model": SMOLLM2, "prompt": "Hello", "max_tokens": 4})
    assert reply.status_code == 200
    expect(lines.nth(before)).to_be_attached()  # a line the child wrote after the page read its log
    shoot(dashboard, "logs")


def test_unload_all_unloads_every_model(dashboard: Page) -> None:
    dashboard.goto("/ui#/models", wait_until="load")
    expect(model_row(dashboard, GEMMA3).locator('[data-role="status"]')).to_have_text("loaded")
    dashboard.click("#unload-all")
    for model in (SMOLLM2, GEMMA3):  # the pinned one too: an explicit unload
        expect(model_row(dashboard, model).locator('[data-role="status"]')).to_have_text("unloaded",
                                                                                        timeout=LOAD_TIMEOUT_MS)


def test_a_failed_load_shows_its_reason_and_the_childs_last_lines(dashboard: Page) -> None:
    row = model_row(dashboard, BROKEN)
    row.get_by_role("button", name="Load", exact=True).click()
    expect(row.locator('[data-role="status"]')).to_have_text("failed", timeout=LOAD_TIMEOUT_MS)
    failure = dashboard.locator(f'#models tr[data-model="{BROKEN}"] + tr.failure')
    expect(failure).to_contain_text("failed (exit code")
    expect(failure.locator("pre")).to_contain_text("gguf")  # llama-server's own words about the file
    shoot(dashboard, "models-failed")
