"""The playground page in a real headless Chromium (Debian's), driven by Playwright.

The server, the engine (tiny profile) and Playwright's async API share this module's event
loop. Every wait is an explicit wait on an element or its text; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Error, Page, Route, async_playwright, expect

from adapters.memory import MemoryStore
from adapters.web import create_app, serve
from bot.config import load_settings
from bot.wiring import build_tasks
from core.engine import Engine
from core.service import Service
from core.settings import ServiceSettings
from tests import imagekit

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download fails on the build machines (FACTS.md); these flags
# keep Debian's Chromium from reaching for the network or a display.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
# Generous: the first request loads every tiny model and EasyOCR (a few seconds in all).
WAIT_MS = 30_000
# axe-core, installed by `make test` with npm; the accessibility test skips without it.
AXE = Path(__file__).resolve().parents[1] / ".cache/axe-core/node_modules/axe-core/axe.min.js"
# Not too narrow: reimagine keeps the aspect ratio and needs 64 px on the shorter side.
SIGN = imagekit.text_png("GRAND OPENING", size=(400, 240))

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin"),
]

# Records every text the status line shows, so a passing "warming up" is not missed.
RECORD_STATUS = """
window.statusLog = [];
document.addEventListener("DOMContentLoaded", () => {
  const status = document.getElementById("status");
  new MutationObserver(() => window.statusLog.push(status.textContent))
    .observe(status, { childList: true, characterData: true, subtree: true });
});
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_cache: Path, single_torch_thread: None) -> AsyncIterator[Engine]:
    settings = load_settings(None, "tiny")
    settings = type(settings)(
        engine=type(settings.engine)(device="cpu", model_cache=model_cache),
        profile=settings.profile,
    )
    async with Engine(build_tasks(settings), settings.engine) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine: Engine) -> AsyncIterator[str]:
    service = Service(engine, MemoryStore(), ServiceSettings(per_user_in_flight=4))
    app = create_app(service, max_upload_bytes=2 * 1024 * 1024)
    runner = await serve(app, "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, server: str) -> AsyncIterator[Page]:
    """A fresh browser context (so a new session) on the page, failing on any script error."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    errors: list[Error] = []
    page = await context.new_page()

    def on_error(error: Error) -> None:
        errors.append(error)

    page.on("pageerror", on_error)
    await page.add_init_script(RECORD_STATUS)
    await page.goto(server)
    yield page
    await context.close()
    assert not errors, errors


async def test_describe_ask_rate_and_reimagine(page: Page) -> None:
    # 1. Pick an image: the parts appear as they are produced.
    await page.set_input_files(
        "#file", files=[{"name": "sign.png", "mimeType": "image/png", "buffer": SIGN}]
    )
    await expect(page.locator("#original")).to_be_visible()
    await expect(page.locator("#caption")).not_to_be_empty(timeout=WAIT_MS)
    await expect(page.locator("#ocr")).to_contain_text("GRAND OPENING", timeout=WAIT_MS)
    await expect(page.locator("#tags")).to_contain_text("#", timeout=WAIT_MS)
    await expect(page.locator("#social")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    await expect(page.locator("#social")).not_to_be_empty()
    caption = await page.locator("#caption").text_content()
    await expect(page.locator("#edit")).to_have_value(caption or "")
    # This module's engine starts cold, so the first request waited for the models to load.
    # The status line said so (with an estimate only when a load was ever timed here), and
    # as the only request it never counted the user among those in line.
    log = await page.evaluate("window.statusLog")
    assert any(text.startswith("Warming up the caption model") for text in log), log
    assert not any(re.search(r"in line|ahead of you", text) for text in log), log
    etas = [int(m.group(1)) for text in log if (m := re.search(r"about (\d+) s", text))]
    assert etas == sorted(etas, reverse=True), log  # an estimate never counts up
    await expect(page.locator("#status")).to_be_empty(timeout=WAIT_MS)

    # 2. Rate the caption.
    await page.click("#rate-up")
    await expect(page.locator("#rate-up")).to_have_attribute("aria-pressed", "true")
    await expect(page.locator("#rate-down")).to_have_attribute("aria-pressed", "false")

    # 3. Ask about the image.
    await page.fill("#question", "what does the sign say?")
    await page.click("#ask")
    await expect(page.locator("#answer")).not_to_be_empty(timeout=WAIT_MS)

    # 4. Edit the caption and reimagine: the new image appears beside the original.
    await page.fill("#edit", "a bakery at night, in watercolour")
    await page.fill("#seed", "3")
    await page.click("#reimagine")
    result = page.locator("#result")
    await expect(page.locator("#result-info")).to_contain_text("seed 3", timeout=WAIT_MS)
    await expect(result).to_be_visible()
    await page.wait_for_function("document.getElementById('result').naturalWidth > 0")
    original_box = await page.locator("#original").bounding_box()
    result_box = await result.bounding_box()
    assert original_box is not None and result_box is not None
    assert result_box["x"] >= original_box["x"] + original_box["width"]  # to its right
    assert result_box["y"] < original_box["y"] + original_box["height"]  # on the same row
    await expect(page.locator("#error")).to_be_hidden()


async def test_a_file_that_is_not_an_image_shows_a_clear_error(page: Page) -> None:
    await page.set_input_files(
        "#file",
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": imagekit.not_an_image()}],
    )
    error = page.locator("#error")
    await expect(error).to_be_visible(timeout=WAIT_MS)
    await expect(error).to_contain_text("notes.txt is not an image this bot can read")
    await expect(page.locator("#original")).to_be_hidden()
    await expect(page.locator("#ask")).to_be_disabled()


async def test_imagine_from_text_alone(page: Page) -> None:
    await page.fill("#edit", "a lighthouse in a storm")
    await page.click("#imagine")
    await expect(page.locator("#result")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#result-info")).to_contain_text("seed")
    await expect(page.locator("#rate-result-up")).to_be_enabled()


async def choose(page: Page, name: str, data: bytes, mime: str = "image/png") -> None:
    await page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


async def describe_sign(page: Page) -> str:
    """Describe SIGN to the end; its caption."""
    await choose(page, "sign.png", SIGN)
    await expect(page.locator("#social")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    return await page.locator("#caption").text_content() or ""


async def focused(page: Page) -> str:
    id_: str = await page.evaluate("document.activeElement.id || document.activeElement.tagName")
    return id_


async def test_keyboard_users_keep_their_place_and_hear_the_results(page: Page) -> None:
    # 1. Once the caption exists, it is the uploaded image's text alternative.
    caption = await describe_sign(page)
    assert caption
    await expect(page.get_by_role("img", name=caption, exact=True)).to_be_visible()

    # 2. Ask from the keyboard: focus stays on Ask, and the answer is in a live region.
    await page.fill("#question", "what does the sign say?")
    await page.focus("#ask")
    await page.keyboard.press("Enter")
    assert await focused(page) == "ask"
    await expect(page.locator("#answer")).not_to_be_empty(timeout=WAIT_MS)
    await expect(page.locator("#status")).to_be_empty(timeout=WAIT_MS)
    assert await focused(page) == "ask"
    await expect(page.locator("#answer")).to_have_attribute("aria-live", "polite")

    # 3. Reimagine from the keyboard: focus stays on the button, and the finished image is
    #    announced politely, with what it was made from.
    await page.fill("#edit", "a bakery at night")
    await page.focus("#reimagine")
    await page.keyboard.press("Enter")
    assert await focused(page) == "reimagine"
    await expect(page.locator("#reimagine")).to_have_attribute("aria-disabled", "true")
    announcement = page.get_by_role("status").filter(has_text="The new image is ready")
    await expect(announcement).to_have_text(
        "The new image is ready, made from: a bakery at night", timeout=WAIT_MS
    )
    await expect(announcement).to_have_attribute("aria-live", "polite")
    assert await focused(page) == "reimagine"
    await expect(page.get_by_role("img", name="Reimagined: a bakery at night")).to_be_visible()
    # Pressing it again works: the button is usable again, not only focusable.
    await expect(page.locator("#reimagine")).not_to_have_attribute("aria-disabled", "true")


async def test_a_refused_file_keeps_the_results_it_would_have_replaced(page: Page) -> None:
    caption = await describe_sign(page)
    await page.fill("#question", "what does the sign say?")
    await page.click("#ask")
    await expect(page.locator("#answer")).not_to_be_empty(timeout=WAIT_MS)
    answer = await page.locator("#answer").text_content()
    await page.fill("#edit", "a bakery at night")
    await page.click("#reimagine")
    await expect(page.locator("#result")).to_be_visible(timeout=WAIT_MS)
    result_src = await page.locator("#result").get_attribute("src")
    original_src = await page.locator("#original").get_attribute("src")
    # Any wiping would happen when the file is chosen, before the refusal arrives: record
    # every emptied result, so a wipe that is later undone still fails.
    await page.evaluate("""() => {
      window.wiped = [];
      for (const id of ["caption", "ocr", "tags", "social", "answer"]) {
        const node = document.getElementById(id);
        new MutationObserver(() => { if (!node.textContent) window.wiped.push(id); })
          .observe(node, { childList: true, characterData: true, subtree: true });
      }
    }""")

    await choose(page, "notes.txt", imagekit.not_an_image(), "text/plain")
    await expect(page.locator("#error")).to_contain_text(
        "notes.txt is not an image this bot can read", timeout=WAIT_MS
    )
    await expect(page.locator("#caption")).to_have_text(caption)
    await expect(page.locator("#answer")).to_have_text(answer or "")
    await expect(page.locator("#edit")).to_have_value("a bakery at night")
    await expect(page.locator("#result")).to_be_visible()
    await expect(page.locator("#result")).to_have_attribute("src", result_src or "")
    await expect(page.locator("#original")).to_have_attribute("src", original_src or "")
    await expect(page.locator("#original")).to_have_attribute("alt", caption)
    await expect(page.locator("#ask")).to_be_enabled()
    assert await page.evaluate("window.wiped") == []


# What the server sends when a request must wait; the API tests check the server side.
WAIT_LINES = [
    {"part": "image", "sha256": "ab" * 32},
    {"part": "warming_up", "task": "caption", "eta_s": None},
    {"part": "warming_up", "task": "caption", "eta_s": 9.0},
    {"part": "waiting", "task": "caption", "ahead": 2, "eta_s": 6.0},
    {"part": "waiting", "task": "caption", "ahead": 1, "eta_s": 3.0},
    {"part": "waiting", "task": "caption", "ahead": 0, "eta_s": 0.4},
    {"part": "error", "status": 503, "detail": "The caption model could not be loaded."},
]


async def test_the_status_line_gives_the_users_own_place_in_line(page: Page) -> None:
    # Queues and load times cannot be arranged in the real engine on cue, so the describe
    # stream here is written by the test; everything else on the page is real.
    body = "".join(json.dumps(line) + "\n" for line in WAIT_LINES)

    async def stream(route: Route) -> None:
        await route.fulfill(status=200, content_type="application/x-ndjson", body=body)

    await page.route("**/api/describe", stream)
    await choose(page, "sign.png", SIGN)
    await expect(page.locator("#error")).to_have_text("The caption model could not be loaded.")
    log = await page.evaluate("window.statusLog")
    for text in (
        "Warming up the caption model; the first start can take a minute…",
        "Warming up the caption model, about 9 s…",
        "2 requests are ahead of you for the caption, about 6 s…",
        "1 request is ahead of you for the caption, about 3 s…",
        "You are next for the caption…",
    ):
        assert text in log, log


async def test_an_estimate_that_runs_out_is_dropped_not_counted_up(page: Page) -> None:
    # As above, the queue is written by the test: two requests ahead, about a second.
    status = {
        "tasks": {
            "reimagine": {"task": "reimagine", "queued": 2, "eta_s": 1.0, "warming_up": False}
        }
    }
    release = asyncio.Event()

    async def status_now(route: Route) -> None:
        await route.fulfill(status=200, json=status)

    async def slow_image(route: Route) -> None:
        await release.wait()
        headers = {
            "X-Seed": "1",
            "X-Width": "64",
            "X-Height": "64",
            "X-Steps": "2",
            "X-Sha256": "ab" * 32,
        }
        await route.fulfill(
            status=200, content_type="image/png", headers=headers, body=imagekit.blank_png((64, 64))
        )

    await page.route("**/api/status", status_now)
    await page.route("**/api/imagine", slow_image)
    await page.fill("#edit", "a lighthouse")
    await page.click("#imagine")
    late = "Waiting for the new image; it is taking longer than usual…"
    await expect(page.locator("#status")).to_have_text(late)
    release.set()
    await expect(page.locator("#status")).to_be_empty()
    log = await page.evaluate("window.statusLog")
    assert log.index("2 requests are ahead of you for the new image, about 1 s…") < log.index(late)
    assert not any(re.search(r"about [2-9]", text) for text in log), log


async def test_every_page_state_passes_axe(page: Page) -> None:
    if not AXE.exists():
        pytest.skip(f"axe-core is not installed at {AXE} (make test installs it with npm)")
    source = AXE.read_text()

    async def check(state: str) -> None:
        # Evaluated through the DevTools protocol, so the page's CSP does not block it.
        if not await page.evaluate("typeof axe !== 'undefined'"):
            await page.evaluate(source)
        found = await page.evaluate(
            "axe.run(document).then((r) => ({violations: r.violations, passed: r.passes.length}))"
        )
        problems = [
            f"{v['id']}: {v['help']} at {[n['target'] for n in v['nodes']]}"
            for v in found["violations"]
        ]
        assert not problems, (state, problems)
        assert found["passed"] > 10, state  # axe really looked at the page

    await check("empty page")
    await choose(page, "sign.png", SIGN)
    await check("describing")
    await expect(page.locator("#social")).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    await check("described")
    await page.fill("#question", "what does the sign say?")
    await page.click("#ask")
    await check("asking")
    await expect(page.locator("#answer")).not_to_be_empty(timeout=WAIT_MS)
    await page.click("#rate-up")
    await expect(page.locator("#rate-up")).to_have_attribute("aria-pressed", "true")
    await check("answered and rated")
    await page.fill("#edit", "a bakery at night")
    await page.click("#reimagine")
    await check("reimagining")
    await expect(page.locator("#result")).to_be_visible(timeout=WAIT_MS)
    await check("reimagined")
    await choose(page, "notes.txt", imagekit.not_an_image(), "text/plain")
    await expect(page.locator("#error")).to_be_visible(timeout=WAIT_MS)
    await check("refused file")
    await page.click("#forget")
    await expect(page.locator("#status")).to_contain_text("Forgot")
    await check("forgotten")
