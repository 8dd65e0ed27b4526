"""The use cases with the tiny profile, the real engine and the in-memory store; and,
where timing must be controlled, the real engine with fake tasks that implement the
task contract."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from adapters.memory import MemoryStore
from adapters.sqlite import SqliteStore
from bot.config import load_settings
from bot.wiring import TASK_NAMES, build_tasks, engine_for
from core.engine import Engine
from core.errors import (
    DuplicateEvent,
    InferenceFailed,
    InvalidRequest,
    LimitReached,
    Overloaded,
    ShuttingDown,
)
from core.ports import ChatRef, UserRef
from core.replies import Reply
from core.service import Service
from core.settings import EngineSettings, RaySettings, ServiceSettings
from core.types import (
    Answer,
    Caption,
    FromAnswer,
    GeneratedImage,
    OcrResult,
    Origin,
    Part,
    SocialCaption,
    SocialDraft,
    StepProgress,
    Stored,
    Tags,
    Unavailable,
    Upload,
    Waiting,
    WarmingUp,
)
from tests import imagekit
from tests.backends import BACKENDS, SMALL, delete_ray_apps, engine_on
from tests.fakes import FakeCaptioner, FakeReader, FileGate

CHAT = ChatRef("test", "chat-1")
ALICE = Origin(UserRef("test", "alice"), CHAT, message_id="m1", author="@alice")
BOB = Origin(UserRef("test", "bob"), CHAT, message_id="m2")
SIGN = imagekit.text_png("GRAND OPENING", size=(400, 120))
NOISE = imagekit.encode(imagekit.noise())
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=BACKENDS)
async def engine(
    request: pytest.FixtureRequest, model_cache: Path, single_torch_thread: None
) -> AsyncIterator[Engine]:
    """The tiny profile's seven tasks on each backend in turn: on Ray, each task is a
    deployment of its own, so every test using this engine holds on both."""
    settings = load_settings(None, "tiny")
    engine_settings = type(settings.engine)(device="cpu", model_cache=model_cache)
    if request.param == "local":
        settings = type(settings)(engine=engine_settings, profile=settings.profile)
        async with Engine(build_tasks(settings), settings.engine) as running:
            yield running
        return
    pytest.importorskip("ray", reason="Ray is the optional extra '.[ray]'")
    request.getfixturevalue("ray_backend")
    settings = type(settings)(
        engine=replace(engine_settings, backend="ray"),
        profile=settings.profile,
        ray=RaySettings(tasks=dict.fromkeys(TASK_NAMES, SMALL)),
    )
    async with engine_for(settings) as running:
        yield running
    await asyncio.to_thread(delete_ray_apps)


def service(engine: Engine, **limits: Any) -> tuple[Service, MemoryStore]:
    store = MemoryStore()
    return Service(engine, store, ServiceSettings(**limits), clock=lambda: NOW), store


@contextlib.asynccontextmanager
async def gated_engine(
    backend: str, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Engine, FileGate]]:
    """A fake captioner whose forwards wait until the test opens the gate, and a fake
    reader, on ``backend``."""
    gate = FileGate(tmp_path / "gate")
    tasks = {"caption": functools.partial(FakeCaptioner, gate=gate), "ocr": FakeReader}
    async with engine_on(backend, tasks, **settings) as engine:
        yield engine, gate


async def parts_of(reply: Reply[Any]) -> list[Part]:
    async with reply:
        return [part async for part in reply]


def without_waiting(parts: list[Part]) -> list[Part]:
    return [p for p in parts if not isinstance(p, Waiting | WarmingUp)]


def picture(seed: int) -> bytes:
    return imagekit.encode(imagekit.noise(seed=seed))


def as_user(name: str, message_id: str | None = None, **more: Any) -> Origin:
    return Origin(UserRef("test", name), CHAT, message_id=message_id, **more)


# -- describe ------------------------------------------------------------------------------


async def test_describe_delivers_caption_then_ocr_tags_and_social(engine: Engine) -> None:
    svc, _ = service(engine)
    parts = without_waiting(await parts_of(svc.describe(ALICE, Upload(SIGN))))
    assert isinstance(parts[0], Caption)
    assert isinstance(parts[1], OcrResult) and "GRAND OPENING" in parts[1].text
    assert isinstance(parts[2], Tags) and all(t.startswith("#") for t in parts[2].hashtags)
    assert all(isinstance(p, SocialDraft) for p in parts[3:-1])
    assert isinstance(parts[-1], SocialCaption) and parts[-1].text


async def test_chat_settings_choose_the_parts(engine: Engine) -> None:
    svc, _ = service(engine)
    await svc.update_chat_settings(as_user("alice", private=True), parts=("tags", "caption"))
    parts = without_waiting(await parts_of(svc.describe(ALICE, Upload(SIGN))))
    assert [type(p) for p in parts] == [Caption, Tags]
    with pytest.raises(InvalidRequest, match="Parts are any of"):
        await svc.update_chat_settings(as_user("alice", private=True), parts=("poem",))


async def test_each_model_request_logs_one_line(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    svc, _ = service(engine)
    image = Upload(imagekit.encode(imagekit.noise(seed=21)))
    with caplog.at_level(logging.INFO, logger="core.service"):
        await svc.caption(ALICE, image)
        await svc.caption(ALICE, image)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert lines[0].startswith("request platform=test task=caption queue_s=")
    assert "device_s=" in lines[0] and lines[0].endswith("cache=miss")
    assert lines[1] == "request platform=test task=caption cache=hit"


async def test_the_same_image_never_costs_the_device_twice(engine: Engine) -> None:
    svc, _ = service(engine)
    image = Upload(imagekit.encode(imagekit.noise(seed=11)))
    first = without_waiting(await parts_of(svc.describe(ALICE, image)))
    before = {t.name: t.batches for t in engine.stats().tasks}
    again = as_user("alice", "m9", author="@alice")
    second = without_waiting(await parts_of(svc.describe(again, image)))
    assert {t.name: t.batches for t in engine.stats().tasks} == before
    assert [p for p in first if not isinstance(p, SocialDraft)] == second


async def test_the_same_new_image_from_ten_people_at_once_is_computed_once(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    svc, _ = service(engine, per_user_in_flight=10)
    image = Upload(imagekit.encode(imagekit.noise(seed=77)))
    with caplog.at_level(logging.INFO, logger="core.service"):
        answers = await asyncio.gather(
            *(parts_of(svc.describe(as_user(f"u{i}"), image)) for i in range(10))
        )
    misses = [r.getMessage() for r in caplog.records if r.getMessage().endswith("cache=miss")]
    for task in ("caption", "ocr", "tags", "mood", "write"):
        assert sum(f"task={task} " in line for line in misses) == 1, (task, misses)
    captions = {p.text for parts in answers for p in parts if isinstance(p, Caption)}
    assert len(captions) == 1


async def test_the_cache_key_is_the_models_identity_not_its_log_line(engine: Engine) -> None:
    """OCR's description changes when it loads; the key must not, or the same image is
    computed again after every unload and restart."""
    svc, store = service(engine)
    image = imagekit.encode(imagekit.noise(seed=31))
    ocr_task = engine.task("ocr")
    identity_before = ocr_task.identity()
    await svc.ocr(ALICE, Upload(image))
    assert ocr_task.identity() == identity_before
    [key] = [k for k in store.results if k.task == "ocr"]
    assert key.model == identity_before
    assert "loaded" not in key.model


async def test_an_output_shaping_setting_changes_the_key(model_cache: Path) -> None:
    """After an operator changes beams, lengths, thresholds or languages, no old result."""

    settings = load_settings(None, "tiny")
    engine_settings = replace(settings.engine, device="cpu", model_cache=model_cache)
    changed = replace(
        settings.profile,
        caption=replace(settings.profile.caption, max_new_tokens=7),
        ocr=replace(settings.profile.ocr, min_confidence=0.5),
        tags=replace(settings.profile.tags, num_beams=3),
        mood=replace(settings.profile.mood, threshold=0.5),
    )
    same = build_tasks(replace(settings, engine=engine_settings))
    other = build_tasks(replace(settings, engine=engine_settings, profile=changed))
    for name in ("caption", "ocr", "tags", "mood"):
        assert same[name].identity() != other[name].identity(), name
    # Scheduling settings shape nothing: the identity stays.
    batching = replace(settings.profile.caption.batching, max_batch_size=1)
    rescheduled = replace(
        settings.profile, caption=replace(settings.profile.caption, batching=batching)
    )
    again = build_tasks(replace(settings, engine=engine_settings, profile=rescheduled))
    assert again["caption"].identity() == same["caption"].identity()


# -- which image ---------------------------------------------------------------------------


async def test_ask_uses_the_replied_image_else_the_last_one(engine: Engine) -> None:
    svc, _ = service(engine)
    with pytest.raises(InvalidRequest, match="Send an image first"):
        await svc.ask(ALICE, "what is it?")
    await svc.caption(as_user("alice", "photo-1"), Upload(SIGN))
    await svc.caption(as_user("alice", "photo-2"), Upload(NOISE))
    async with svc.ask(as_user("alice", reply_to="photo-1"), "what does it say?") as reply:
        assert reply.image is not None and reply.image.data == SIGN
        answer = [p async for p in reply][-1]
    assert isinstance(answer, Answer) and answer.text
    async with svc.ask(ALICE, "what is it?") as reply:
        assert reply.image is not None and reply.image.data == NOISE


async def test_a_reply_to_an_unknown_message_is_refused_not_answered_about_another(
    engine: Engine,
) -> None:
    svc, _ = service(engine)
    await svc.caption(as_user("alice", "photo-1"), Upload(SIGN))
    with pytest.raises(InvalidRequest, match="don't know the message you replied to"):
        await svc.ask(as_user("alice", reply_to="not-a-photo"), "what is it?")
    with pytest.raises(InvalidRequest, match="don't know the message"):
        await svc.reimagine(as_user("alice", reply_to="not-a-photo"), "a lake", steps=2)


async def test_a_reply_to_the_bots_answer_means_that_answers_image(engine: Engine) -> None:
    svc, _ = service(engine)
    async with svc.caption(as_user("alice", "photo-1"), Upload(SIGN)) as reply:
        [part async for part in reply]
        await reply.sent("bot-answer-1")
    await svc.caption(as_user("bob", "photo-2"), Upload(NOISE))  # now the chat's last
    async with svc.ask(as_user("carol", reply_to="bot-answer-1"), "what?") as asked:
        assert asked.image is not None and asked.image.data == SIGN


async def test_a_reply_to_the_bots_answer_finds_that_answer_after_a_restart(
    tmp_path: Path, engine: Engine
) -> None:
    """/reimagine as a reply to the bot's answer starts from the caption it showed."""
    database, images = tmp_path / "bot.sqlite3", tmp_path / "images"
    async with SqliteStore.open(database, images) as store:
        svc = Service(engine, store, ServiceSettings(), clock=lambda: NOW)
        async with svc.caption(as_user("alice", "photo-1"), Upload(SIGN)) as reply:
            caption = [part async for part in reply][-1]
            await reply.sent("bot-answer-1")
    async with SqliteStore.open(database, images) as store:
        svc = Service(engine, store, ServiceSettings(), clock=lambda: NOW)
        answer = await svc.replied_answer(as_user("bob", reply_to="bot-answer-1"))
        assert answer is not None and answer.handle == reply.handle
        assert isinstance(caption, Caption)
        assert await svc.caption_of(BOB, answer.handle) == caption.text
        assert await svc.replied_answer(as_user("bob", reply_to="photo-1")) is None
        assert await svc.replied_answer(BOB) is None


