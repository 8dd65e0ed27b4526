"""The fake Bot API against a real python-telegram-bot ``Application`` and ``Bot``.

No mocks: PTB's own HTTP client, parsers, updater and handlers talk to the fake on
127.0.0.1, so what passes here is what the Telegram adapter's tests can rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeAllGroupChats,
    ChatMemberAdministrator,
    ChatMemberMember,
    ChatMemberOwner,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    MessageEntity,
    Update,
)
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, Conflict, InvalidToken, RetryAfter
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BaseHandler,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot.fake_telegram import Chat, FakeTelegram, StoredMessage, User
from tests import imagekit

pytestmark = pytest.mark.asyncio(loop_scope="module")

ANN = User(7, "Ann", "ann")
TEAM = Chat(-1001234567890, "supergroup", title="Team")
PNG = imagekit.encode(imagekit.solid((200, 120), "red"))
KEYBOARD = InlineKeyboardMarkup([[InlineKeyboardButton("Again", callback_data="again")]])

Context = ContextTypes.DEFAULT_TYPE


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep any proxy settings away from 127.0.0.1 (httpx reads them per client)."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest_asyncio.fixture(loop_scope="module")
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


def build(fake: FakeTelegram) -> Application:  # type: ignore[type-arg]
    return (
        ApplicationBuilder()
        .token(fake.token)
        .base_url(fake.base_url)
        .base_file_url(fake.base_file_url)
        .concurrent_updates(True)
        .build()
    )


@contextlib.asynccontextmanager
async def polling(
    fake: FakeTelegram,
    *handlers: BaseHandler,  # type: ignore[type-arg]
) -> AsyncIterator[Application]:  # type: ignore[type-arg]
    """A real Application polling the fake; fails the test if a handler raised."""
    app = build(fake)
    app.add_handlers(handlers)
    errors: list[object] = []

    async def record_error(update: object, context: Context) -> None:
        errors.append(context.error)

    app.add_error_handler(record_error)
    async with app:
        await app.start()
        assert app.updater is not None
        await app.updater.start_polling(poll_interval=0.0, timeout=1)
        try:
            yield app
        finally:
            await app.updater.stop()
            await app.stop()
    assert errors == []


async def test_handlers_receive_a_photo_a_command_and_a_button_press(tg: FakeTelegram) -> None:
    photos: list[tuple[int, ...]] = []

    async def on_photo(update: Update, context: Context) -> None:
        """Download the largest size and say how big it was."""
        assert update.message is not None
        sizes = update.message.photo
        photos.append(tuple(size.width for size in sizes))
        data = await (await sizes[-1].get_file()).download_as_bytearray()
        assert bytes(data) == PNG
        await update.message.reply_text(f"got {len(data)} bytes")

    async def on_ask(update: Update, context: Context) -> None:
        assert update.message is not None
        question = " ".join(context.args or [])
        await update.message.reply_text(f"asked: {question}", reply_markup=KEYBOARD)

    async def on_button(update: Update, context: Context) -> None:
        query = update.callback_query
        assert query is not None
        await query.answer("ok")
        await query.edit_message_text(f"pressed {query.data}")

    async with polling(
        tg,
        MessageHandler(filters.PHOTO, on_photo),
        CommandHandler("ask", on_ask),
        CallbackQueryHandler(on_button),
    ):
        tg.push(tg.photo_message(ANN, PNG))
        got = await tg.wait_for_bot_message(ANN.id, "got")
        assert got.text == f"got {len(PNG)} bytes"
        assert photos == [(90, 200)]  # a real thumbnail first, the sent image last

        tg.push(tg.command(ANN, "ask", "what is it?"))
        asked = await tg.wait_for_bot_message(ANN.id, "asked")
        assert asked.text == "asked: what is it?"
        assert asked.buttons == [[{"text": "Again", "callback_data": "again"}]]

        tg.push(tg.callback_query(ANN, asked, "again"))
        await tg.wait_for(lambda: asked.text == "pressed again")
        assert asked.history == ["asked: what is it?", "pressed again"]
        assert asked.buttons == []  # an edit without reply_markup drops the keyboard
        await tg.wait_for(lambda: tg.calls("answerCallbackQuery"))
        assert tg.calls("answerCallbackQuery")[0].params["text"] == "ok"

    assert [call.status for call in tg.calls("download")] == [200]
    assert tg.calls("getMe")[0].token == tg.token
    assert tg.calls("deleteWebhook")


async def test_send_edit_upload_and_download_round_trip(tg: FakeTelegram) -> None:
    tg.add_chat(Chat.private(ANN))
    async with build(tg) as app:
        sent = await app.bot.send_message(ANN.id, "working…", reply_markup=ForceReply())
        edited = await app.bot.edit_message_text(
            "a red square", chat_id=ANN.id, message_id=sent.message_id
        )
        photo = await app.bot.send_photo(ANN.id, photo=PNG, caption="your image")
        file = await app.bot.get_file(photo.photo[-1].file_id)
        downloaded = await file.download_as_bytearray()
        doc = await app.bot.send_document(ANN.id, document=b"%PDF-1.4 tiny", filename="a.pdf")

    assert isinstance(edited, type(sent)) and edited.text == "a red square"
    assert edited.edit_date is not None
    assert (sent.message_id, photo.message_id, doc.message_id) == (1, 2, 3)
    first = tg.message(ANN.id, sent.message_id)
    assert first.history == ["working…", "a red square"] and first.force_reply
    assert first.edited_at is not None and first.edited_at >= first.sent_at

    assert photo.caption == "your image"
    assert [(size.width, size.height) for size in photo.photo] == [(90, 54), (200, 120)]
    assert bytes(downloaded) == PNG
    assert file.file_path is not None and file.file_path.startswith(tg.base_file_url)
    stored = tg.last_bot_message(ANN.id)
    assert stored.file is not None and stored.file.data == b"%PDF-1.4 tiny"
    assert doc.document is not None and doc.document.file_name == "a.pdf"


async def test_an_injected_429_is_retry_after(
    tg: FakeTelegram, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "true")  # RetryAfter.retry_after as a timedelta
    tg.add_chat(Chat.private(ANN))
    tg.add_chat(TEAM)
    tg.flood("sendMessage", retry_after=7, chat_id=ANN.id)
    async with build(tg) as app:
        await app.bot.send_message(TEAM.id, "another chat is not limited")
        with pytest.raises(RetryAfter) as caught:
            await app.bot.send_message(ANN.id, "too soon")
        await app.bot.send_message(ANN.id, "later")

    assert caught.value.retry_after == dt.timedelta(seconds=7)
    assert [call.status for call in tg.calls("sendMessage", chat_id=ANN.id)] == [429, 200]
    assert [m.text for m in tg.bot_messages(ANN.id)] == ["later"]


async def test_an_edit_that_changes_nothing_is_bad_request(tg: FakeTelegram) -> None:
    tg.add_chat(Chat.private(ANN))
    async with build(tg) as app:
        sent = await app.bot.send_message(ANN.id, "same", reply_markup=KEYBOARD)
        ids = {"chat_id": ANN.id, "message_id": sent.message_id}
        with pytest.raises(BadRequest, match="is not modified"):
            await app.bot.edit_message_text("same", reply_markup=KEYBOARD, **ids)
        await app.bot.edit_message_text("same", **ids)  # dropping the keyboard is a change
        with pytest.raises(BadRequest, match="is not modified"):
            await app.bot.edit_message_reply_markup(**ids)
        with pytest.raises(BadRequest, match="Message to edit not found"):
            await app.bot.edit_message_text("x", chat_id=ANN.id, message_id=99)

    stored = tg.message(ANN.id, sent.message_id)
    assert stored.history == ["same", "same"] and stored.buttons == []
    assert [call.status for call in tg.calls("editMessageText")] == [400, 200, 400]


async def test_polling_delivers_each_update_once(tg: FakeTelegram) -> None:
    seen: list[int] = []

    async def record(update: Update, context: Context) -> None:
        seen.append(update.update_id)

    first, second = tg.text_message(ANN, "one"), tg.text_message(ANN, "two")
    async with polling(tg, MessageHandler(filters.TEXT, record)):
        tg.push(first)
        await tg.wait_for(lambda: seen)
        tg.push(second)
        await tg.wait_for(lambda: len(seen) == 2)
        await tg.wait_for(lambda: not tg.pending)  # the next poll confirmed both

    assert seen == [first["update_id"], second["update_id"]]
    offsets = [call.params.get("offset") for call in tg.calls("getUpdates")]
    assert first["update_id"] + 1 in offsets and second["update_id"] + 1 in offsets


async def test_get_updates_offsets_long_polling_and_conflict(tg: FakeTelegram) -> None:
    update = tg.text_message(ANN, "hi")
    tg.push(update)
    uid = update["update_id"]
    async with build(tg) as app:
        bot = app.bot
        # Unconfirmed updates come again; an offset past them confirms them.
        assert [u.update_id for u in await bot.get_updates(timeout=0)] == [uid]
        assert [u.update_id for u in await bot.get_updates(timeout=0)] == [uid]
        assert await bot.get_updates(offset=uid + 1, timeout=0) == ()
        assert tg.pending == []

        # A long poll returns as soon as an update arrives.
        asyncio.get_running_loop().call_later(0.05, tg.push, tg.text_message(ANN, "later"))
        started = time.monotonic()
        (later,) = await bot.get_updates(offset=uid + 1, timeout=5)
        assert time.monotonic() - started < 1
        assert later.message is not None and later.message.text == "later"

        # A second instance's getUpdates ends the waiting one, as Telegram does.
        waiting = asyncio.create_task(bot.get_updates(offset=later.update_id + 1, timeout=5))
        await tg.wait_for(lambda: tg.polling)
        async with Bot(tg.token, base_url=tg.base_url, base_file_url=tg.base_file_url) as other:
            assert await other.get_updates(offset=later.update_id + 1, timeout=0) == ()
        with pytest.raises(Conflict, match="terminated by other getUpdates"):
            await waiting


async def test_a_wrong_token_is_rejected(tg: FakeTelegram) -> None:
    with pytest.raises(InvalidToken):
        async with Bot("999:wrong", base_url=tg.base_url, base_file_url=tg.base_file_url):
            pass
    (call,) = tg.calls("getMe")
    assert (call.token, call.status) == ("999:wrong", 401)


async def test_groups_albums_documents_and_replies(tg: FakeTelegram) -> None:
    media_groups: list[tuple[str | None, str | None]] = []

    async def on_ask(update: Update, context: Context) -> None:
        assert update.message is not None
        await update.message.reply_text(f"asked: {' '.join(context.args or [])}")

    async def on_mention(update: Update, context: Context) -> None:
        assert update.message is not None
        await update.message.reply_text("you called?")

    async def on_photo(update: Update, context: Context) -> None:
        assert update.message is not None
        media_groups.append((update.message.media_group_id, update.message.caption))

    async def on_document(update: Update, context: Context) -> None:
        """Download the document, or say why not."""
        message = update.message
        assert message is not None and message.document is not None
        try:
            data = await (await message.document.get_file()).download_as_bytearray()
        except BadRequest as error:
            await message.reply_text(f"cannot: {error}")
        else:
            await message.reply_text(f"{message.document.mime_type}, {len(data)} bytes")

    async def on_reply(update: Update, context: Context) -> None:
        message = update.message
        assert message is not None and message.reply_to_message is not None
        assert message.reply_to_message.from_user is not None
        assert message.reply_to_message.from_user.is_bot
        await message.reply_text(f"re: {message.reply_to_message.text}")

    async with polling(
        tg,
        CommandHandler("ask", on_ask),
        MessageHandler(filters.REPLY, on_reply),
        MessageHandler(filters.Entity(MessageEntity.MENTION), on_mention),
        MessageHandler(filters.PHOTO, on_photo),
        MessageHandler(filters.Document.ALL, on_document),
    ):
        command = tg.command(ANN, "ask", "what?", chat=TEAM)
        entity = command["message"]["entities"][0]
        assert entity == {"type": "bot_command", "offset": 0, "length": len("/ask@") + 14}
        tg.push(command)
        asked = await tg.wait_for_bot_message(TEAM.id, "asked")
        assert asked.text == "asked: what?"

        tg.push(tg.text_message(ANN, f"hey @{tg.username} 👋", chat=TEAM))
        await tg.wait_for_bot_message(TEAM.id, "you called?")

        tg.push(*tg.album(ANN, [PNG, PNG, PNG], chat=TEAM, caption="three"))
        await tg.wait_for(lambda: len(media_groups) == 3)
        assert len({group for group, _ in media_groups}) == 1
        assert sorted(media_groups, key=lambda g: g[1] is None)[0][1] == "three"
        assert [caption for _, caption in media_groups].count(None) == 2

        tg.push(
            tg.document_message(
                ANN, b"%PDF", file_name="big.pdf", mime_type="application/pdf", file_size=25 << 20
            )
        )
        refused = await tg.wait_for_bot_message(ANN.id, "cannot")
        assert refused.text == "cannot: File is too big"
        tg.push(tg.document_message(ANN, PNG, file_name="a.png", mime_type="image/png"))
        await tg.wait_for_bot_message(ANN.id, f"image/png, {len(PNG)} bytes")

        tg.push(tg.text_message(ANN, "and the colour?", chat=TEAM, reply_to=asked))
        await tg.wait_for_bot_message(TEAM.id, "re: asked: what?")

    assert tg.max_per_window(60, chat_id=TEAM.id) == 3


async def test_chat_members_chats_commands_actions_and_deletion(tg: FakeTelegram) -> None:
    bob = User(8, "Bob", "bob")
    tg.set_member_status(TEAM, ANN, "creator")
    tg.set_member_status(TEAM, bob, "administrator")
    tg.add_chat(Chat.private(bob))
    async with build(tg) as app:
        bot = app.bot
        assert isinstance(await bot.get_chat_member(TEAM.id, ANN.id), ChatMemberOwner)
        assert isinstance(await bot.get_chat_member(TEAM.id, bob.id), ChatMemberAdministrator)
        assert isinstance(await bot.get_chat_member(bob.id, bob.id), ChatMemberMember)
        assert (await bot.get_chat(TEAM.id)).title == "Team"
        with pytest.raises(BadRequest, match="Chat not found"):
            await bot.send_message(-42, "nobody here")

        await bot.set_my_commands([BotCommand("ask", "Ask about an image")])
        await bot.set_my_commands(
            [BotCommand("caption", "Caption an image")], scope=BotCommandScopeAllGroupChats()
        )
        assert [c.command for c in await bot.get_my_commands()] == ["ask"]
        assert tg.my_commands({"type": "all_group_chats"})[0]["command"] == "caption"
        with pytest.raises(BadRequest, match="Bot_command_invalid"):
            await bot.set_my_commands([BotCommand("Ask-Me", "bad name")])

        assert await bot.send_chat_action(bob.id, ChatAction.UPLOAD_PHOTO)
        sent = await bot.send_message(bob.id, "bye")
        assert await bot.delete_message(bob.id, sent.message_id)
        with pytest.raises(BadRequest, match="Message to delete not found"):
            await bot.delete_message(bob.id, sent.message_id)

    assert tg.message(bob.id, sent.message_id).deleted
    assert tg.calls("sendChatAction")[0].params["action"] == "upload_photo"


async def test_html_is_parsed_and_limits_are_enforced(tg: FakeTelegram) -> None:
    tg.add_chat(Chat.private(ANN))
    async with build(tg) as app:
        sent = await app.bot.send_message(
            ANN.id, "<b>cat</b> &amp; <i>dog</i>", parse_mode=ParseMode.HTML
        )
        with pytest.raises(BadRequest, match="parse entities"):
            await app.bot.send_message(ANN.id, "x < y <maybe>", parse_mode=ParseMode.HTML)
        with pytest.raises(BadRequest, match="Message is too long"):
            await app.bot.send_message(ANN.id, "a" * 4097)
        with pytest.raises(BadRequest, match="Message caption is too long"):
            await app.bot.send_photo(ANN.id, photo=PNG, caption="a" * 1025)
        with pytest.raises(BadRequest, match="Image_process_failed"):
            await app.bot.send_photo(ANN.id, photo=b"not an image")
        with pytest.raises(BadRequest, match="Button_data_invalid"):
            button = InlineKeyboardButton("x", callback_data="d" * 65)
            await app.bot.send_message(ANN.id, "k", reply_markup=InlineKeyboardMarkup([[button]]))

    assert sent.text == "cat & dog"
    assert [(e.type, e.offset, e.length) for e in sent.entities] == [
        ("bold", 0, 3),
        ("italic", 6, 3),
    ]
    assert [m.text for m in tg.bot_messages(ANN.id)] == ["cat & dog"]  # failures send nothing


async def test_rates_and_waiting(tg: FakeTelegram) -> None:
    tg.add_chat(Chat.private(ANN))
    async with build(tg) as app:
        for n in range(3):
            await app.bot.send_message(ANN.id, f"burst {n}")
    assert tg.max_per_window(1.0, chat_id=ANN.id) == 3
    assert tg.max_per_window(1.0, chat_id=TEAM.id) == 0

    def last() -> StoredMessage:
        return tg.last_bot_message(ANN.id)

    assert (await tg.wait_for(last)).text == "burst 2"
    with pytest.raises(AssertionError, match="not met within"):
        await tg.wait_for(lambda: tg.calls("sendPhoto"), timeout=0.05)


async def test_a_fresh_application_gets_a_redelivered_update(tg: FakeTelegram) -> None:
    seen: list[tuple[int, str | None]] = []

    async def record(update: Update, context: Context) -> None:
        assert update.message is not None
        seen.append((update.update_id, update.message.text))

    update = tg.text_message(ANN, "once")
    async with polling(tg, MessageHandler(filters.TEXT, record)):
        tg.push(update)
        await tg.wait_for(lambda: seen)
    # Telegram re-sends what a crashed bot never confirmed: same update_id, same message.
    tg.push(update)
    async with polling(tg, MessageHandler(filters.TEXT, record)):
        await tg.wait_for(lambda: len(seen) == 2)
    assert seen == [(update["update_id"], "once")] * 2
