"""One contract for every ``core.ports.Store``: SqliteStore and the in-memory fake.

The first half runs against both; the second half checks what only a database on disk can
do wrong (WAL, migrations, restarts, two processes, half-written files).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from adapters.memory import MemoryStore
from adapters.sqlite import SqliteStore, migrations
from core.errors import ConfigError
from core.ports import AnswerRecord, ChatRef, Forgotten, Job, Rating, ResultKey, Store, UserRef

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
ALICE = UserRef("telegram", "1")
BOB = UserRef("telegram", "2")
ALICE_ON_DISCORD = UserRef("discord", "1")
CHAT = ChatRef("telegram", "-100")
OTHER_CHAT = ChatRef("telegram", "-200")
CHAT_ON_DISCORD = ChatRef("discord", "-100")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job(event_id: str, accepted: datetime, payload: str = "{}") -> Job:
    return Job(event_id, CHAT, ALICE, "describe", payload, accepted)


@pytest_asyncio.fixture(params=["sqlite", "memory"], loop_scope="function")
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        async with SqliteStore.open(tmp_path / "bot.db", tmp_path / "images") as opened:
            yield opened
    else:
        yield MemoryStore()


# -- images ----------------------------------------------------------------------------
async def test_same_bytes_are_stored_once_and_keep_their_first_time(store: Store) -> None:
    first = await store.put_image(b"cat", ALICE, T0)
    again = await store.put_image(b"cat", BOB, T0 + timedelta(hours=1))

    assert first.sha256 == again.sha256 == sha(b"cat")
    assert first.size == again.size == 3
    assert first.created == again.created == T0
    assert await store.get_image(sha(b"cat")) == b"cat"
    assert await store.get_image(sha(b"dog")) is None


async def test_an_image_shared_by_two_users_stays_until_both_are_forgotten(store: Store) -> None:
    await store.put_image(b"cat", ALICE, T0)
    await store.put_image(b"cat", BOB, T0)

    assert await store.forget_user(ALICE) == Forgotten(
        images=1, deleted=0, results=0, bytes_freed=0
    )
    assert await store.get_image(sha(b"cat")) == b"cat"
    assert await store.forget_user(BOB) == Forgotten(images=1, deleted=1, results=0, bytes_freed=3)
    assert await store.get_image(sha(b"cat")) is None


async def test_an_image_name_must_be_a_digest(store: Store) -> None:
    with pytest.raises(ValueError, match="sha256"):
        await store.get_image("../../etc/passwd")


async def test_times_must_be_timezone_aware(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.put_image(b"cat", ALICE, datetime(2025, 3, 1, 12, 0))


# -- results cache ---------------------------------------------------------------------
async def test_a_result_is_found_only_by_its_whole_key(store: Store) -> None:
    await store.put_image(b"cat", ALICE, T0)
    await store.put_image(b"dog", ALICE, T0)
    key = ResultKey(sha(b"cat"), "caption", "blip2", '{"beams":3}')
    assert await store.get_result(key) is None

    await store.put_result(key, '"a cat"', T0)

    assert await store.get_result(key) == '"a cat"'
    assert await store.get_result(ResultKey(sha(b"dog"), "caption", "blip2", '{"beams":3}')) is None
    assert await store.get_result(ResultKey(sha(b"cat"), "ocr", "blip2", '{"beams":3}')) is None
    assert await store.get_result(ResultKey(sha(b"cat"), "caption", "blip", '{"beams":3}')) is None
    assert await store.get_result(ResultKey(sha(b"cat"), "caption", "blip2", '{"beams":1}')) is None


async def test_putting_a_result_again_replaces_it(store: Store) -> None:
    await store.put_image(b"cat", ALICE, T0)
    key = ResultKey(sha(b"cat"), "caption", "blip2", "{}")
    await store.put_result(key, '"a cat"', T0)
    await store.put_result(key, '"a grey cat"', T0 + timedelta(seconds=1))
    assert await store.get_result(key) == '"a grey cat"'


async def test_results_and_answers_of_an_image_no_longer_kept_are_dropped(
    store: Store,
) -> None:
    """Computed while a forget or a prune deleted the image: kept, they would belong to
    nothing that could ever delete them."""
    key = ResultKey(sha(b"gone"), "caption", "blip2", "{}")
    await store.put_result(key, '"a cat"', T0)
    assert await store.get_result(key) is None
    await store.put_answer(AnswerRecord("late", CHAT, ALICE, "ask", sha(b"gone"), "{}", T0))
    assert await store.get_answer("late") is None


# -- chat context ----------------------------------------------------------------------
async def test_chat_context_remembers_the_last_image_and_each_message(store: Store) -> None:
    assert await store.last_image(CHAT) is None
    assert await store.images_of_message(CHAT, "10") == {}

    await store.remember_image(CHAT, "10", 0, sha(b"cat"), ALICE, T0)
    await store.remember_image(CHAT, "11", 0, sha(b"dog"), BOB, T0 + timedelta(seconds=1))
    await store.remember_image(OTHER_CHAT, "10", 0, sha(b"owl"), ALICE, T0)

    assert await store.last_image(CHAT) == sha(b"dog")
    assert await store.images_of_message(CHAT, "10") == {0: sha(b"cat")}
    assert await store.last_image(OTHER_CHAT) == sha(b"owl")
    assert await store.images_of_message(OTHER_CHAT, "10") == {0: sha(b"owl")}
    # The same chat id on another platform is another chat.
    assert await store.last_image(CHAT_ON_DISCORD) is None
    assert await store.images_of_message(CHAT_ON_DISCORD, "10") == {}


async def test_a_message_carries_its_images_in_order(store: Store) -> None:
    """A Discord message with four attachments: each is addressable by its position."""
    for position, data in ((2, b"c"), (0, b"a"), (1, b"b")):
        await store.remember_image(CHAT, "album", position, sha(data), ALICE, T0)
    assert await store.images_of_message(CHAT, "album") == {
        0: sha(b"a"),
        1: sha(b"b"),
        2: sha(b"c"),
    }
    # Written in one instant, the newest row is the one recorded last.
    assert await store.last_image(CHAT) == sha(b"b")


async def test_the_last_image_is_the_newest_row_even_when_an_old_message_is_updated(
    store: Store,
) -> None:
    await store.remember_image(CHAT, "1", 0, sha(b"cat"), ALICE, T0)
    await store.remember_image(CHAT, "2", 0, sha(b"dog"), ALICE, T0 + timedelta(seconds=5))
    assert await store.last_image(CHAT) == sha(b"dog")
    await store.remember_image(CHAT, "1", 0, sha(b"owl"), ALICE, T0 + timedelta(seconds=9))
    assert await store.images_of_message(CHAT, "1") == {0: sha(b"owl")}
    assert await store.last_image(CHAT) == sha(b"owl")


async def test_the_bots_message_names_the_answer_it_showed(store: Store) -> None:
    await store.remember_image(CHAT, "user-msg", 0, sha(b"cat"), ALICE, T0)
    await store.remember_image(CHAT, "bot-msg", 0, sha(b"cat"), ALICE, T0, answer="h1")
    assert await store.answer_of_message(CHAT, "bot-msg") == "h1"
    assert await store.answer_of_message(CHAT, "user-msg") is None
    assert await store.answer_of_message(CHAT, "unknown") is None
    assert await store.answer_of_message(OTHER_CHAT, "bot-msg") is None


# -- answers ---------------------------------------------------------------------------
async def test_an_answer_is_found_by_its_handle(store: Store) -> None:
    await store.put_image(b"cat", ALICE, T0)
    answer = AnswerRecord("Ab3dE9xQ2k", CHAT, ALICE, "describe", sha(b"cat"), '{"a":1}', T0)
    assert await store.get_answer("Ab3dE9xQ2k") is None
    await store.put_answer(answer)
    assert await store.get_answer("Ab3dE9xQ2k") == answer
    # A reroll replaces what the answer shows; who asked, where and about what stay.
    await store.put_answer(
        AnswerRecord("Ab3dE9xQ2k", OTHER_CHAT, BOB, "ask", None, '{"a":2}', T0 + timedelta(1))
    )
    assert await store.get_answer("Ab3dE9xQ2k") == AnswerRecord(
        "Ab3dE9xQ2k", CHAT, ALICE, "describe", sha(b"cat"), '{"a":2}', T0
    )
    text_only = AnswerRecord("txt2imgAAAA", CHAT, BOB, "reimagine", None, "{}", T0)
    await store.put_answer(text_only)
    assert await store.get_answer("txt2imgAAAA") == text_only


# -- job journal -----------------------------------------------------------------------
async def test_an_event_is_journalled_once(store: Store) -> None:
    assert await store.begin_job(job("telegram:update:1", T0)) is True
    assert await store.begin_job(job("telegram:update:1", T0, payload='{"other":1}')) is False
    assert await store.unfinished_jobs() == [job("telegram:update:1", T0)]

    await store.finish_job("telegram:update:1", T0 + timedelta(seconds=2))

    assert await store.unfinished_jobs() == []
    assert await store.begin_job(job("telegram:update:1", T0)) is False


async def test_an_unfinished_jobs_payload_can_be_updated(store: Store) -> None:
    await store.begin_job(job("e1", T0))
    await store.update_job("e1", '{"images": ["abc"]}')
    assert await store.unfinished_jobs() == [job("e1", T0, payload='{"images": ["abc"]}')]
    await store.finish_job("e1", T0)
    await store.update_job("e1", "{}")  # finished: left as it was answered
    await store.update_job("never-begun", "{}")
    assert await store.unfinished_jobs() == []


async def test_unfinished_jobs_come_oldest_first(store: Store) -> None:
    later = Job("discord:interaction:9", OTHER_CHAT, BOB, "ask", '{"q":"why"}', T0 + timedelta(1))
    for each in (later, job("a", T0), job("tie-1", T0 + timedelta(seconds=1))):
        assert await store.begin_job(each)
    assert await store.begin_job(job("tie-2", T0 + timedelta(seconds=1)))
    assert await store.begin_job(job("done", T0 - timedelta(1)))

    await store.finish_job("done", T0)
    await store.finish_job("never-begun", T0)  # nothing to finish: not an error

    assert await store.unfinished_jobs() == [
        job("a", T0),
        job("tie-1", T0 + timedelta(seconds=1)),
        job("tie-2", T0 + timedelta(seconds=1)),
        later,
    ]


# -- feedback, usage, settings ---------------------------------------------------------
async def test_a_users_later_rating_replaces_theirs(store: Store) -> None:
    cat = sha(b"cat")
    await store.rate(Rating(ALICE, cat, "caption", 1, T0))
    await store.rate(Rating(BOB, cat, "caption", 1, T0 + timedelta(seconds=1)))
    await store.rate(Rating(ALICE, cat, "ocr", 1, T0))
    await store.rate(Rating(ALICE, cat, "caption", -1, T0 + timedelta(seconds=2), "handle"))

    ratings = getattr(store, "ratings")  # noqa: B009 (beyond the Store protocol)
    assert await ratings(cat, "caption") == [
        Rating(BOB, cat, "caption", 1, T0 + timedelta(seconds=1)),
        Rating(ALICE, cat, "caption", -1, T0 + timedelta(seconds=2), "handle"),
    ]
    assert await ratings(cat, "ocr") == [Rating(ALICE, cat, "ocr", 1, T0)]


async def test_usage_counts_per_user_task_and_day_up_to_the_limit(store: Store) -> None:
    today, tomorrow = date(2025, 3, 1), date(2025, 3, 2)
    assert await store.usage(ALICE, "caption", today) == 0

    assert [await store.take_usage(ALICE, "caption", today, 3) for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    assert await store.usage(ALICE, "caption", today) == 3  # the refused use is not counted
    assert await store.take_usage(ALICE, "ask", today, 3)
    assert await store.take_usage(ALICE, "caption", tomorrow, 3)
    assert await store.take_usage(BOB, "caption", today, 3)
    assert await store.take_usage(ALICE_ON_DISCORD, "caption", today, 3)
    # 0 means no limit: everything is counted, nothing refused.
    assert all([await store.take_usage(BOB, "write", today, 0) for _ in range(5)])

    assert await store.usage(ALICE, "ask", today) == 1
    assert await store.usage(BOB, "ask", today) == 0
    assert await store.usage(BOB, "write", today) == 5
    with pytest.raises(ValueError, match="negative"):
        await store.take_usage(BOB, "write", today, -1)


async def test_chat_settings_round_trip(store: Store) -> None:
    assert await store.get_chat_settings(CHAT) is None
    await store.put_chat_settings(CHAT, '{"language":"de"}')
    await store.put_chat_settings(CHAT, '{"language":"fr"}')
    assert await store.get_chat_settings(CHAT) == '{"language":"fr"}'
    assert await store.get_chat_settings(CHAT_ON_DISCORD) is None


# -- privacy and retention -------------------------------------------------------------
async def test_forget_user_deletes_what_only_they_sent(store: Store) -> None:
    mine, shared, bobs = b"alice's cat", b"a meme", b"bob's dog"
    await store.put_image(mine, ALICE, T0)
    await store.put_image(shared, ALICE, T0)
    await store.put_image(shared, BOB, T0)
    await store.put_image(bobs, BOB, T0)
    for data in (mine, shared, bobs):
        for task in ("caption", "ocr"):
            await store.put_result(ResultKey(sha(data), task, "m", "{}"), '"x"', T0)
    await store.remember_image(CHAT, "1", 0, sha(mine), ALICE, T0)
    await store.remember_image(CHAT, "2", 0, sha(shared), BOB, T0)
    await store.remember_image(CHAT, "3", 0, sha(mine), ALICE, T0 + timedelta(seconds=1))
    await store.remember_image(OTHER_CHAT, "1", 0, sha(bobs), BOB, T0)
    await store.rate(Rating(ALICE, sha(shared), "caption", 1, T0))
    await store.rate(Rating(BOB, sha(shared), "caption", -1, T0))
    await store.take_usage(ALICE, "caption", T0.date(), 0)
    await store.put_chat_settings(CHAT, "{}")
    await store.put_answer(AnswerRecord("bobs-answer", CHAT, BOB, "ask", sha(shared), "{}", T0))

    forgotten = await store.forget_user(ALICE)

    assert forgotten == Forgotten(images=2, deleted=1, results=2, bytes_freed=len(mine))
    assert await store.get_image(sha(mine)) is None
    assert await store.get_result(ResultKey(sha(mine), "caption", "m", "{}")) is None
    assert await store.images_of_message(CHAT, "1") == {}
    assert await store.images_of_message(CHAT, "3") == {}
    assert await getattr(store, "ratings")(sha(shared), "caption") == [  # noqa: B009
        Rating(BOB, sha(shared), "caption", -1, T0)
    ]
    # What others sent, and what is not Alice's content, stays.
    assert await store.get_image(sha(shared)) == shared
    assert await store.get_image(sha(bobs)) == bobs
    assert await store.get_result(ResultKey(sha(shared), "ocr", "m", "{}")) == '"x"'
    assert await store.get_result(ResultKey(sha(bobs), "ocr", "m", "{}")) == '"x"'
    assert await store.images_of_message(CHAT, "2") == {0: sha(shared)}
    assert await store.last_image(CHAT) == sha(shared)  # Bob's message is the chat's last now
    assert await store.last_image(OTHER_CHAT) == sha(bobs)
    assert await store.get_answer("bobs-answer") is not None
    assert await store.usage(ALICE, "caption", T0.date()) == 1  # quotas survive a /forget
    assert await store.get_chat_settings(CHAT) == "{}"
    # Forgetting is idempotent.
    assert await store.forget_user(ALICE) == Forgotten(
        images=0, deleted=0, results=0, bytes_freed=0
    )


async def test_forget_unlinks_a_user_from_an_image_someone_else_also_sent(store: Store) -> None:
    """Nothing of theirs stays reachable from their chats: not their messages, not the
    bot's answers to them, not the answers' buttons, not their journalled jobs."""
    meme = b"a meme"
    await store.put_image(meme, BOB, T0)
    await store.put_image(meme, ALICE, T0 + timedelta(seconds=1))
    await store.remember_image(OTHER_CHAT, "b1", 0, sha(meme), BOB, T0)
    await store.remember_image(CHAT, "a1", 0, sha(meme), ALICE, T0 + timedelta(seconds=1))
    await store.remember_image(CHAT, "bot-answer", 0, sha(meme), ALICE, T0 + timedelta(2))
    await store.put_answer(AnswerRecord("alices", CHAT, ALICE, "describe", sha(meme), "{}", T0))
    await store.begin_job(job("telegram:update:7", T0))
    await store.begin_job(job("telegram:update:6", T0, payload='{"text": "my words"}'))
    await store.finish_job("telegram:update:6", T0)

    forgotten = await store.forget_user(ALICE)

    assert forgotten == Forgotten(images=1, deleted=0, results=0, bytes_freed=0)
    assert await store.last_image(CHAT) is None
    assert await store.images_of_message(CHAT, "a1") == {}
    assert await store.images_of_message(CHAT, "bot-answer") == {}
    assert await store.get_answer("alices") is None
    assert await store.unfinished_jobs() == []
    # An answered event is still known, so a redelivery is not answered twice.
    assert not await store.begin_job(job("telegram:update:6", T0))
    # Bob's own message in his chat still shows his image.
    assert await store.get_image(sha(meme)) == meme
    assert await store.last_image(OTHER_CHAT) == sha(meme)


async def test_forgetting_records_the_user_for_good(store: Store) -> None:
    """Their rows go; the record that they asked stays, so an export can leave out what
    they do afterwards too."""
    assert await store.forgotten_users() == frozenset()
    await store.forget_user(ALICE)
    later = Rating(ALICE, sha(b"cat"), "write", 1, T0 + timedelta(1))
    await store.rate(later)

    assert await store.forgotten_users() == {ALICE}
    assert await store.ratings_of_tasks(["write"]) == [later]
    await store.forget_user(ALICE)
    await store.forget_user(BOB)
    assert await store.forgotten_users() == {ALICE, BOB}
    assert await store.ratings_of_tasks(["write"]) == []


async def test_deleting_an_image_deletes_the_answers_and_context_about_it(store: Store) -> None:
    await store.put_image(b"cat", ALICE, T0)
    await store.remember_image(CHAT, "1", 0, sha(b"cat"), BOB, T0)
    await store.put_answer(AnswerRecord("about-cat", CHAT, BOB, "ask", sha(b"cat"), "{}", T0))
    assert await store.prune(T0 + timedelta(days=10), 1, 0) == 1
    assert await store.get_answer("about-cat") is None
    assert await store.last_image(CHAT) is None


async def test_prune_deletes_images_older_than_the_age_limit(store: Store) -> None:
    for age_days, data in ((3, b"old"), (2, b"older-ish"), (1, b"new")):
        await store.put_image(data, ALICE, T0 - timedelta(days=age_days))
        await store.put_result(ResultKey(sha(data), "caption", "m", "{}"), '"x"', T0)
        chat = ChatRef("telegram", data.decode())
        await store.remember_image(chat, "1", 0, sha(data), ALICE, T0)

    assert await store.prune(T0, max_age_days=1.5, max_total_bytes=0) == 2

    assert await store.get_image(sha(b"new")) == b"new"
    for data in (b"old", b"older-ish"):
        assert await store.get_image(sha(data)) is None
        assert await store.get_result(ResultKey(sha(data), "caption", "m", "{}")) is None
        assert await store.last_image(ChatRef("telegram", data.decode())) is None
        assert await store.images_of_message(ChatRef("telegram", data.decode()), "1") == {}
    assert await store.prune(T0, max_age_days=1.5, max_total_bytes=0) == 0


async def test_prune_deletes_the_oldest_until_the_total_fits(store: Store) -> None:
    sizes = {b"a" * 100: 4, b"b" * 200: 3, b"c" * 300: 2, b"d" * 50: 1}  # data: age in days
    for data, age_days in sizes.items():
        await store.put_image(data, ALICE, T0 - timedelta(days=age_days))
        await store.put_result(ResultKey(sha(data), "caption", "m", "{}"), '"x"', T0)

    assert await store.prune(T0, max_age_days=0, max_total_bytes=0) == 0  # 0: no limit
    assert await store.prune(T0, max_age_days=0, max_total_bytes=550) == 1  # 650 -> 550
    assert await store.get_image(sha(b"a" * 100)) is None
    assert await store.get_result(ResultKey(sha(b"a" * 100), "caption", "m", "{}")) is None
    assert await store.get_image(sha(b"b" * 200)) == b"b" * 200
    # Age first (b, 3 days), then bytes: c + d = 350 > 349, so c goes too.
    assert await store.prune(T0, max_age_days=2.5, max_total_bytes=349) == 2
    assert await store.get_image(sha(b"d" * 50)) == b"d" * 50
    assert await store.get_image(sha(b"c" * 300)) is None


async def test_prune_refuses_negative_limits(store: Store) -> None:
    with pytest.raises(ValueError, match="negative"):
        await store.prune(T0, max_age_days=-1, max_total_bytes=0)


# -- exports ---------------------------------------------------------------------------
async def test_ratings_of_tasks_are_everyones_current_ones_oldest_first(store: Store) -> None:
    cat, dog = sha(b"cat"), sha(b"dog")
    await store.rate(Rating(ALICE, cat, "write", 1, T0 + timedelta(seconds=3), "h1"))
    await store.rate(Rating(BOB, dog, "describe", -1, T0 + timedelta(seconds=1), "h2"))
    await store.rate(Rating(BOB, cat, "caption", 1, T0))
    await store.rate(Rating(ALICE, cat, "write", -1, T0 + timedelta(seconds=2)))

    assert await store.ratings_of_tasks(["write", "describe"]) == [
        Rating(BOB, dog, "describe", -1, T0 + timedelta(seconds=1), "h2"),
        Rating(ALICE, cat, "write", -1, T0 + timedelta(seconds=2)),
    ]
    assert await store.ratings_of_tasks(["vqa"]) == []


async def test_answers_about_an_image_are_those_one_user_asked_for(store: Store) -> None:
    cat, dog = sha(b"cat"), sha(b"dog")
    for data in (b"cat", b"dog"):
        await store.put_image(data, ALICE, T0)
    later = AnswerRecord(
        "later", OTHER_CHAT, ALICE, "write", cat, '{"social":"b"}', T0 + timedelta(1)
    )
    first = AnswerRecord("first", CHAT, ALICE, "describe", cat, '{"social":"a"}', T0)
    for answer in (
        later,
        first,
        AnswerRecord("bobs", CHAT, BOB, "describe", cat, "{}", T0),
        AnswerRecord("dog", CHAT, ALICE, "describe", dog, "{}", T0),
    ):
        await store.put_answer(answer)

    assert await store.answers_about(cat, ALICE) == [first, later]
    assert await store.answers_about(cat, ALICE_ON_DISCORD) == []


async def test_results_of_an_image_are_found_whatever_their_model_and_parameters(
    store: Store,
) -> None:
    await store.put_image(b"cat", ALICE, T0)
    await store.put_image(b"dog", ALICE, T0)
    mine = {
        ResultKey(sha(b"cat"), "write", "llama", '{"style":""}'): '"one"',
        ResultKey(sha(b"cat"), "write", "qwen", '{"style":"dry"}'): '"two"',
    }
    for key, value in mine.items():
        await store.put_result(key, value, T0)
    await store.put_result(ResultKey(sha(b"cat"), "caption", "llama", "{}"), '"no"', T0)
    await store.put_result(ResultKey(sha(b"dog"), "write", "llama", "{}"), '"no"', T0)

    assert await store.results_of(sha(b"cat"), "write") == mine
    assert await store.results_of(sha(b"owl"), "write") == {}


# -- SQLite only -----------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="function")
async def sqlite(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore.open(tmp_path / "bot.db", tmp_path / "images") as opened:
        yield opened


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def query(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db_path) as db:
        return db.execute(sql).fetchall()


async def test_the_database_is_in_wal_mode_at_the_latest_version(
    sqlite: SqliteStore, tmp_path: Path
) -> None:
    assert query(tmp_path / "bot.db", "PRAGMA journal_mode") == [("wal",)]
    assert query(tmp_path / "bot.db", "PRAGMA user_version") == [(len(migrations.MIGRATIONS),)]


async def test_an_image_is_one_file_named_by_its_digest_with_a_row_per_owner(
    sqlite: SqliteStore, tmp_path: Path
) -> None:
    await sqlite.put_image(b"cat", ALICE, T0)
    await sqlite.put_image(b"cat", BOB, T0)

    digest = sha(b"cat")
    assert files_under(tmp_path / "images") == [tmp_path / "images" / digest[:2] / digest[2:]]
    assert query(tmp_path / "bot.db", "SELECT platform, user_id FROM image_owners") == [
        ("telegram", "1"),
        ("telegram", "2"),
    ]
    await sqlite.forget_user(ALICE)
    await sqlite.forget_user(BOB)
    assert files_under(tmp_path / "images") == []
    assert query(tmp_path / "bot.db", "SELECT count(*) FROM image_owners") == [(0,)]


async def test_everything_survives_a_restart(tmp_path: Path) -> None:
    db, images = tmp_path / "bot.db", tmp_path / "images"
    key = ResultKey(sha(b"cat"), "caption", "m", "{}")
    async with SqliteStore.open(db, images) as before:
        await before.put_image(b"cat", ALICE, T0)
        await before.put_result(key, '"a cat"', T0)
        await before.remember_image(CHAT, "7", 0, sha(b"cat"), ALICE, T0)
        await before.put_answer(AnswerRecord("h", CHAT, ALICE, "ask", sha(b"cat"), "{}", T0))
        await before.begin_job(job("e1", T0))
        await before.begin_job(job("e2", T0))
        await before.finish_job("e2", T0)
        await before.rate(Rating(ALICE, sha(b"cat"), "caption", 1, T0))
        await before.take_usage(ALICE, "caption", T0.date(), 2)
        await before.put_chat_settings(CHAT, '{"a":1}')
        await before.forget_user(BOB)

    store = await SqliteStore.open(db, images)
    try:
        assert await store.get_image(sha(b"cat")) == b"cat"
        assert await store.get_result(key) == '"a cat"'
        assert await store.images_of_message(CHAT, "7") == {0: sha(b"cat")}
        assert await store.get_answer("h") == AnswerRecord(
            "h", CHAT, ALICE, "ask", sha(b"cat"), "{}", T0
        )
        assert await store.last_image(CHAT) == sha(b"cat")
        assert await store.unfinished_jobs() == [job("e1", T0)]
        assert await store.begin_job(job("e2", T0)) is False
        assert await store.ratings(sha(b"cat"), "caption") == [
            Rating(ALICE, sha(b"cat"), "caption", 1, T0)
        ]
        assert await store.take_usage(ALICE, "caption", T0.date(), 2)
        assert not await store.take_usage(ALICE, "caption", T0.date(), 2)
        assert await store.get_chat_settings(CHAT) == '{"a":1}'
        assert await store.forgotten_users() == {BOB}
    finally:
        await store.close()


async def test_reopening_runs_only_the_migrations_not_yet_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, images = tmp_path / "bot.db", tmp_path / "images"
    async with SqliteStore.open(db, images) as store:
        await store.put_chat_settings(CHAT, "{}")
    monkeypatch.setattr(
        migrations,
        "MIGRATIONS",
        (
            *migrations.MIGRATIONS,
            ("CREATE TABLE runs (n INTEGER)", "INSERT INTO runs VALUES (1)"),
        ),
    )

    for _ in range(2):
        async with SqliteStore.open(db, images) as store:
            assert await store.get_chat_settings(CHAT) == "{}"

    assert query(db, "PRAGMA user_version") == [(len(migrations.MIGRATIONS),)]
    assert query(db, "SELECT n FROM runs") == [(1,)]


async def test_a_failed_migration_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "bot.db"
    known = len(migrations.MIGRATIONS)
    broken = ("CREATE TABLE half (n INTEGER)", "INSERT INTO no_such_table VALUES (1)")
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, broken))

    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        await SqliteStore.open(db, tmp_path / "images")

    assert query(db, "PRAGMA user_version") == [(known,)]
    assert query(db, "SELECT name FROM sqlite_master WHERE name = 'half'") == []


async def test_a_database_from_a_newer_captionbot_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "bot.db"
    newer = len(migrations.MIGRATIONS) + 1
    with sqlite3.connect(db) as raw:
        raw.execute(f"PRAGMA user_version = {newer}")

    with pytest.raises(ConfigError) as refused:
        await SqliteStore.open(db, tmp_path / "images")

    assert f"version {newer}" in str(refused.value)
    assert f"up to {len(migrations.MIGRATIONS)}" in str(refused.value)
    assert query(db, "PRAGMA user_version") == [(newer,)]


async def test_two_connections_never_count_past_the_limit(tmp_path: Path) -> None:
    db, images = tmp_path / "bot.db", tmp_path / "images"
    day = T0.date()
    async with SqliteStore.open(db, images) as one, SqliteStore.open(db, images) as two:
        taken = await asyncio.gather(
            *(
                store.take_usage(ALICE, "caption", day, 100)
                for _ in range(60)
                for store in (one, two)
            )
        )
        assert taken.count(True) == 100
        assert await one.usage(ALICE, "caption", day) == 100


async def test_upgrading_a_version_1_database_keeps_its_chat_context(tmp_path: Path) -> None:
    """Rows written before images had positions and senders still resolve, attributed to
    the image's first sender, so forget still reaches them."""
    db = tmp_path / "bot.db"
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA foreign_keys = ON")
        for statement in migrations.MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        stamp = "2025-03-01T12:00:00.000000+00:00"
        raw.execute("INSERT INTO images VALUES (?, 3, ?)", (sha(b"cat"), stamp))
        raw.execute("INSERT INTO image_owners VALUES (?, 'telegram', '1', ?)", (sha(b"cat"), stamp))
        raw.execute(
            "INSERT INTO message_images VALUES ('telegram', '-100', '7', ?, ?)",
            (sha(b"cat"), stamp),
        )
        raw.execute("INSERT INTO chat_last_image VALUES ('web', 'w1', ?, ?)", (sha(b"cat"), stamp))
    async with SqliteStore.open(db, tmp_path / "images") as store:
        assert await store.images_of_message(CHAT, "7") == {0: sha(b"cat")}
        assert await store.last_image(ChatRef("web", "w1")) == sha(b"cat")
        await store.forget_user(ALICE)
        assert await store.last_image(CHAT) is None
        assert await store.last_image(ChatRef("web", "w1")) is None