async def test_each_image_of_a_message_is_addressable(engine: Engine) -> None:
    svc, _ = service(engine)
    album = [imagekit.encode(imagekit.noise(seed=40 + i)) for i in range(3)]
    for position, data in enumerate(album):
        await svc.caption(as_user("alice", "album"), Upload(data, position=position))
    with pytest.raises(InvalidRequest, match="has 3 images"):
        await svc.ask(as_user("bob", reply_to="album"), "what is it?")
    async with svc.ask(as_user("bob", reply_to="album", reply_position=2), "what?") as reply:
        assert reply.image is not None and reply.image.data == album[2]
    with pytest.raises(InvalidRequest, match="don't have image 4 of that message"):
        await svc.ask(as_user("bob", reply_to="album", reply_position=3), "what?")
    # A refused image keeps its place: the next one is not renumbered into it.
    await svc.caption(as_user("alice", "gap"), Upload(album[0], position=0))
    with pytest.raises(InvalidRequest, match="not an image"):
        await svc.caption(as_user("alice", "gap"), Upload(b"notes", "notes.txt", position=1))
    await svc.caption(as_user("alice", "gap"), Upload(album[2], position=2))
    with pytest.raises(InvalidRequest, match="don't have image 2"):
        await svc.ask(as_user("bob", reply_to="gap", reply_position=1), "what?")
    async with svc.ask(as_user("bob", reply_to="gap", reply_position=2), "what?") as reply:
        assert reply.image is not None and reply.image.data == album[2]


