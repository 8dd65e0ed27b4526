"""Discord end to end: the adapter's real discord.py client against simcord (a simulated
Discord running discord.py's own parsers, cache and views), on the tiny models."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
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
from core.chat.live import Outbox
from core.engine import Engine
from core.ports import ChatRef
from core.service import Service
from core.settings import DiscordSettings, ServiceSettings
from tests import imagekit

pytestmark = pytest.mark.asyncio(loop_scope="module")

ANSWER_BUTTONS = [["🎨 Reimagine", "❓ Ask", "🔁 Reroll caption"], ["👍", "👎"]]
# A model run plus paced edits (one a second) on two shared cores: generous, not tight.
SLOW = 90.0
SETTLE = 30.0


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


async def wall_clock_sleep(seconds: float) -> None:
    """``asyncio.sleep`` on a thread's timer, outside simcord's virtual clock.

    simcord fires a bot's timers by moving its clock, and moves it only once every other
    task of the bot is parked; a send queued in the Outbox behind one sleeping out the
    pace is not, so the two would wait on each other until the settle timeout."""
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


def adapter_for(service: Service, settings: DiscordSettings) -> DiscordAdapter:
    adapter = DiscordAdapter(service, settings)
    adapter.chatbot.outbox = Outbox(adapter.platform, sleep=wall_clock_sleep)
    return adapter


@asynccontextmanager
async def discord_world(engine: Engine, **settings: Any) -> AsyncIterator[World]:
    service = Service(engine, MemoryStore(), ServiceSettings())
    adapter = adapter_for(service, DiscordSettings(**settings))
    async with simcord.run(adapter.client, settle_timeout=SETTLE) as env:
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
        reborn = adapter_for(world.adapter.chatbot.service, DiscordSettings())
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


# -- slash commands -----------------------------------------------------------------------


def deferrals(env: simcord.Env) -> list[int]:
    return [
        (r.json or {}).get("type", 0) for r in env.http_requests if r.path.endswith("/callback")
    ]


async def test_ask_with_and_without_the_image_option(engine: Engine) -> None:
    async with discord_world(engine) as world:
        with_image = await world.member.slash(
            world.channel, "ask", question="what is in it?", image=("f.png", photo(8))
        )
        assert deferrals(world.env) == [5]  # deferred at once, with "thinking…"
        answered = await until(lambda: with_image.response and with_image.response.content)
        assert "what is in it?" in answered
        # Without the option: the channel's last image (the one just asked about).
        alone = await world.member.slash(world.channel, "ask", question="and the colours?")
        assert (await until(lambda: alone.response and alone.response.content)).count("colours")
        assert deferrals(world.env) == [5, 5]


async def test_caption_and_reimagine_with_options(engine: Engine) -> None:
    async with discord_world(engine) as world:
        captioned = await world.member.slash(world.channel, "caption", image=("g.png", photo(9)))
        await until(lambda: captioned.response and captioned.response.components)
        made = await world.member.slash(
            world.channel, "reimagine", text="a red boat", strength=0.5, seed=7
        )
        image = await until(
            lambda: next(
                (m for m in [made.response, *made.followups] if m is not None and m.attachments),
                None,
            )
        )
        assert image.content.startswith("🎨 a red boat\nseed 7")


async def test_a_result_over_2000_characters_is_split(engine: Engine) -> None:
    rng = random.Random(2)
    words = ["harbour", "lantern", "morning", "ticket", "river", "garden", "window", "museum"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(32)]
    page = imagekit.text_png(lines, (1280, 640), font_size=14, line_spacing=1.2)
    async with discord_world(engine) as world:
        read = await world.member.slash(world.channel, "ocr", image=("page.png", page))
        first = await until(lambda: read.response and read.response.components and read.response)
        following = await until(
            lambda: [
                m
                for m in world.channel.history()
                if m.reference is not None and m.reference.message_id == first.id
            ]
        )
        texts = [first.content] + [m.content for m in following]
        assert all(len(t) <= 2000 for t in texts)
        assert len("".join(texts)) > 2000 and "".join(texts).count("harbour") >= 15


async def test_commands_are_synced_once_and_not_again_when_unchanged(engine: Engine) -> None:
    async with discord_world(engine) as world:
        available = set(world.member.available_commands(world.channel))
        assert {"ask", "reimagine", "imagine", "caption", "ocr", "help"} <= available
        assert "settings" not in available  # only for members who may manage the server
        reborn = adapter_for(world.adapter.chatbot.service, DiscordSettings())
        await world.env.restart_bot(reborn.client)
        syncs = [r for r in world.env.http_requests if r.method == "PUT" and "commands" in r.path]
        assert len(syncs) == 1
        helped = await world.member.slash(world.channel, "help")
        assert "/reimagine" in await until(lambda: helped.response and helped.response.content)


async def test_an_answer_after_the_interaction_token_expired_is_a_channel_message(
    engine: Engine,
) -> None:
    async with discord_world(engine) as world:
        seen: list[discord.Interaction] = []

        async def remember(interaction: discord.Interaction) -> bool:
            seen.append(interaction)
            return True

        world.adapter.tree.interaction_check = remember  # type: ignore[method-assign]
        await world.member.slash(world.channel, "help")
        platform, chat = world.adapter.platform, ChatRef("discord", str(world.channel.id))
        in_time = platform.deferred(seen[0])
        await platform.send_text(chat, "in time", reply_to=in_time)
        await platform.send_text(chat, "a follow-up", reply_to=in_time)
        late = platform.deferred(seen[0])
        await world.env.advance_time(15 * 60)
        before = len(world.env.http_requests)
        sent = await platform.send_text(chat, "after a long queue", reply_to=late)
        await platform.send_text(chat, "and more", reply_to=late)
        used = [(r.method, r.path) for r in world.env.http_requests[before:]]
        assert all(not path.startswith("/webhooks/") for _, path in used)  # token not used
        messages = {m.id: m for m in world.channel.history()}
        assert messages[int(sent)].content == "after a long queue"
        assert messages[int(sent)].reference is None
        contents = [m.content for m in messages.values()]
        assert {"in time", "a follow-up", "and more"} <= set(contents)