async def test_a_cancelled_write_leaves_the_store_usable(sqlite: SqliteStore) -> None:
    day = T0.date()
    writes = [asyncio.create_task(sqlite.take_usage(ALICE, "caption", day, 0)) for _ in range(20)]
    await asyncio.sleep(0)
    for write in writes[::2]:
        write.cancel()
    await asyncio.gather(*writes, return_exceptions=True)

    counted = await sqlite.usage(ALICE, "caption", day)
    assert 10 <= counted <= 20
    assert await sqlite.take_usage(ALICE, "caption", day, 0)
    assert await sqlite.usage(ALICE, "caption", day) == counted + 1


async def test_a_failed_image_write_leaves_no_file_and_no_row(
    sqlite: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        await sqlite.put_image(b"cat", ALICE, T0)

    assert files_under(tmp_path / "images") == []
    assert query(tmp_path / "bot.db", "SELECT count(*) FROM images") == [(0,)]
    assert await sqlite.get_image(sha(b"cat")) is None

    monkeypatch.undo()
    await sqlite.put_image(b"cat", ALICE, T0)
    assert await sqlite.get_image(sha(b"cat")) == b"cat"


async def test_a_pruned_image_leaves_no_file_and_no_rows(
    sqlite: SqliteStore, tmp_path: Path
) -> None:
    await sqlite.put_image(b"cat", ALICE, T0 - timedelta(days=2))
    await sqlite.put_image(b"cat", BOB, T0)

    assert await sqlite.prune(T0, max_age_days=1, max_total_bytes=0) == 1

    assert files_under(tmp_path / "images") == []
    for table in ("images", "image_owners"):
        assert query(tmp_path / "bot.db", f"SELECT count(*) FROM {table}") == [(0,)]


async def test_a_missing_position_stays_missing(store: Store) -> None:
    """Image 1 of a message was refused: image 2 keeps its place and is not renumbered."""
    await store.remember_image(CHAT, "album", 0, sha(b"a"), ALICE, T0)
    await store.remember_image(CHAT, "album", 2, sha(b"c"), ALICE, T0)
    assert await store.images_of_message(CHAT, "album") == {0: sha(b"a"), 2: sha(b"c")}