async def test_forget_leaves_nothing_of_the_user_reachable_in_their_chat(
    engine: Engine,
) -> None:
    """Even when someone else also sent the same image."""
    svc, store = service(engine)
    alice = Origin(UserRef("web", "alice"), ChatRef("web", "alice"))
    bob = Origin(UserRef("web", "bob"), ChatRef("web", "bob"))
    await svc.caption(bob, Upload(SIGN))
    await svc.caption(alice, Upload(SIGN))
    forgotten = await svc.forget(alice)
    assert forgotten.images == 1 and forgotten.deleted == 0  # Bob still has it
    with pytest.raises(InvalidRequest, match="Send an image first"):
        await svc.ask(alice, "what is it?")
    async with svc.reimagine(alice, "a lake at dawn", steps=2) as reply:
        assert reply.image is None  # from text alone, not from the forgotten image
    assert await store.last_image(bob.chat) is not None


async def test_forget_removes_what_only_the_user_sent(engine: Engine) -> None:
    svc, store = service(engine)
    await svc.caption(ALICE, Upload(SIGN))
    forgotten = await svc.forget(ALICE)
    assert forgotten.images == forgotten.deleted == 1 and forgotten.results >= 1
    assert store.images == {}


# -- limits and quotas ---------------------------------------------------------------------


