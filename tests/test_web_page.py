"""The playground page in a real headless Chromium (Debian's), driven by Playwright.

The server, the engine (tiny profile) and Playwright's async API share this module's event
loop. Every wait is an explicit wait on an element or its text; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Error, Page, async_playwright, expect

from adapters.web import create_app, serve
from bot.config import load_settings
from bot.wiring import build_tasks
from core.engine import Engine
from core.service import Service
from core.settings import ServiceSettings
from tests import imagekit
from tests.fakes_store import MemoryStore

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
    log = await page.evaluate("window.statusLog")
    assert any("Warming up" in text or "in line" in text for text in log), log
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
