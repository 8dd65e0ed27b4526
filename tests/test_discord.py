"""Discord end to end: the adapter's real discord.py client against simcord (a simulated
Discord running discord.py's own parsers, cache and views), on the tiny models."""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
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
from bot.bench_discord import simulated_adapter
from bot.config import load_settings
from bot.wiring import build_tasks
from core.engine import Engine
from core.ports import ChatRef, UserRef
from core.service import Service
from core.settings import DiscordSettings, ServiceSettings
from core.types import Origin
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
    store: MemoryStore


@asynccontextmanager
async def discord_world(engine: Engine, **settings: Any) -> AsyncIterator[World]:
    store = MemoryStore()
    service = Service(engine, store, ServiceSettings())
    adapter = simulated_adapter(service, DiscordSettings(**settings))
    async with simcord.run(adapter.client, settle_timeout=SETTLE) as env:
        guild = env.create_guild("Photo club")
        channel = guild.create_text_channel("photos")
        member = guild.add_member(env.create_user("ann"))
        yield World(env, adapter, guild, channel, member, store)
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


def mention(world: World) -> str:
    me = world.adapter.client.user
    assert me is not None
    return f"<@{me.id}>"


async def post_and_answer(world: World, name: str, seed: int, text: str = "") -> tuple[Any, Any]:
    """A member's image mentioning the bot, and the bot's finished answer to it."""
    posted = await world.member.send(
        world.channel, f"{mention(world)} {text}".strip(), attachments=[(name, photo(seed))]
    )
    return posted, await until(lambda: finished(world.channel, posted))


async def test_an_image_mentioning_the_bot_gets_an_answer_that_fills_in(engine: Engine) -> None:
    async with discord_world(engine) as world:
        assert world.adapter.connected()  # what /readyz reports for Discord
        posted, answer = await post_and_answer(world, "cat.png", 1, "what is this?")
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
        files = [("a.png", photo(2)), ("notes.pdf", b"%PDF-1.4 not an image"), ("b.png", photo(3))]
        posted = await world.member.send(world.channel, f"{mention(world)}", attachments=files)
        answers = await until(
            lambda: [m for m in replies_to(world.channel, posted) if m.components][1:] or None
        )
        said = [m.content for m in replies_to(world.channel, posted)]
        assert "That is a PDF document, not an image; send a photo or an image file." in said
        assert len(replies_to(world.channel, posted)) == 3 and len(answers) == 1