async def test_requests_at_the_same_moment_cannot_pass_the_per_user_limit(
    backend: str, tmp_path: Path
) -> None:
    async with gated_engine(backend, tmp_path) as (engine, gate):
        svc = Service(engine, MemoryStore(), ServiceSettings(per_user_in_flight=2))
        together = [asyncio.ensure_future(svc.caption(ALICE, Upload(picture(i)))) for i in range(5)]
        await asyncio.sleep(0.3)
        refused = [t for t in together if t.done()]
        assert len(refused) == 3
        assert all(isinstance(t.exception(), LimitReached) for t in refused)
        gate.set()
        admitted = await asyncio.gather(*(t for t in together if t not in refused))
    assert len(admitted) == 2
    assert all(caption.text.startswith("A picture of") for caption in admitted)


async def test_refused_requests_spend_no_quota(engine: Engine) -> None:
    svc, store = service(engine, daily_ask=3)
    fresh = Origin(UserRef("test", "fresh"), ChatRef("test", "empty-chat"))
    for _ in range(200):
        with pytest.raises(InvalidRequest):
            await svc.ask(fresh, "what is it?")  # no image in reach: refused
    assert await store.usage(fresh.user, "ask", NOW.date()) == 0
    assert (await svc.ask(fresh, "what is it?", Upload(NOISE))).text
    assert await store.usage(fresh.user, "ask", NOW.date()) == 1


async def test_a_describe_the_engine_has_no_room_for_is_refused_before_it_starts(
    backend: str, tmp_path: Path
) -> None:
    """It needs room for three model requests at once; it never starts and then finds
    itself refused half-way, and the refusal spends no quota."""
    async with gated_engine(backend, tmp_path, max_in_flight=4) as (engine, gate):
        store = MemoryStore()
        svc = Service(engine, store, ServiceSettings(), clock=lambda: NOW)
        await svc.update_chat_settings(as_user("x", chat_admin=True), parts=("caption", "ocr"))
        async with svc.describe(ALICE, Upload(picture(1))):
            with pytest.raises(Overloaded):
                await svc.describe(BOB, Upload(picture(2)))
            assert await store.usage(BOB.user, "describe", NOW.date()) == 0
            gate.set()
        gate.clear()
        async with svc.describe(BOB, Upload(picture(2))) as later:
            gate.set()
            assert [type(p) for p in [p async for p in later]][-2:] == [Caption, OcrResult]


