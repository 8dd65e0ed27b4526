"""Telegram end to end: ``bot.run``'s wiring with a real python-telegram-bot Application,
polling the fake Bot API server (bot/fake_telegram.py) on 127.0.0.1, on tiny models.

One bot serves the module; each test talks from its own users and chats, so the pacing
and "last image" of one test never meet another's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from telegram import Bot

from adapters.telegram.platform import TelegramPlatform
from bot.config import parse_settings
from bot.fake_telegram import Chat, FakeTelegram, StoredMessage, User
from bot.run import EXIT_OK, run
from core.chat import commands
from core.ports import ChatRef
from core.settings import Settings
from tests import imagekit

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "123456:TEST-token-never-logged"
ANSWER_BUTTONS = [["🎨 Reimagine", "❓ Ask", "🔁 Reroll caption"], ["👍", "👎"]]
# A model run plus paced edits (one a second) on two shared cores: generous, not tight.
SLOW = 90.0


def settings_for(root: Path, model_cache: Path, fake: FakeTelegram, **telegram: Any) -> Settings:
    return parse_settings(
        {
            "profile": "tiny",
            "engine": {"device": "cpu", "model_cache": str(model_cache)},
            "store": {
                "database": str(root / "bot.sqlite3"),
                "images_dir": str(root / "images"),
            },
            "web": {"enabled": False},
            "discord": {"enabled": False},
            # Prompts longer than a photo caption may hold, to see where the rest goes.
            "profiles": {"tiny": {"reimagine": {"max_prompt_chars": 1500}}},
            "telegram": {
                "api_base_url": fake.base_url,
                "file_base_url": fake.base_file_url,
                **telegram,
            },
        }
    )


@pytest.fixture(scope="module")
def environment() -> Any:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")  # httpx reads proxies per client
        yield patch


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def tg(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, environment: Any
) -> AsyncIterator[FakeTelegram]:
    """The fake server, with the bot running against it for the whole module."""
    async with FakeTelegram(TOKEN) as fake:
        settings = settings_for(tmp_path_factory.mktemp("telegram"), model_cache, fake)
        ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        bot = asyncio.create_task(run(settings, ready=ready.set_result))
        await asyncio.wait({ready, bot}, timeout=180, return_when=asyncio.FIRST_COMPLETED)
        assert ready.done(), f"the bot did not start (status {bot.result() if bot.done() else '-'})"
        assert ready.result() == {"telegram": "@CaptionTestBot"}
        yield fake
        if not bot.done():  # its handler is installed only while it runs
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the bot, as in production
        assert await asyncio.wait_for(bot, 60) == EXIT_OK


@pytest.fixture(autouse=True)
def no_failed_updates(caplog: pytest.LogCaptureFixture) -> Any:
    """An update whose handling raised is a failed test, whatever the chat saw."""
    yield
    failed = [
        r.getMessage() + "\n" + (r.exc_text or "")
        for r in caplog.records
        if r.levelno >= logging.ERROR
    ]
    assert failed == []


_ids = iter(range(1000, 10_000))


def someone(name: str) -> User:
    number = next(_ids)
    return User(number, name, f"{name.lower()}{number}")


def group(title: str) -> Chat:
    return Chat(-100_000_000_0000 - next(_ids), "supergroup", title=title)


def photo(seed: int = 0) -> bytes:
    return imagekit.encode(imagekit.noise(seed=seed))


def incoming(tg: FakeTelegram, update: dict[str, Any]) -> StoredMessage:
    """The message an update carried, as the fake keeps it."""
    message = update["message"]
    return tg.message(message["chat"]["id"], message["message_id"])


def replies_to(tg: FakeTelegram, message: StoredMessage) -> list[StoredMessage]:
    return [
        m
        for m in tg.bot_messages(message.chat_id)
        if m.reply_to is not None and m.reply_to.message_id == message.message_id
    ]


async def answer_to(
    tg: FakeTelegram,
    message: StoredMessage,
    timeout: float = SLOW,  # noqa: ASYNC109 (a bound for the fake's wait_for)
) -> StoredMessage:
    """The bot's finished answer to ``message``: the reply that got its buttons."""

    def finished() -> StoredMessage | None:
        return next((m for m in replies_to(tg, message) if m.buttons), None)

    return await tg.wait_for(finished, timeout)


async def reply_saying(
    tg: FakeTelegram,
    message: StoredMessage,
    words: str,
    timeout: float = SLOW,  # noqa: ASYNC109
) -> StoredMessage:
    def said() -> StoredMessage | None:
        return next((m for m in replies_to(tg, message) if words in (m.text or "")), None)

    return await tg.wait_for(said, timeout)


