"""``python -m bot bench describe``: many people post a photo at the same moment.

Each one asks for the whole description (caption, text in the image, hashtags, social
caption) through the service, waiting in line for room as chat answers do, on the tiny
profile in this process. What a user waits for first is the first part: the caption,
which tells them the bot is at work. The run is made twice, side by side: with the CPU
lanes the engine uses on a CPU (long forwards on a thread of their own) and with one
device thread, as on a GPU, so the figures show what the lanes change on this machine.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapters.sqlite import SqliteStore
from bot.bench import Timing, picture, waits
from bot.config import load_settings
from bot.wiring import build_tasks, pin_threads
from core.engine import Engine
from core.executor import DeviceThread, Executor
from core.ports import ChatRef, UserRef
from core.service import Service
from core.settings import Settings
from core.types import Origin, Upload, Waiting, WarmingUp


def bench_describe(users: int, cache_dir: Path) -> dict[str, Any]:
    return asyncio.run(_bench(users, cache_dir))


async def _bench(users: int, cache_dir: Path) -> dict[str, Any]:
    settings = load_settings(None, "tiny")
    engine = replace(settings.engine, device="cpu", model_cache=cache_dir)
    settings = replace(settings, engine=engine)
    lanes = await _run(settings, users, None)
    one_thread = DeviceThread(pin_threads=pin_threads)
    one_thread.start()
    single = await _run(settings, users, one_thread)
    return {
        "users": users,
        "profile": settings.profile.name,
        "max_in_flight": settings.engine.max_in_flight,
        **{key: lanes[key] for key in ("answered", "first_part", "full_answer")},
        "one_device_thread": {key: single[key] for key in ("first_part", "full_answer")},
    }


async def _run(settings: Settings, users: int, executor: Executor | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="captionbot-bench-") as folder:
        async with (
            SqliteStore.open(Path(folder) / "bot.sqlite3", Path(folder) / "images") as store,
            Engine(
                build_tasks(settings),
                settings.engine,
                executor=executor,
                pin_threads=pin_threads,
            ) as engine,
        ):
            for task in engine.task_names:
                await engine.ensure_loaded(task)
            service = Service(engine, store, settings.service)
            try:
                await _describe(service, 0)  # the first forwards pay one-off costs
                timings = await asyncio.gather(
                    *(_describe(service, number) for number in range(1, users + 1))
                )
            finally:
                await service.shutdown(10.0)
    summary = waits(timings, users)
    summary.pop("first_message")
    return summary


async def _describe(service: Service, number: int) -> Timing:
    origin = Origin(UserRef("bench", f"user{number}"), ChatRef("bench", f"chat{number}"))
    posted = time.monotonic()
    first_part: float | None = None
    reply = service.describe(origin, Upload(picture(number), f"photo{number}.png"))
    async with reply.waiting_in_line():
        async for part in reply:
            if first_part is None and not isinstance(part, Waiting | WarmingUp):
                first_part = time.monotonic() - posted
    return Timing(None, first_part, time.monotonic() - posted)
