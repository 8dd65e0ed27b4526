"""``python -m bot bench discord``: many members of a server post an image at the same moment.

Discord is simulated by ``simcord`` (a test dependency: ``pip install -e .[test]``), which
runs discord.py's own gateway parsers, cache and HTTP routes in this process, so the bot
under test is the real ``DiscordAdapter`` on the real chat layer, service, SQLite store and
engine (tiny profile). The members post, each mentioning the bot, all before any answer;
this process then watches the channels as a member would and notes when each answer
appeared, showed its first part, and got its buttons. One warm-up image is answered first,
so that the figures are the bot's steady state rather than its first model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.discord import DiscordAdapter
from adapters.sqlite import SqliteStore
from bot.bench import STATUS_PREFIXES, picture, waits
from bot.config import load_settings
from bot.wiring import build_tasks, pin_threads
from core.chat.live import Outbox
from core.engine import Engine
from core.service import Service
from core.settings import DiscordSettings

# Generous bounds for a busy 2-core machine; the figures, not these, are the result.
ANSWER_TIMEOUT_S = 900.0
_POLL_S = 0.1


async def wall_clock_sleep(seconds: float) -> None:
    """``asyncio.sleep`` on a thread's timer, outside simcord's virtual clock.

    simcord fires a bot's timers by moving its clock, and moves it only once every other
    task of the bot is parked; a send queued in the Outbox behind one sleeping out the
    pace is not, so the two would wait on each other until simcord's settle timeout."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    timer = threading.Timer(seconds, loop.call_soon_threadsafe, (wake,))
    timer.start()
    try:
        await woken
    finally:
        timer.cancel()


def simulated_adapter(service: Service, settings: DiscordSettings) -> DiscordAdapter:
    """A ``DiscordAdapter`` whose pace between messages is kept on the wall clock, as it
    must be under simcord (see ``wall_clock_sleep``); everything else as in production."""
    adapter = DiscordAdapter(service, settings)
    adapter.chatbot.outbox = Outbox(adapter.platform, sleep=wall_clock_sleep)
    return adapter


@dataclass
class Watched:
    """One member's post and what they saw of its answer, in seconds from posting."""

    channel: Any
    message_id: int
    first_message_s: float | None = None
    first_part_s: float | None = None
    full_answer_s: float | None = None


def bench_discord(users: int, channels: int, cache_dir: Path) -> dict[str, Any]:
    return asyncio.run(_bench(users, channels, cache_dir))


async def _bench(users: int, channels: int, cache_dir: Path) -> dict[str, Any]:
    try:
        import simcord
    except ImportError as missing:
        raise SystemExit(
            "bench discord needs simcord, a test dependency: pip install -e '.[test]'"
        ) from missing
    settings = load_settings(None, "tiny")
    settings = type(settings)(
        engine=type(settings.engine)(device="cpu", model_cache=cache_dir),
        profile=settings.profile,
    )
    with tempfile.TemporaryDirectory(prefix="captionbot-bench-") as folder:
        async with (
            SqliteStore.open(Path(folder) / "bot.sqlite3", Path(folder) / "images") as store,
            Engine(build_tasks(settings), settings.engine, pin_threads=pin_threads) as engine,
        ):
            # Loaded before the simulated Discord starts: simcord cancels, when it ends,
            # every task started inside it, and counts them as the bot's work meanwhile.
            for task in engine.task_names:
                await engine.ensure_loaded(task)
            service = Service(engine, store, settings.service)
            adapter = simulated_adapter(service, DiscordSettings())
            try:
                async with simcord.run(
                    adapter.client, settle_timeout=ANSWER_TIMEOUT_S, check_errors=False
                ) as env:
                    result = await _run(env, adapter, users, channels)
                    result["bot_errors"] = [repr(error) for error in env.errors][:5]
            finally:
                await service.shutdown(10.0)
    return result


async def _run(env: Any, adapter: DiscordAdapter, users: int, channels: int) -> dict[str, Any]:
    guild = env.create_guild("Bench club")
    rooms = [guild.create_text_channel(f"photos-{n}") for n in range(channels)]
    members = [guild.add_member(env.create_user(f"member{n}")) for n in range(users + 1)]
    me = adapter.client.user
    assert me is not None
    mention = f"<@{me.id}>"

    warm = _post(env, rooms[0], members[0], mention, 0)
    await _watch([warm], time.monotonic(), ANSWER_TIMEOUT_S)

    posted_at = time.monotonic()
    posts = [
        _post(env, rooms[n % channels], member, mention, n + 1)
        for n, member in enumerate(members[1:])
    ]
    await _watch(posts, posted_at, ANSWER_TIMEOUT_S)
    return _report(users, channels, posts)


def _post(env: Any, channel: Any, member: Any, content: str, seed: int) -> Watched:
    """Post as the member, without waiting for the bot: simcord's own ``send`` returns only
    once the bot has settled, which would make the posts one after another."""
    backend = env.backend
    attachments = backend.store_attachments(channel.id, [(f"photo{seed}.png", picture(seed))])
    message = backend.create_message(channel.id, member.id, content, attachments=attachments)
    return Watched(channel, message.id)


async def _watch(posts: list[Watched], posted_at: float, timeout_s: float) -> None:
    """Look at the channels as the members would, until every answer is finished."""
    with contextlib.suppress(TimeoutError):  # what never came is reported as unanswered
        async with asyncio.timeout(timeout_s):
            while any(post.full_answer_s is None for post in posts):
                now = time.monotonic() - posted_at
                by_channel = {id(p.channel): p.channel.history() for p in posts}
                for post in posts:
                    _note(post, by_channel[id(post.channel)], now)
                await asyncio.sleep(_POLL_S)


def _note(post: Watched, history: list[Any], now: float) -> None:
    replies = [
        m for m in history if m.reference is not None and m.reference.message_id == post.message_id
    ]
    if not replies:
        return
    if post.first_message_s is None:
        post.first_message_s = now
    if post.first_part_s is None and any(
        m.content and not m.content.startswith(STATUS_PREFIXES) for m in replies
    ):
        post.first_part_s = now
    if post.full_answer_s is None and any(m.components for m in replies):
        post.full_answer_s = now


def _report(users: int, channels: int, posts: list[Watched]) -> dict[str, Any]:
    return {
        "users": users,
        "channels": channels,
        **waits(posts, users),
        # Seen by polling every 0.1 s: the figures are that much coarser.
        "poll_interval_s": _POLL_S,
        "profile": "tiny",
        "warm": True,
    }