async def test_a_chat_describe_waits_in_line_for_room_and_says_where_it_stands(
    backend: str, tmp_path: Path
) -> None:
    """A chat user cannot retry the way an API client does: their request waits its turn."""
    async with gated_engine(backend, tmp_path, max_in_flight=4) as (engine, gate):
        svc = Service(engine, MemoryStore(), ServiceSettings(), clock=lambda: NOW)
        await svc.update_chat_settings(as_user("x", chat_admin=True), parts=("caption", "ocr"))
        async with svc.describe(ALICE, Upload(picture(1))) as first:
            waiting = svc.describe(BOB, Upload(picture(2))).waiting_in_line()
            async with waiting:
                told = await anext(aiter(waiting))
                assert told == Waiting("describe", 0, told.eta_s)
                gate.set()
                later = [p async for p in waiting]
            assert [type(p) for p in [p async for p in first]][-2:] == [Caption, OcrResult]
        assert [type(p) for p in later][-2:] == [Caption, OcrResult]
        assert engine.stats().in_flight == 0


async def test_the_write_quota_is_spent_only_on_a_caption_that_is_written(
    engine: Engine,
) -> None:
    svc, store = service(engine, daily_write=1)
    async with svc.describe(ALICE, Upload(picture(61))) as reply:
        await anext(aiter(reply))  # the reader leaves after the first part
    assert await store.usage(ALICE.user, "write", NOW.date()) == 0
    assert isinstance((await parts_of(svc.describe(ALICE, Upload(picture(61)))))[-1], SocialCaption)
    assert await store.usage(ALICE.user, "write", NOW.date()) == 1


async def test_forget_stops_the_users_running_requests_first(backend: str, tmp_path: Path) -> None:
    """Or a request finishing after the forgetting writes its answer back."""
    async with gated_engine(backend, tmp_path) as (engine, gate):
        store = MemoryStore()
        svc = Service(engine, store, ServiceSettings(), clock=lambda: NOW)
        async with svc.caption(ALICE, Upload(picture(3))) as running:
            forgotten = await svc.forget(ALICE)
            with pytest.raises(InvalidRequest, match="forget"):
                [part async for part in running]
        gate.set()
        await asyncio.sleep(0.1)
    assert forgotten.images == 1
    assert store.images == {} and store.answers == {} and store.results == {}


async def test_daily_quota_and_admins(engine: Engine) -> None:
    svc, _ = service(engine, daily_ask=2, admins=("test:bob",))
    for _ in range(2):
        await svc.ask(ALICE, "what?", Upload(NOISE))
    with pytest.raises(LimitReached, match="limit of 2 questions;") as refused:
        await svc.ask(ALICE, "what?", Upload(NOISE))
    assert refused.value.retry_after_s == 12 * 3600  # NOW is noon UTC: midnight is 12 h away
    for _ in range(3):
        await svc.ask(BOB, "what?", Upload(NOISE))  # admins are exempt
    usage = {line.use_case: line for line in await svc.usage(ALICE)}
    assert usage["ask"].used == 2 and usage["ask"].left == 0


async def test_describe_spends_the_write_quota_for_its_social_caption(engine: Engine) -> None:
    svc, store = service(engine, daily_write=1)
    first = await parts_of(svc.describe(ALICE, Upload(SIGN)))
    assert isinstance(first[-1], SocialCaption)
    second = await parts_of(svc.describe(ALICE, Upload(NOISE)))
    assert isinstance(second[-1], Unavailable) and second[-1].part == "social"
    assert "limit of 1 social caption;" in second[-1].reason
    assert any(isinstance(p, Caption) for p in second)  # the rest of the answer came
    assert await store.usage(ALICE.user, "write", NOW.date()) == 1