async def test_an_attachment_over_the_limit_is_refused_before_download(engine: Engine) -> None:
    async with discord_world(engine, max_download_mb=0.5) as world:
        big = imagekit.encode(imagekit.noise((1200, 900), seed=4))
        assert len(big) > 512 * 1024
        posted = await world.member.send(
            world.channel, f"{mention(world)}", attachments=[("big.png", big)]
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
        _, answer = await post_and_answer(world, "d.png", 6)
        reborn = simulated_adapter(world.adapter.chatbot.service, DiscordSettings())
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
        # A form opened by one run of the bot and submitted to the next.
        opened = await world.member.click(answer, label="🎨 Reimagine")
        assert offered_text(opened.modal)
        again = simulated_adapter(world.adapter.chatbot.service, DiscordSettings())
        await world.env.restart_bot(again.client)
        submitted = await world.member.submit_modal(opened, {"text": "a paper boat"})
        assert (await until(lambda: made_image(submitted))).content.startswith("🎨 a paper boat")


async def test_work_a_restart_cut_short_is_answered_once_when_the_bot_is_back(
    engine: Engine,
) -> None:
    async with discord_world(engine) as world:
        service = world.adapter.chatbot.service
        posted = await world.member.send(world.channel, "", attachments=[("r.png", photo(50))])
        assert not replies_to(world.channel, posted)  # not addressed: left alone
        # As a run that was stopped right after it journalled the message and stored its
        # image, before any answer, leaves them.
        user = UserRef("discord", str(world.member.id))
        stored = await world.store.put_image(photo(50), user, datetime.datetime.now(datetime.UTC))
        origin = Origin(user, ChatRef("discord", str(world.channel.id)), str(posted.id))
        entry = await service.journal(f"discord:{posted.id}", origin, "chat", {"describe": True})
        await entry.keep_image(stored.sha256)
        # A slash command's answer went to its interaction, gone with the run that had it.
        deferred = Origin(user, origin.chat, "interaction-1456074443980800999")
        command = {"command": "caption", "arguments": ""}
        entry = await service.journal("discord:1456074443980800999", deferred, "chat", command)
        await entry.keep_image(stored.sha256)

        await world.env.restart_bot(simulated_adapter(service, DiscordSettings()).client)
        answer = await until(lambda: finished(world.channel, posted))
        assert labels(answer) == ANSWER_BUTTONS
        standalone = await until(
            lambda: [
                m
                for m in world.channel.history()
                if m.author.id != world.member.id and m.reference is None and m.components
            ]
        )
        assert len(standalone) == 1  # the command's answer, as a message of the channel
        await world.env.restart_bot(simulated_adapter(service, DiscordSettings()).client)
        await asyncio.sleep(1)
        assert len(replies_to(world.channel, posted)) == 1  # once, not at every start


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

        first = await world.member.send(
            world.channel, f"{mention(world)}", attachments=[("i.png", photo(11))]
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
        image = await until(lambda: made_image(made))
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
        reborn = simulated_adapter(world.adapter.chatbot.service, DiscordSettings())
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


# -- forms, context menus and alt text --------------------------------------------------------


def offered_text(modal: dict[str, Any] | None) -> str:
    """The text a modal offers in its one field."""
    assert modal is not None, "no modal was shown"
    stack: list[Any] = [modal.get("components", [])]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if item.get("custom_id") == "text":
                return str(item.get("value") or "")
            stack.extend(v for v in item.values() if isinstance(v, list | dict))
    raise AssertionError("the modal has no text field")


def made_image(result: Any) -> Any:
    """The message of an interaction's answers that carries an image."""
    return next(
        (m for m in [result.response, *result.followups] if m is not None and m.attachments),
        None,
    )


async def test_the_context_menus_describe_and_reimagine_any_message_with_an_image(
    engine: Engine,
) -> None:
    page = imagekit.text_png(["HARBOUR LANTERN"], (640, 200), font_size=48)
    async with discord_world(engine) as world:
        posted = await world.member.send(world.channel, "look", attachments=[("p.png", page)])
        assert not replies_to(world.channel, posted)  # not addressed: left alone
        described = await world.member.context_menu(world.channel, "Describe image", posted)
        alt = await until(lambda: described.response and described.response.content)
        assert alt.startswith("Image description: ")
        assert "Text in the image:" in alt and "HARBOUR" in alt.upper()

        menu = await world.member.context_menu(world.channel, "Reimagine image", posted)
        caption = alt.splitlines()[0].removeprefix("Image description: ")
        assert offered_text(menu.modal) == caption  # known from the description just made
        made = await world.member.submit_modal(menu, {"text": "the harbour at night"})
        image = await until(lambda: made_image(made))
        assert image.content.startswith("🎨 the harbour at night\nseed ")

        words = await world.member.send(world.channel, "no picture here")
        refused = await world.member.context_menu(world.channel, "Describe image", words)
        assert refused.response is not None and refused.response.ephemeral
        assert refused.response.content == "That message has no image."


async def test_alt_text_for_images_posted_without_one_where_the_server_wants_it(
    engine: Engine,
) -> None:
    async with discord_world(engine) as world:
        chat = ChatRef("discord", str(world.channel.id))
        admin = Origin(UserRef("discord", "1"), chat, chat_admin=True)
        await world.adapter.chatbot.service.update_chat_settings(admin, alt_text=True)
        posted = await world.member.send(
            world.channel, "", attachments=[("a.png", photo(20)), ("b.png", photo(21))]
        )
        alts = await until(
            lambda: (
                len(replies_to(world.channel, posted)) == 2 and replies_to(world.channel, posted)
            )
        )
        contents = sorted(m.content for m in alts)
        assert contents[0].startswith("Image 1 of 2: ") and contents[1].startswith("Image 2 of 2: ")
        assert all(not m.components for m in alts)  # short, with no buttons

        # simcord's members post files without descriptions: post one as its backend would.
        backend = world.env.backend
        with_alt = backend.cdn.store_attachment(
            backend.snowflake(), world.channel.id, "c.png", photo(22), "A red kite over a beach"
        )
        described = backend.create_message(
            world.channel.id, world.member.id, "", attachments=[with_alt]
        )
        await world.env.settle()
        await asyncio.sleep(1)
        assert not replies_to(world.channel, described)  # it has a description of its own
        assert len(world.channel.history()) == 4  # the two posts, and two alt texts


async def test_reimagine_and_ask_through_the_buttons_forms(engine: Engine) -> None:
    async with discord_world(engine) as world:
        _, answer = await post_and_answer(world, "k.png", 13)
        pressed = await world.member.click(answer, label="🎨 Reimagine")
        offered = offered_text(pressed.modal)
        assert offered and offered in answer.content  # the answer's caption, to edit
        edited = await world.member.submit_modal(pressed, {"text": "a lighthouse at dusk"})
        assert deferrals(world.env)[-1] == 5  # deferred, then answered
        image = await until(lambda: made_image(edited))
        assert image.content.startswith("🎨 a lighthouse at dusk\nseed ")

        asked = await world.member.click(answer, label="❓ Ask")
        assert offered_text(asked.modal) == ""
        question = await world.member.submit_modal(asked, {"text": "is it daytime?"})
        replied = await until(lambda: question.response and question.response.components)
        assert replied and "is it daytime?" in question.response.content


async def test_an_embedded_image_is_described_when_discord_adds_it(engine: Engine) -> None:
    async with discord_world(engine) as world:
        backend = world.env.backend
        # Discord fetches a posted link's image and adds its preview to the message later.
        stored = backend.cdn.store_attachment(
            backend.snowflake(), world.channel.id, "harbour.png", photo(30), None
        )
        preview = {
            "type": "image",
            "url": "https://example.org/harbour.png",
            "thumbnail": {
                "url": "https://example.org/harbour.png",
                "proxy_url": stored["proxy_url"],
                "width": 96,
                "height": 96,
            },
        }
        posted = await world.member.send(
            world.channel, f"{mention(world)} https://example.org/harbour.png"
        )
        assert not replies_to(world.channel, posted)  # nothing to describe yet
        backend.edit_message(world.channel.id, posted.id, {"embeds": [preview]})
        await world.env.settle()
        answer = await until(lambda: finished(world.channel, posted))
        assert labels(answer) == ANSWER_BUTTONS
        # An article's thumbnail is not an image someone posted.
        article = {**preview, "type": "article", "title": "News"}
        linked = await world.member.send(
            world.channel, f"{mention(world)} https://example.org/news"
        )
        backend.edit_message(world.channel.id, linked.id, {"embeds": [article]})
        await world.env.settle()
        await asyncio.sleep(1)
        assert not replies_to(world.channel, linked)
