"""The use cases with the tiny profile, the real engine and the in-memory store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio

from bot.config import load_settings
from bot.wiring import build_tasks
from core.engine import Engine
from core.errors import InvalidRequest, LimitReached
from core.ports import ChatRef, UserRef
from core.service import Origin, Part, Service
from core.settings import ServiceSettings
from core.types import Answer, Caption, GeneratedImage, OcrResult, SocialCaption, StepProgress
from tests import imagekit
from tests.fakes_store import MemoryStore

CHAT = ChatRef("test", "chat-1")
ALICE = Origin(UserRef("test", "alice"), CHAT, message_id="m1", author="@alice")
BOB = Origin(UserRef("test", "bob"), CHAT, message_id="m2")
SIGN = imagekit.text_png("GRAND OPENING", size=(400, 120))
NOISE = imagekit.encode(imagekit.noise())
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_cache: Path, single_torch_thread: None) -> AsyncIterator[Engine]:
    settings = load_settings(None, "tiny")
    settings = type(settings)(
        engine=type(settings.engine)(device="cpu", model_cache=model_cache),
        profile=settings.profile,
    )
    async with Engine(build_tasks(settings), settings.engine) as running:
        yield running


def service(engine: Engine, **limits: object) -> tuple[Service, MemoryStore]:
    store = MemoryStore()
    return Service(engine, store, ServiceSettings(**limits), clock=lambda: NOW), store  # type: ignore[arg-type]


async def parts_of(stream: AsyncIterator[Part]) -> list[Part]:
    return [part async for part in stream]


async def test_describe_delivers_caption_then_ocr_tags_and_social(engine: Engine) -> None:
    svc, _ = service(engine)
    parts = [p for p in await parts_of(svc.describe(ALICE, SIGN)) if p.name != "waiting"]
    names = [p.name for p in parts]
    assert names[:3] == ["caption", "ocr", "tags"]
    assert names[-1] == "social"
    assert set(names[3:-1]) <= {"social_draft"}
    assert isinstance(parts[0].value, Caption)
    assert isinstance(parts[1].value, OcrResult) and "GRAND OPENING" in parts[1].value.text
    assert parts[2].value and all(tag.startswith("#") for tag in parts[2].value)
    assert isinstance(parts[-1].value, SocialCaption) and parts[-1].value.text


async def test_chat_settings_choose_the_parts(engine: Engine) -> None:
    svc, _ = service(engine)
    await svc.update_chat_settings(ALICE, parts=("tags", "caption"))
    names = [p.name for p in await parts_of(svc.describe(ALICE, SIGN)) if p.name != "waiting"]
    assert names == ["caption", "tags"]
    with pytest.raises(InvalidRequest, match="Parts are any of"):
        await svc.update_chat_settings(ALICE, parts=("poem",))


async def test_each_model_request_logs_one_line(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    svc, _ = service(engine)
    image = imagekit.encode(imagekit.noise(seed=21))
    with caplog.at_level(logging.INFO, logger="core.service"):
        await svc.caption(ALICE, image)
        await svc.caption(ALICE, image)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert lines[0].startswith("request platform=test task=caption queue_s=")
    assert "device_s=" in lines[0] and lines[0].endswith("cache=miss")
    assert lines[1] == "request platform=test task=caption cache=hit"


async def test_the_same_image_never_costs_the_device_twice(engine: Engine) -> None:
    svc, _ = service(engine)
    image = imagekit.encode(imagekit.noise(seed=11))
    first = await parts_of(svc.describe(ALICE, image))
    before = {t.name: t.batches for t in engine.stats().tasks}
    second = await parts_of(svc.describe(Origin(ALICE.user, CHAT, "m9", author="@alice"), image))
    after = {t.name: t.batches for t in engine.stats().tasks}
    assert after == before

    def values(parts: list[Part]) -> list[object]:
        return [p.value for p in parts if p.name in ("caption", "ocr", "tags", "social")]

    assert values(first) == values(second)


async def test_ask_uses_the_replied_image_else_the_last_one(engine: Engine) -> None:
    svc, store = service(engine)
    with pytest.raises(InvalidRequest, match="Send an image first"):
        await svc.ask(ALICE, "what is it?")
    await svc.caption(Origin(ALICE.user, CHAT, message_id="photo-1"), SIGN)
    await svc.caption(Origin(ALICE.user, CHAT, message_id="photo-2"), NOISE)
    answer = await svc.ask(Origin(ALICE.user, CHAT, reply_to="photo-1"), "what does it say?")
    assert isinstance(answer, Answer) and answer.text
    last = await store.last_image(CHAT)
    assert last is not None and (await store.get_image(last)) == NOISE
    assert (await svc.ask(ALICE, "what is it?")).text


async def test_daily_quota_and_admins(engine: Engine) -> None:
    svc, _ = service(engine, daily_ask=2, admins=("test:bob",))
    for _ in range(2):
        await svc.ask(ALICE, "what?", NOISE)
    with pytest.raises(LimitReached, match="your 2 ask requests for today") as refused:
        await svc.ask(ALICE, "what?", NOISE)
    assert refused.value.retry_after_s == 12 * 3600  # NOW is noon UTC: midnight is 12 h away
    for _ in range(3):
        await svc.ask(BOB, "what?", NOISE)  # admins are exempt


async def test_one_user_cannot_flood_the_queue(engine: Engine) -> None:
    svc, _ = service(engine, per_user_in_flight=1)
    stream = svc.reimagine(ALICE, "a frozen lake", NOISE, steps=4, seed=1)
    first = await anext(stream)  # ALICE now has one request running
    assert first.name in ("waiting", "progress", "image")
    with pytest.raises(LimitReached, match="requests running"):
        await svc.ask(ALICE, "what?", NOISE)
    assert (await svc.ask(BOB, "what?", NOISE)).text  # others are not affected
    await stream.aclose()
    assert (await svc.ask(ALICE, "what?", NOISE)).text  # the slot was given back


async def test_reimagine_reports_progress_and_returns_a_png(engine: Engine) -> None:
    svc, _ = service(engine)
    await svc.caption(ALICE, NOISE)  # 256x192: the chat's last image
    parts = await parts_of(svc.reimagine(ALICE, "a bakery at night", steps=4, seed=5))
    progress = [p.value for p in parts if p.name == "progress"]
    assert progress and all(isinstance(p, StepProgress) for p in progress)
    [image] = [p.value for p in parts if p.name == "image"]
    assert isinstance(image, GeneratedImage) and image.seed == 5
    assert image.png.startswith(b"\x89PNG")
    assert image.width / image.height == pytest.approx(256 / 192, rel=0.1)  # img2img on it


async def test_forget_removes_the_users_images_and_results(engine: Engine) -> None:
    svc, store = service(engine)
    await svc.caption(ALICE, SIGN)
    assert await store.last_image(CHAT) is not None
    forgotten = await svc.forget(ALICE)
    assert forgotten.images == 1 and forgotten.results >= 1
    with pytest.raises(InvalidRequest, match="Send an image first"):
        await svc.ask(ALICE, "what is it?")


async def test_ratings_are_recorded_and_validated(engine: Engine) -> None:
    svc, store = service(engine)
    await svc.rate(ALICE, "ab" * 32, "caption", 1)
    await svc.rate(ALICE, "ab" * 32, "caption", -1)  # a change of mind replaces the first
    with pytest.raises(InvalidRequest, match="thumbs"):
        await svc.rate(ALICE, "ab" * 32, "caption", 5)
    [rating] = await store.ratings("ab" * 32, "caption")
    assert rating.score == -1 and rating.user == ALICE.user


async def test_only_admins_change_settings_when_admins_are_set(engine: Engine) -> None:
    svc, _ = service(engine, admins=("test:bob",))
    with pytest.raises(InvalidRequest, match="admins"):
        await svc.update_chat_settings(ALICE, style="witty")
    assert (await svc.update_chat_settings(BOB, style="witty")).style == "witty"
    assert (await svc.chat_settings(CHAT)).style == "witty"


async def test_concurrent_describes_share_batches(engine: Engine) -> None:
    svc, _ = service(engine, per_user_in_flight=10)
    images = [imagekit.encode(imagekit.noise(seed=100 + i)) for i in range(4)]
    results = await asyncio.gather(
        *(
            parts_of(svc.describe(Origin(UserRef("test", f"u{i}"), CHAT), img))
            for i, img in enumerate(images)
        )
    )
    assert all(any(p.name == "social" for p in parts) for parts in results)
