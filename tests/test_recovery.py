"""Restart recovery: a journalled event is answered exactly once, even across a kill."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

from adapters.sqlite import SqliteStore
from core.engine import Engine
from core.ports import ChatRef, Job, UserRef
from core.service import Service
from core.settings import EngineSettings, ServiceSettings

ROOT = Path(__file__).resolve().parents[1]

# A bot process that journals an event, starts "working" on it and is killed (SIGKILL-like
# os._exit) before it could answer. It imports no model library, so it starts quickly.
CRASHING_BOT = textwrap.dedent(
    """
    import asyncio, os, sys
    from datetime import UTC, datetime
    from adapters.sqlite import SqliteStore
    from core.engine import Engine
    from core.ports import ChatRef, Job, UserRef
    from core.service import Service
    from core.settings import EngineSettings, ServiceSettings

    async def main(database, images):
        store = await SqliteStore.open(database, images)
        service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
        job = Job("test:update:42", ChatRef("test", "c1"), UserRef("test", "u1"),
                  "describe", '{"message_id": "m1"}', datetime.now(UTC))
        assert await service.accept(job)
        print("journalled", flush=True)
        os._exit(9)  # killed mid-work: no answer, no clean shutdown

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_a_killed_job_is_answered_once_after_a_restart(tmp_path: Path) -> None:
    database, images = tmp_path / "bot.sqlite3", tmp_path / "images"
    crashed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_BOT,
        str(database),
        str(images),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(crashed.communicate(), 120)
    assert crashed.returncode == 9, stderr.decode()
    assert b"journalled" in stdout

    answered: list[str] = []

    async def answer(job: Job) -> None:
        answered.append(job.event_id)

    for _restart in range(2):
        async with SqliteStore.open(database, images) as store:
            service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
            # The platform redelivers the same update after the restart: not answered again.
            redelivered = Job(
                "test:update:42",
                ChatRef("test", "c1"),
                UserRef("test", "u1"),
                "describe",
                "{}",
                datetime.now(UTC),
            )
            assert not await service.accept(redelivered)
            await service.recover("test", answer)
    assert answered == ["test:update:42"]


async def test_recovery_is_per_platform_and_survives_a_failing_answer(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "bot.sqlite3", tmp_path / "images") as store:
        service = Service(Engine({}, EngineSettings()), store, ServiceSettings())
        now = datetime.now(UTC)
        for event, platform in (("t:1", "telegram"), ("d:1", "discord"), ("t:2", "telegram")):
            job = Job(event, ChatRef(platform, "c"), UserRef(platform, "u"), "ask", "{}", now)
            assert await service.accept(job)

        async def poisoned(job: Job) -> None:
            raise RuntimeError("the chat was deleted")

        assert await service.recover("telegram", poisoned) == 2
        assert await service.recover("telegram", poisoned) == 0  # closed, never retried
        assert [job.event_id for job in await store.unfinished_jobs()] == ["d:1"]