def labels(message: StoredMessage) -> list[list[str]]:
    return [[button["text"] for button in row] for row in message.buttons]


def every_label(message: StoredMessage) -> list[str]:
    return [button["text"] for row in message.buttons for button in row]


def button(message: StoredMessage, label: str) -> str:
    return next(b["callback_data"] for row in message.buttons for b in row if b["text"] == label)


def callback_notes(tg: FakeTelegram) -> list[str | None]:
    return [call.params.get("text") for call in tg.calls("answerCallbackQuery")]


async def nothing_more(tg: FakeTelegram, seconds: float = 2.0) -> None:
    """Give the bot time to (wrongly) say something more."""
    await asyncio.sleep(seconds)


# -- describing ---------------------------------------------------------------------------


async def test_a_photo_gets_one_answer_that_fills_in_then_gets_buttons(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    sent = incoming(tg, update := tg.photo_message(ann, photo()))
    tg.push(update)
    answer = await answer_to(tg, sent)
    # It opened at once and filled in: an opening or a place in line, then the parts.
    assert answer.history[0] is not None
    assert answer.history[0].startswith(("👀", "⏳"))
    assert len(answer.history) >= 2
    text = answer.text or ""
    assert "Text in the image:" in text
    assert "Social caption:" in text
    assert "⏳" not in text and "👀" not in text  # no status line left in the finished answer
    assert labels(answer) == ANSWER_BUTTONS
    assert len(replies_to(tg, sent)) == 1  # one answer message, edited, not several
    assert tg.calls("sendChatAction", chat_id=ann.id)
    # No chat gets more than about one message or edit a second.
    assert tg.max_per_window(0.95, chat_id=ann.id) == 1


async def test_the_commands_are_registered_with_telegram(tg: FakeTelegram) -> None:
    registered = [c["command"] for c in tg.my_commands()]
    assert registered == [c.name for c in commands.COMMANDS]
    assert {"ask", "reimagine", "settings", "help"} <= set(registered)


async def test_an_album_in_a_group_gets_an_answer_for_each_photo(tg: FakeTelegram) -> None:
    ann, team = someone("Ann"), group("Album club")
    updates = tg.album(ann, [photo(1), photo(2), photo(3)], chat=team, caption="@CaptionTestBot")
    tg.push(*updates)
    for update in updates:
        answer = await answer_to(tg, incoming(tg, update))
        assert labels(answer) == ANSWER_BUTTONS
    assert tg.max_per_window(0.95, chat_id=team.id) == 1
    assert tg.max_per_window(60, chat_id=team.id) <= 20


async def test_a_group_photo_that_does_not_address_the_bot_is_left_alone(
    tg: FakeTelegram,
) -> None:
    ann, team = someone("Ann"), group("Quiet group")
    quiet = incoming(tg, first := tg.photo_message(ann, photo(4), chat=team, caption="our cat"))
    mentioned = incoming(
        tg, second := tg.photo_message(ann, photo(5), chat=team, caption="@CaptionTestBot this?")
    )
    tg.push(first, second)
    await answer_to(tg, mentioned)
    await nothing_more(tg)
    assert replies_to(tg, quiet) == []


async def test_an_image_sent_as_a_file_is_described(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    update = tg.document_message(ann, photo(6), file_name="scan.png", mime_type="image/png")
    tg.push(update)
    answer = await answer_to(tg, incoming(tg, update))
    assert labels(answer) == ANSWER_BUTTONS


async def test_a_pdf_and_a_file_over_20_mb_are_refused_before_any_download(
    tg: FakeTelegram,
) -> None:
    ann = someone("Ann")
    pdf = tg.document_message(ann, b"%PDF-1.4 ...", file_name="a.pdf", mime_type="application/pdf")
    huge = tg.document_message(
        ann, photo(7), file_name="big.png", mime_type="image/png", file_size=25 * 1024 * 1024
    )
    tg.push(pdf, huge)
    refused = await reply_saying(tg, incoming(tg, pdf), "PDF")
    assert refused.text == "That is a PDF document, not an image; send a photo or an image file."
    too_big = await reply_saying(tg, incoming(tg, huge), "MB")
    assert too_big.text == "That file is 25 MB; this bot takes images up to 20 MB."
    assert tg.calls("getFile", chat_id=ann.id) == []
    asked_for = {call.params.get("file_id") for call in tg.calls("getFile")}
    documents = {incoming(tg, u).file.file_id for u in (pdf, huge)}  # type: ignore[union-attr]
    assert asked_for.isdisjoint(documents)


async def test_a_long_answer_is_split_at_telegrams_limit(tg: FakeTelegram) -> None:
    """A page of text (a screenshot of an article) read out: more than 4096 characters."""
    rng = random.Random(1)
    words = ["harbour", "lantern", "morning", "ticket", "river", "garden", "window", "museum"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(50)]
    page = imagekit.text_png(lines, (1280, 860), font_size=14, line_spacing=1.2)
    ann = someone("Ann")
    shown = incoming(tg, update := tg.photo_message(ann, page, caption="/ocr"))
    tg.push(update)
    answer = await answer_to(tg, shown, timeout=240)
    following = await tg.wait_for(
        lambda: [m for m in tg.bot_messages(ann.id) if m.reply_to is answer], timeout=30
    )
    texts = [answer.text or ""] + [m.text or "" for m in following]
    assert all(len(t) <= 4096 for t in texts)
    whole = "".join(texts)
    assert len(whole) > 4096
    assert whole.startswith("Text in the image:")
    assert whole.count("harbour") >= 30  # read, not just filled


# -- questions ----------------------------------------------------------------------------


async def test_ask_as_a_reply_to_a_photo_the_bot_never_saw(tg: FakeTelegram) -> None:
    ann, team = someone("Ann"), group("Askers")
    quiet = incoming(tg, update := tg.photo_message(ann, photo(8), chat=team))
    tg.push(update)
    question = tg.text_message(ann, "/ask@CaptionTestBot what is this?", chat=team, reply_to=quiet)
    tg.push(question)
    answer = await answer_to(tg, incoming(tg, question))
    assert (answer.text or "").startswith("❓ what is this?\n\n")
    assert labels(answer) == [["🎨 Reimagine", "❓ Ask"], ["👍", "👎"]]


async def test_ask_as_the_caption_of_a_photo(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    sent = incoming(tg, update := tg.photo_message(ann, photo(9), caption="/ask what colour?"))
    tg.push(update)
    answer = await answer_to(tg, sent)
    assert (answer.text or "").startswith("❓ what colour?\n\n")
    await nothing_more(tg, 1.0)
    assert len(replies_to(tg, sent)) == 1  # answered, not also described


async def test_ask_alone_is_about_the_last_photo(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    tg.push(first := tg.photo_message(ann, photo(10)))
    await answer_to(tg, incoming(tg, first))
    tg.push(question := tg.command(ann, "ask", "is it outdoors?", addressed=False))
    answer = await answer_to(tg, incoming(tg, question))
    assert (answer.text or "").startswith("❓ is it outdoors?\n\n")
    # With no photo at all, one sentence says what to do.
    bob = someone("Bob")
    tg.push(lonely := tg.command(bob, "ask", "what is it?", addressed=False))
    told = await reply_saying(tg, incoming(tg, lonely), "image")
    assert told.text == "Send an image first, or reply to one."


async def test_a_reply_to_an_answer_in_a_private_chat_is_a_question(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    tg.push(first := tg.photo_message(ann, photo(11)))
    described = await answer_to(tg, incoming(tg, first))
    tg.push(question := tg.text_message(ann, "how many people?", reply_to=described))
    answer = await answer_to(tg, incoming(tg, question))
    assert (answer.text or "").startswith("❓ how many people?\n\n")


# -- reimagining --------------------------------------------------------------------------


def made_images(tg: FakeTelegram, chat_id: int) -> list[StoredMessage]:
    return [m for m in tg.bot_messages(chat_id) if m.kind in ("photo", "document")]


async def test_reimagine_as_a_reply_shows_progress_then_the_image(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    tg.push(first := tg.photo_message(ann, photo(12)))
    described = await answer_to(tg, incoming(tg, first))
    tg.push(asked := tg.text_message(ann, "/reimagine a red boat at dusk", reply_to=described))
    image = await tg.wait_for(lambda: made_images(tg, ann.id), SLOW)
    [made] = image
    assert (made.text or "").startswith("🎨 a red boat at dusk\nseed ")
    assert labels(made) == [["🎲 Again", "🎨 Edit and reimagine"], ["👍", "👎"]]
    assert made.reply_to is not None and made.reply_to.message_id == incoming(tg, asked).message_id
    progress = await reply_saying(tg, incoming(tg, asked), "✅ Made in")
    # Its first state: the opening, or the newest status line (warming up, the step) when
    # the message waited its turn behind the description's last edit.
    assert (progress.history[0] or "").startswith(("🎨 Making your image…", "⏳", "🎨 Step"))
    assert progress.history[0] != progress.text
    assert tg.max_per_window(0.95, chat_id=ann.id) == 1


async def test_a_prompt_too_long_for_a_photo_caption_follows_the_image(
    tg: FakeTelegram,
) -> None:
    ann = someone("Ann")
    prompt = "a lighthouse on a cliff, " * 45  # 1,125 characters
    tg.push(asked := tg.text_message(ann, f"/imagine {prompt}"))
    [made] = await tg.wait_for(lambda: made_images(tg, ann.id), SLOW)
    assert (made.text or "").startswith("🎨 seed ")
    assert labels(made) == [["🎲 Again", "🎨 Edit and reimagine"], ["👍", "👎"]]
    whole = await reply_saying(tg, incoming(tg, asked), "🎨 a lighthouse")
    assert whole.text == f"🎨 {prompt.strip()}"


async def test_the_edit_loop_caption_to_edited_text_to_image(tg: FakeTelegram) -> None:
    """🎨 under an answer sends its caption to edit (ForceReply); the edited reply runs."""
    ann = someone("Ann")
    tg.push(first := tg.photo_message(ann, photo(13)))
    described = await answer_to(tg, incoming(tg, first))
    caption = (described.text or "").split("\n\n")[0]
    tg.push(tg.callback_query(ann, described, button(described, "🎨 Reimagine")))

    def prompt() -> StoredMessage | None:
        return next((m for m in tg.bot_messages(ann.id) if m.force_reply), None)

    asked = await tg.wait_for(prompt, SLOW)
    assert (asked.text or "") == f"{commands.REIMAGINE_PROMPT}\n\n{caption}"
    assert [e["type"] for e in asked.entities] == ["code"]  # a tap copies the caption
    tg.push(tg.text_message(ann, caption + " in watercolour", reply_to=asked))
    [made] = await tg.wait_for(lambda: made_images(tg, ann.id), SLOW)
    assert (made.text or "").startswith(f"🎨 {caption} in watercolour\nseed ")
    # And round again, from the made image's own button.
    tg.push(tg.callback_query(ann, made, button(made, "🎨 Edit and reimagine")))
    again = await tg.wait_for(
        lambda: [m for m in tg.bot_messages(ann.id) if m.force_reply][1:] or None, SLOW
    )
    assert (again[0].text or "").startswith(commands.REIMAGINE_PROMPT)


async def test_reimagine_with_no_text_asks_for_it(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    tg.push(first := tg.photo_message(ann, photo(14)))
    described = await answer_to(tg, incoming(tg, first))
    tg.push(tg.text_message(ann, "/reimagine", reply_to=described))
    asked = await tg.wait_for(
        lambda: next((m for m in tg.bot_messages(ann.id) if m.force_reply), None), SLOW
    )
    assert (asked.text or "").startswith(commands.REIMAGINE_PROMPT)


# -- buttons and settings -----------------------------------------------------------------


async def test_reroll_and_rating_buttons(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    tg.push(first := tg.photo_message(ann, photo(15)))
    described = await answer_to(tg, incoming(tg, first))
    edits = len(described.history)
    tg.push(tg.callback_query(ann, described, button(described, "🔁 Reroll caption")))
    await tg.wait_for(lambda: "A new caption." in callback_notes(tg), SLOW)
    # Edited in place (or, when the new caption is the same, "not modified" was ignored).
    assert len(described.history) >= edits
    assert labels(described) == ANSWER_BUTTONS
    tg.push(tg.callback_query(ann, described, button(described, "👍")))
    await tg.wait_for(lambda: "Thanks for the rating." in callback_notes(tg), SLOW)


async def test_settings_in_a_group_are_for_its_admins(tg: FakeTelegram) -> None:
    owner, member, team = someone("Owner"), someone("Member"), group("Settings club")
    tg.set_member_status(team, owner, "creator")
    tg.set_member_status(team, member, "member")
    tg.push(refused := tg.command(member, "settings", chat=team))
    told = await reply_saying(tg, incoming(tg, refused), "administrators")
    assert told.text == "Only this chat's administrators can change its settings."
    tg.push(shown := tg.command(owner, "settings", chat=team))
    menu = await reply_saying(tg, incoming(tg, shown), "What a described image gets")
    assert "⬜ Describe every image posted here" in every_label(menu)
    # A member pressing the owner's menu changes nothing.
    tg.push(tg.callback_query(member, menu, button(menu, "✅ Social caption")))
    await tg.wait_for(lambda: any("administrators" in (n or "") for n in callback_notes(tg)))
    assert "✅ Social caption" in every_label(menu)
    # The owner turns on describing every image; then a photo with no mention is described.
    tg.push(tg.callback_query(owner, menu, button(menu, "⬜ Describe every image posted here")))
    await tg.wait_for(lambda: "✅ Describe every image posted here" in every_label(menu))
    tg.push(update := tg.photo_message(member, photo(16), chat=team))
    await answer_to(tg, incoming(tg, update))


async def test_help_usage_and_forget(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    tg.push(start := tg.command(ann, "start", addressed=False))
    helped = await reply_saying(tg, incoming(tg, start), "/reimagine")
    assert "/ask" in (helped.text or "")
    tg.push(first := tg.photo_message(ann, photo(17)))
    await answer_to(tg, incoming(tg, first))
    tg.push(usage := tg.command(ann, "usage", addressed=False))
    used = await reply_saying(tg, incoming(tg, usage), "Today (UTC)")
    assert "used" in (used.text or "")
    tg.push(forget := tg.command(ann, "forget", addressed=False))
    forgot = await reply_saying(tg, incoming(tg, forget), "Forgot")
    assert forgot.text == "Forgot 1 image you sent and everything made from them."


async def test_an_unknown_command_and_small_talk_get_a_pointer_in_private(
    tg: FakeTelegram,
) -> None:
    ann, team = someone("Ann"), group("Chatty group")
    tg.push(unknown := tg.text_message(ann, "/frobnicate@CaptionTestBot now"))
    said = await reply_saying(tg, incoming(tg, unknown), "/frobnicate")
    assert said.text == "I don't know the command /frobnicate; see /help."
    tg.push(hello := tg.text_message(ann, "hello"))
    said = await reply_saying(tg, incoming(tg, hello), "photo")
    assert said.text == "Send me a photo to describe it, or see /help."
    tg.push(elsewhere := tg.text_message(ann, "/frobnicate", chat=team))  # maybe another bot's
    await nothing_more(tg)
    assert replies_to(tg, incoming(tg, elsewhere)) == []


# -- the platform's limits ----------------------------------------------------------------


async def test_a_429_is_waited_out_and_retried(tg: FakeTelegram) -> None:
    ann = someone("Ann")
    tg.flood("editMessageText", retry_after=2, chat_id=ann.id)
    tg.flood("sendMessage", retry_after=1, chat_id=ann.id)
    sent = incoming(tg, update := tg.photo_message(ann, photo(18)))
    tg.push(update)
    answer = await answer_to(tg, sent)
    assert "Social caption:" in (answer.text or "")
    for method, wait in (("sendMessage", 1), ("editMessageText", 2)):
        calls = tg.calls(method, chat_id=ann.id)
        busy = next(i for i, call in enumerate(calls) if call.status == 429)
        retried = calls[busy + 1]
        assert retried.ok
        assert retried.at - calls[busy].at >= wait - 0.05


async def test_a_duplicate_update_id_is_answered_once(
    tg: FakeTelegram, caplog: pytest.LogCaptureFixture
) -> None:
    ann = someone("Ann")
    update = tg.photo_message(ann, photo(19))
    with caplog.at_level(logging.INFO):
        tg.push(update, dict(update))  # the same update_id twice, as a redelivery
        await answer_to(tg, sent := incoming(tg, update))
        await nothing_more(tg)
    assert len(replies_to(tg, sent)) == 1
    assert any("delivered again" in r.getMessage() for r in caplog.records)


async def test_an_image_too_big_for_a_photo_goes_back_as_a_document(tg: FakeTelegram) -> None:
    """Telegram takes photos up to 10 MB; a bigger made image keeps every pixel as a file."""
    ann = someone("Ann")
    tg.add_chat(Chat.private(ann))
    async with Bot(TOKEN, base_url=tg.base_url, base_file_url=tg.base_file_url) as bot:
        platform = TelegramPlatform(bot, max_download_bytes=20 * 1024 * 1024)
        big = imagekit.encode(imagekit.noise((2600, 1400)))
        assert len(big) > 10 * 1024 * 1024
        small = photo(20)
        await platform.send_image(ChatRef("telegram", str(ann.id)), big, "big")
        await platform.send_image(ChatRef("telegram", str(ann.id)), small, "small")
    kinds = [(m.kind, m.text) for m in tg.bot_messages(ann.id)]
    assert kinds == [("document", "big"), ("photo", "small")]
    assert tg.bot_messages(ann.id)[0].file.data == big  # type: ignore[union-attr]
