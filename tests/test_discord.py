"""Discord end to end: the adapter's real discord.py client against simcord (a simulated
Discord running discord.py's own parsers, cache and views), on the tiny models."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
import pytest_asyncio
import simcord

from adapters.discord import DiscordAdapter
from adapters.discord.adapter import NO_CONTENT_INTENT, connected
from adapters.memory import MemoryStore
from bot.config import load_settings
from bot.wiring import build_tasks
from core.engine import Engine
from core.service import Service
from core.settings import DiscordSettings, ServiceSettings
from tests import imagekit

pytestmark = pytest.mark.asyncio(loop_scope="module")

ANSWER_BUTTONS = [["🎨 Reimagine", "❓ Ask", "🔁 Reroll caption"], ["👍", "👎"]]
# A model run plus paced edits (one a second) on two shared cores: generous, not tight.
SLOW = 90.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_cache: Path, single_torch_thread: None) -> AsyncIterator[Engine]:
    settings = load_settings(None, "tiny")
    settings = type(settings)(
        engine=type(settings.engine)(device="cpu", model_cache=model_cache),
        profile=settings.profile,
    )
    async with Engine(build_tasks(settings), settings.engine) as running:
        # Loaded here, outside any simulated Discord: simcord counts tasks started inside
        # one as the bot's work and cancels them when it ends, a model's load included.
        for task in running.task_names:
            await running.ensure_loaded(task)
        yield running


@dataclass
class World:
    env: simcord.Env
    adapter: DiscordAdapter
    guild: Any
    channel: Any
    member: Any


@asynccontextmanager
async def discord_world(engine: Engine, **settings: Any) -> AsyncIterator[World]:
    service = Service(engine, MemoryStore(), ServiceSettings())
    adapter = DiscordAdapter(service, DiscordSettings(**settings))
    async with simcord.run(adapter.client, settle_timeout=SLOW) as env:
        guild = env.create_guild("Photo club")
        channel = guild.create_text_channel("photos")
        member = guild.add_member(env.create_user("ann"))
        yield World(env, adapter, guild, channel, member)
    await service.shutdown(0)


def photo(seed: int = 0) -> bytes:
    return imagekit.encode(imagekit.noise(seed=seed))


def replies_to(channel: Any, message: discord.Message) -> list[discord.Message]:
    return [
        m
        for m in channel.history()
        if m.reference is not None and m.reference.message_id == message.id
    ]


def labels(message: discord.Message) -> list[list[str]]:
    return [
        [button.label or "" for button in row.children]
        for row in message.components
        if isinstance(row, discord.ActionRow)
    ]


async def until(predicate: Callable[[], Any], timeout: float = SLOW) -> Any:  # noqa: ASYNC109
    """Poll ``predicate``: simcord's world has no event to wait on, and the bot's model work
    runs in real time on its device thread."""
    async with asyncio.timeout(timeout):
        while not (result := predicate()):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    return result


def finished(channel: Any, message: discord.Message) -> discord.Message | None:
    return next((m for m in replies_to(channel, message) if m.components), None)


async def test_an_image_mentioning_the_bot_gets_an_answer_that_fills_in(engine: Engine) -> None:
    async with discord_world(engine) as world:
        me = world.adapter.client.user
        assert me is not None
        posted = await world.member.send(
            world.channel, f"<@{me.id}> what is this?", attachments=[("cat.png", photo(1))]
        )
        answer = await until(lambda: finished(world.channel, posted))
        assert "Text in the image:" in answer.content
        assert "Social caption:" in answer.content
        assert labels(answer) == ANSWER_BUTTONS
        assert len(replies_to(world.channel, posted)) == 1
        edits = [
            r for r in world.env.http_requests if r.method == "PATCH" and "/messages/" in r.path
        ]
        assert edits  # it filled in, in place


async def test_every_image_of_a_message_gets_its_answer_and_other_files_a_sentence(
    engine: Engine,
) -> None:
    async with discord_world(engine) as world:
        me = world.adapter.client.user
        assert me is not None
        files = [("a.png", photo(2)), ("notes.pdf", b"%PDF-1.4 not an image"), ("b.png", photo(3))]
        posted = await world.member.send(world.channel, f"<@{me.id}>", attachments=files)
        answers = await until(
            lambda: [m for m in replies_to(world.channel, posted) if m.components][1:] or None
        )
        said = [m.content for m in replies_to(world.channel, posted)]
        assert "That is a PDF document, not an image; send a photo or an image file." in said
        assert len(replies_to(world.channel, posted)) == 3 and len(answers) == 1


async def test_an_attachment_over_the_limit_is_refused_before_download(engine: Engine) -> None:
    async with discord_world(engine, max_download_mb=0.5) as world:
        me = world.adapter.client.user
        assert me is not None
        big = imagekit.encode(imagekit.noise((1200, 900), seed=4))
        assert len(big) > 512 * 1024
        posted = await world.member.send(
            world.channel, f"<@{me.id}>", attachments=[("big.png", big)]
        )
        [refusal] = await until(lambda: replies_to(world.channel, posted))
        assert refusal.content.startswith("That file is ")
        assert "this bot takes images up to" in refusal.content


async def test_an_image_without_a_mention_is_left_alone_unless_the_channel_asks(
    engine: Engine,
) -> None:
    async with discord_world(engine) as world:
        quiet = await world.member.send(world.channel, "", attachments=[("c.png", photo(5))])
        await asyncio.sleep(1.0)
        assert replies_to(world.channel, quiet) == []


async def test_buttons_work_on_answers_from_before_a_restart(engine: Engine) -> None:
    async with discord_world(engine) as world:
        me = world.adapter.client.user
        assert me is not None
        posted = await world.member.send(
            world.channel, f"<@{me.id}>", attachments=[("d.png", photo(6))]
        )
        answer = await until(lambda: finished(world.channel, posted))
        reborn = DiscordAdapter(world.adapter.chatbot.service, DiscordSettings())
        await world.env.restart_bot(reborn.client)
        pressed = await world.member.click(answer, label="👍")
        assert pressed.acknowledged
        await until(lambda: pressed.followups or pressed.response)
        notes = [f.content for f in pressed.followups] + [
            pressed.response.content if pressed.response else ""
        ]
        assert "Thanks for the rating." in notes
        rerolled = await world.member.click(answer, label="🔁 Reroll caption")
        assert rerolled.acknowledged


async def test_without_the_message_content_intent_it_says_so_and_works_on_mentions(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    service = Service(engine, MemoryStore(), ServiceSettings())
    worlds: list[simcord.Env] = []

    async def connect(client: discord.Client) -> None:
        # A simulated Developer Portal where the intent was never switched on.
        env = simcord.Env(client, approved_intents=discord.Intents.default(), settle_timeout=SLOW)
        try:
            await env.start()
        except BaseException:
            await env.shutdown()
            raise
        worlds.append(env)

    with caplog.at_level(logging.WARNING):
        adapter = await connected(service, DiscordSettings(), connect)
    [env] = worlds
    try:
        assert not adapter.client.intents.message_content
        assert NO_CONTENT_INTENT in [r.getMessage() for r in caplog.records]
        guild = env.create_guild("Quiet server")
        channel = guild.create_text_channel("general")
        member = guild.add_member(env.create_user("bea"))
        me = adapter.client.user
        assert me is not None
        posted = await member.send(channel, f"<@{me.id}>", attachments=[("e.png", photo(7))])
        answer = await until(lambda: finished(channel, posted))
        assert labels(answer) == ANSWER_BUTTONS
    finally:
        await env.shutdown()
        await service.shutdown(0)


async def test_an_image_in_a_dm_or_replying_to_the_bot_is_described(engine: Engine) -> None:
    async with discord_world(engine) as world:
        ann = world.member.user
        # simcord's send_dm takes attachments already stored, as the backend keeps them.
        stored = world.env.backend.store_attachments(ann.dm_channel.id, [("h.png", photo(10))])
        in_dm = await ann.send_dm("", attachments=stored)
        answer = await until(lambda: finished(ann.dm_channel, in_dm))
        assert labels(answer) == ANSWER_BUTTONS

        me = world.adapter.client.user
        assert me is not None
        first = await world.member.send(
            world.channel, f"<@{me.id}>", attachments=[("i.png", photo(11))]
        )
        described = await until(lambda: finished(world.channel, first))
        follow_up = await world.member.send(
            world.channel, "", reply_to=described, attachments=[("j.png", photo(12))]
        )
        assert labels(await until(lambda: finished(world.channel, follow_up))) == ANSWER_BUTTONS