async def test_one_user_cannot_flood_the_queue(engine: Engine) -> None:
    svc, _ = service(engine, per_user_in_flight=1)
    async with svc.reimagine(ALICE, "a frozen lake", Upload(NOISE), steps=4, seed=1) as reply:
        await anext(aiter(reply))  # ALICE now has one request running
        with pytest.raises(LimitReached, match="requests running"):
            await svc.ask(ALICE, "what?", Upload(NOISE))
        assert (await svc.ask(BOB, "what?", Upload(NOISE))).text  # others are not affected
    assert (await svc.ask(ALICE, "what?", Upload(NOISE))).text  # the slot was given back


# -- refusals come before the stream ---------------------------------------------------------


async def test_refusals_come_before_the_first_part(engine: Engine) -> None:
    svc, _ = service(engine)
    for reply, reason in (
        (svc.describe(ALICE, Upload(b"not an image", "notes.txt")), "not an image"),
        (svc.ask(ALICE, "?" * 1000, Upload(NOISE)), "longer than"),
        (svc.reimagine(ALICE, "", Upload(NOISE)), "prompt is empty"),
        (svc.write(ALICE, Upload(NOISE), style="x" * 200), "a few words"),
    ):
        with pytest.raises(InvalidRequest, match=reason):
            async with reply:
                pytest.fail("entered a refused request")


async def test_a_reader_that_stops_frees_the_slot_and_the_device(
    backend: str, tmp_path: Path
) -> None:
    async with gated_engine(backend, tmp_path) as (engine, gate):
        svc = Service(engine, MemoryStore(), ServiceSettings(per_user_in_flight=1))
        async with svc.describe(ALICE, Upload(picture(1))):
            pass  # the adapter gave up before reading anything
        gate.set()
        done = await svc.caption(ALICE, Upload(picture(2)))
        assert done.text == f"A picture of {len(picture(2))} bytes."


# -- shutdown --------------------------------------------------------------------------------


async def test_shutdown_finishes_what_it_can_and_tells_the_rest(
    backend: str, tmp_path: Path
) -> None:
    async with gated_engine(backend, tmp_path) as (engine, gate):
        svc = Service(engine, MemoryStore(), ServiceSettings(per_user_in_flight=0))
        stuck = [svc.caption(as_user(f"u{i}"), Upload(picture(i))) for i in range(3)]
        waiting = [asyncio.ensure_future(reply._final()) for reply in stuck]
        await asyncio.sleep(0.2)
        await svc.shutdown(grace_s=0.3)
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(o, ShuttingDown) for o in outcomes), outcomes
        with pytest.raises(ShuttingDown, match="restarting"):
            await svc.caption(ALICE, Upload(picture(9)))
        gate.set()


async def test_shutdown_lets_work_that_ends_within_the_grace_finish(
    backend: str, tmp_path: Path
) -> None:
    async with gated_engine(backend, tmp_path) as (engine, gate):
        svc = Service(engine, MemoryStore(), ServiceSettings())
        pending = asyncio.ensure_future(svc.caption(ALICE, Upload(picture(5)))._final())
        await asyncio.sleep(0.1)
        asyncio.get_running_loop().call_later(0.2, gate.set)
        await svc.shutdown(grace_s=10)
        assert (await pending).text == f"A picture of {len(picture(5))} bytes."


# -- answers, buttons, journal ---------------------------------------------------------------


async def test_a_handle_reaches_the_same_image_and_result_after_a_restart(
    tmp_path: Path, engine: Engine
) -> None:
    database, images = tmp_path / "bot.sqlite3", tmp_path / "images"
    async with SqliteStore.open(database, images) as store:
        svc = Service(engine, store, ServiceSettings(), clock=lambda: NOW)
        async with svc.describe(ALICE, Upload(SIGN)) as reply:
            parts = [part async for part in reply]
            await reply.sent("bot-1")
        handle, sha = reply.handle, reply.sha256
    caption = next(p for p in parts if isinstance(p, Caption))
    async with SqliteStore.open(database, images) as store:
        svc = Service(engine, store, ServiceSettings(), clock=lambda: NOW)
        answer = await svc.answer(BOB, handle)
        assert (answer.sha256, answer.kind) == (sha, "describe")
        assert await svc.caption_of(BOB, handle) == caption.text
        async with svc.reimagine(BOB, "a lake", FromAnswer(handle), steps=2) as again:
            assert again.sha256 == sha
        other_chat = Origin(UserRef("test", "eve"), ChatRef("test", "elsewhere"))
        with pytest.raises(InvalidRequest, match="no longer works here"):
            await svc.answer(other_chat, handle)
        await svc.rate_answer(BOB, handle, 1)
        [rating] = await store.ratings(sha, "describe")
        assert rating.answer == handle


