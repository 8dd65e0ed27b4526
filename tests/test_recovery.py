"""Restart recovery: a journalled event is answered exactly once, even across a kill, from
the image it had stored before the process died."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from adapters.sqlite import SqliteStore
from core.engine import Engine
from core.errors import DuplicateEvent
from core.ports import ChatRef, UserRef
from core.service import JournalEntry, Service
from core.settings import EngineSettings, ServiceSettings
from core.types import Origin
from tests import imagekit

ROOT = Path(__file__).resolve().parents[1]
ORIGIN = Origin(UserRef("test", "u1"), ChatRef("test", "c1"), message_id="m1", author="@u1")

# A bot process that journals an event, stores its image as the work would, and is killed
# (SIGKILL-like os._exit) before it could answer. It imports no model library, so it
# starts quickly.
CRASHING_BOT = textwrap.dedent(
    """
    import asyncio, os, sys
    from datetime import UTC, datetime
    from adapters.sqlite import SqliteStore
    from core.engine import Engine
    from core.ports import ChatRef, UserRef
    from core.service import Service
    from core.settings import EngineSettings, ServiceSettings
    from core.types import Origin

    async def main(database, images, photo):
        store = await SqliteStore.open(database, images)
        service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
        origin = Origin(UserRef("test", "u1"), ChatRef("test", "c1"), message_id="m1",
                        author="@u1")
        entry = await service.journal("test:update:42", origin, "describe",
                                      {"command": "describe"})
        data = open(photo, "rb").read()
        stored = await store.put_image(data, origin.user, datetime.now(UTC))
        await entry.keep_image(stored.sha256)
        print(stored.sha256, flush=True)
        os._exit(9)  # killed mid-work: no answer, no clean shutdown

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
    """
)


async def test_a_killed_job_is_answered_once_after_a_restart(tmp_path: Path) -> None:
    database, images = tmp_path / "bot.sqlite3", tmp_path / "images"
    photo = tmp_path / "photo.png"
    photo.write_bytes(imagekit.encode(imagekit.noise()))
    crashed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_BOT,
        str(database),
        str(images),
        str(photo),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(crashed.communicate(), 120)
    assert crashed.returncode == 9, stderr.decode()
    sha = stdout.decode().strip()

    answered: list[JournalEntry] = []

    async def answer(entry: JournalEntry) -> None:
        answered.append(entry)

    for _restart in range(2):
        async with SqliteStore.open(database, images) as store:
            service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
            # The platform redelivers the same update after the restart: not answered again.
            with pytest.raises(DuplicateEvent):
                await service.journal("test:update:42", ORIGIN, "describe", {})
            await service.recover("test", answer)
            if answered:
                # Its image is still kept, so the answer needs no second download.
                assert await store.get_image(answered[0].images[0]) == photo.read_bytes()
    [entry] = answered
    assert (entry.event_id, entry.kind, entry.images) == ("test:update:42", "describe", [sha])
    assert entry.origin == ORIGIN
    assert entry.request == {"command": "describe"}
    assert entry.recovered


async def test_recovery_is_per_platform_and_survives_a_failing_answer(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "bot.sqlite3", tmp_path / "images") as store:
        service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
        for event, platform in (("t:1", "telegram"), ("d:1", "discord"), ("t:2", "telegram")):
            origin = Origin(UserRef(platform, "u"), ChatRef(platform, "c"))
            await service.journal(event, origin, "ask", {"question": "why?"})

        async def poisoned(entry: JournalEntry) -> None:
            raise RuntimeError("the chat was deleted")

        assert await service.recover("telegram", poisoned) == 2
        assert await service.recover("telegram", poisoned) == 0  # closed, never retried
        assert [job.event_id for job in await store.unfinished_jobs()] == ["d:1"]


async def test_an_answered_event_is_not_recovered(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "bot.sqlite3", tmp_path / "images") as store:
        service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
        entry = await service.journal("t:9", ORIGIN, "describe", {})
        await entry.answered()

        async def never(entry: JournalEntry) -> None:
            raise AssertionError("answered twice")

        assert await service.recover("test", never) == 0


async def test_an_event_cut_by_shutdown_stays_for_the_next_start(tmp_path: Path) -> None:
    """Recovery that meets a stopping bot is not the event's fault: it is not closed."""
    from core.errors import ShuttingDown

    async with SqliteStore.open(tmp_path / "bot.sqlite3", tmp_path / "images") as store:
        service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
        await service.journal("t:1", ORIGIN, "describe", {})

        async def stopping(entry: JournalEntry) -> None:
            raise ShuttingDown()

        with pytest.raises(ShuttingDown):
            await service.recover("test", stopping)
        assert [job.event_id for job in await store.unfinished_jobs()] == ["t:1"]


async def test_a_payload_from_another_version_is_still_answered(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "bot.sqlite3", tmp_path / "images") as store:
        service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
        await service.journal("t:1", ORIGIN, "describe", {})
        [job] = await store.unfinished_jobs()
        renamed = job.payload.replace('"author"', '"signature"')  # a field this one lacks
        await store.update_job("t:1", renamed)
        answered: list[Origin] = []

        async def answer(entry: JournalEntry) -> None:
            answered.append(entry.origin)

        assert await service.recover("test", answer) == 1
        assert answered[0].message_id == ORIGIN.message_id and answered[0].author == ""