async def test_reroll_makes_a_new_caption_and_the_answer_shows_it(engine: Engine) -> None:
    svc, _ = service(engine)
    async with svc.describe(ALICE, Upload(SIGN)) as reply:
        first = next(p for p in [part async for part in reply] if isinstance(p, Caption))
    seen = {first.text}
    for _ in range(5):
        rerolled = await svc.reroll(BOB, reply.handle)
        seen.add(rerolled.text)
        assert await svc.caption_of(BOB, reply.handle) == rerolled.text
    assert len(seen) > 1  # sampled: not the cached caption every time


@pytest.mark.parametrize(("unusable", "answered"), [(2, True), (3, False)])
async def test_a_reroll_draws_again_when_a_sample_cleans_up_to_no_text(
    unusable: int, answered: bool
) -> None:
    captioner = FakeCaptioner(unusable_samples=unusable)
    tasks = {"caption": captioner, "ocr": FakeReader()}
    async with Engine(tasks, EngineSettings(device="cpu")) as engine:  # type: ignore[arg-type]
        svc, _ = service(engine)
        async with svc.caption(ALICE, Upload(picture(3))) as reply:
            [part async for part in reply]
        if answered:
            assert "take" in (await svc.reroll(BOB, reply.handle)).text
        else:
            with pytest.raises(InferenceFailed, match="could not describe this image"):
                await svc.reroll(BOB, reply.handle)
    assert captioner.unusable_samples == 0  # each draw was made


async def test_the_journal_answers_an_event_once_from_its_stored_image(engine: Engine) -> None:
    svc, store = service(engine)
    job = await svc.journal("test:update:1", ALICE, "describe", {"command": "describe"})
    with pytest.raises(DuplicateEvent):
        await svc.journal("test:update:1", ALICE, "describe", {})
    async with svc.describe(ALICE, Upload(SIGN), job=job) as reply:
        await anext(aiter(reply))
        # The bot "dies" here: the answer never went out.
    recovered: list[tuple[Origin, list[str]]] = []

    async def answer(entry: Any) -> None:
        recovered.append((entry.origin, entry.images))
        async with svc.describe(entry.origin, Stored(entry.images[0])) as again:
            assert again.sha256 == reply.sha256
            [p async for p in again]

    assert await svc.recover("test", answer) == 1
    assert recovered == [(ALICE, [reply.sha256])]
    assert await svc.recover("test", answer) == 0
    assert await store.unfinished_jobs() == []


# -- status, settings, ratings ----------------------------------------------------------------


async def test_status_and_usage(engine: Engine) -> None:
    svc, _ = service(engine, daily_describe=5)
    status = svc.status()
    assert status.accepting and {t.task for t in status.tasks} >= {"caption", "ocr", "vqa"}
    await svc.caption(ALICE, Upload(NOISE))
    usage = {line.use_case: line for line in await svc.usage(ALICE)}
    assert (usage["describe"].used, usage["describe"].left) == (1, 4)


async def test_reimagine_reports_progress_and_returns_a_png(engine: Engine) -> None:
    svc, _ = service(engine)
    await svc.caption(ALICE, Upload(NOISE))  # 256x192: the chat's last image
    parts = await parts_of(svc.reimagine(ALICE, "a bakery at night", steps=4, seed=5))
    assert [p for p in parts if isinstance(p, StepProgress)]
    image = parts[-1]
    assert isinstance(image, GeneratedImage) and image.seed == 5
    assert image.png.startswith(b"\x89PNG")
    assert image.width / image.height == pytest.approx(256 / 192, rel=0.1)  # img2img on it


async def test_a_reply_to_a_reimagined_image_means_the_new_image(engine: Engine) -> None:
    svc, store = service(engine)
    async with svc.reimagine(ALICE, "a bakery at night", Upload(NOISE), steps=2) as reply:
        made = [p async for p in reply][-1]
        await reply.sent("bot-image")
    assert isinstance(made, GeneratedImage)
    async with svc.ask(as_user("bob", reply_to="bot-image"), "what is it?") as asked:
        assert asked.image is not None and asked.image.data == made.png
    # Its buttons mean the new image, as a reply to it does; no caption to reroll.
    async with svc.ask(BOB, "what is it?", FromAnswer(reply.handle)) as pressed:
        assert pressed.image is not None and pressed.image.data == made.png
    with pytest.raises(InvalidRequest, match="Only a description's caption"):
        await svc.reroll(BOB, reply.handle)
    # Its thumbs are about the new image, not the one it was made from.
    await svc.rate_answer(BOB, reply.handle, -1)
    [rating] = await store.ratings(hashlib.sha256(made.png).hexdigest(), "reimagine")
    assert rating.score == -1 and rating.answer == reply.handle


async def test_ratings_are_recorded_and_validated(engine: Engine) -> None:
    svc, store = service(engine)
    await svc.rate(ALICE, "ab" * 32, "caption", 1)
    await svc.rate(ALICE, "ab" * 32, "caption", -1)  # a change of mind replaces the first
    for sha, task, score, reason in (
        ("ab" * 32, "caption", 5, "thumbs"),
        ("ab" * 32, "caption", True, "thumbs"),
        ("ab" * 32, "poem", 1, "about one of"),
        ("../etc", "caption", 1, "sha256"),
    ):
        with pytest.raises(InvalidRequest, match=reason):
            await svc.rate(ALICE, sha, task, score)
    [rating] = await store.ratings("ab" * 32, "caption")
    assert rating.score == -1 and rating.user == ALICE.user


async def test_who_may_change_a_chats_settings(engine: Engine) -> None:
    """In groups only the chat's admins and the bot's admins; in a private chat, its user.
    No bot admins configured does not mean everyone may."""
    svc, _ = service(engine)
    with pytest.raises(InvalidRequest, match="administrators"):
        await svc.update_chat_settings(ALICE, style="witty")
    assert (await svc.update_chat_settings(as_user("x", chat_admin=True), style="witty")).style
    assert (await svc.chat_settings(CHAT)).style == "witty"
    assert await svc.update_chat_settings(as_user("dm", private=True), style="dry")
    admins, _ = service(engine, admins=("test:bob",))
    assert (await admins.update_chat_settings(BOB, style="warm")).style == "warm"


async def test_concurrent_describes_share_batches(engine: Engine) -> None:
    svc, _ = service(engine, per_user_in_flight=10)
    images = [imagekit.encode(imagekit.noise(seed=100 + i)) for i in range(4)]
    results = await asyncio.gather(
        *(parts_of(svc.describe(as_user(f"u{i}"), Upload(img))) for i, img in enumerate(images))
    )
    assert all(isinstance(parts[-1], SocialCaption) for parts in results)


async def test_a_writer_that_cannot_be_had_leaves_one_sentence_and_one_log_line(
    model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gpu profile's default writer is gated; without access, every description still
    comes, its social caption says in one sentence that it is unavailable, and the
    operator reads why once, not a traceback per request."""
    settings = load_settings(None, "tiny")
    profile = replace(
        settings.profile,
        write=replace(settings.profile.write, model="meta-llama/Llama-2-7b-chat-hf"),
    )
    settings = replace(
        settings,
        engine=replace(settings.engine, device="cpu", model_cache=model_cache),
        profile=profile,
    )
    tasks = build_tasks(settings, ["caption", "ocr", "tags", "write"])
    async with Engine(tasks, settings.engine) as engine:
        svc, _ = service(engine)
        with caplog.at_level(logging.INFO):
            answers = [
                await parts_of(svc.describe(as_user(f"u{i}"), Upload(picture(80 + i))))
                for i in range(3)
            ]
    for parts in answers:
        assert any(isinstance(p, Caption) for p in parts)
        assert parts[-1] == Unavailable(
            "social",
            "This bot cannot write social captions right now; its operator has been told why.",
        )
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(told) == 1 and told[0].startswith("write is unavailable: ")
    assert "meta-llama/Llama-2-7b-chat-hf" in told[0]
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.WARNING)
