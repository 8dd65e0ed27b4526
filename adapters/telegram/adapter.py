"""The Telegram adapter: python-telegram-bot updates in, ``core.chat.ChatBot`` calls out.

Every update goes to one handler, which finds what it carries (a command, images, a reply
to one of the bot's prompts, a button) and who sent it where, and hands that to the
ChatBot; everything else about answering is in ``core.chat``. The ``Application`` runs in
the bot's own event loop with the manual lifecycle (initialize, start, polling or a
webhook; then stop, shutdown), with updates handled concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import re
import time

from aiohttp import web
from telegram import (
    BotCommand,
    CallbackQuery,
    Chat,
    ChatMember,
    Message,
    MessageEntity,
    Update,
)
from telegram.constants import ChatType, MessageEntityType, UpdateType
from telegram.ext import Application, ApplicationBuilder, ContextTypes, TypeHandler

from adapters.telegram.platform import TelegramPlatform
from core.chat import commands
from core.chat.bot import ChatBot
from core.chat.port import IncomingImage, Replied
from core.ports import ChatRef, UserRef
from core.service import Service
from core.settings import TelegramSettings
from core.types import Origin

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
# Telegram sends an album as one message per photo, and only the first carries the caption
# (the mention, in a group): the photos wait this long for the rest of their album.
ALBUM_WAIT_S = 0.8
_ADMINS = (ChatMember.OWNER, ChatMember.ADMINISTRATOR)
_UPDATES = [UpdateType.MESSAGE, UpdateType.CALLBACK_QUERY]


class TelegramAdapter:
    """Use as ``async with TelegramAdapter(service, settings, token):``."""

    def __init__(self, service: Service, settings: TelegramSettings, token: str) -> None:
        # PTB 22 reports durations (a 429's retry_after) as timedelta when this is set, and
        # warns on every read otherwise.
        os.environ.setdefault("PTB_TIMEDELTA", "true")
        self._service = service
        self._settings = settings
        builder = (
            ApplicationBuilder()
            .token(token)
            .base_url(settings.api_base_url)
            .base_file_url(settings.file_base_url)
            # Handlers wait on models: one update must not hold up the others.
            .concurrent_updates(True)
        )
        if settings.mode == "webhook":
            builder = builder.updater(None)  # updates come from our own webhook server
        self._application: Application = builder.build()  # type: ignore[type-arg]
        self._platform = TelegramPlatform(
            self._application.bot, max_download_bytes=int(settings.max_download_mb * _MB)
        )
        self.chatbot = ChatBot(service, self._platform)
        self._username = ""
        self._bot_id = 0
        self._webhook: web.AppRunner | None = None
        self._recovery: asyncio.Task[int] | None = None
        self._albums: dict[str, _Album] = {}

    async def __aenter__(self) -> TelegramAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        application = self._application
        application.add_handler(TypeHandler(Update, self._on_update))
        application.add_error_handler(self._on_error)
        await application.initialize()
        try:
            me = application.bot.bot
            self._username, self._bot_id = me.username, me.id
            self.chatbot.bot_username = self._username
            await application.bot.set_my_commands(
                [BotCommand(c.name, c.summary) for c in commands.COMMANDS]
            )
            await application.start()
            if self._settings.mode == "webhook":
                await self._start_webhook()
            else:
                assert application.updater is not None
                await application.updater.start_polling(allowed_updates=_UPDATES)
        except BaseException:
            await application.shutdown()
            raise
        logger.info("telegram: up as @%s (%s)", self._username, self._settings.mode)
        self._recovery = asyncio.create_task(self.chatbot.recover(), name="telegram-recovery")

    def connected(self) -> bool:
        """Receiving updates: polling, or the webhook listener up."""
        application = self._application
        polling = application.updater is not None and application.updater.running
        return application.running and (polling or self._webhook is not None)

    async def stop(self) -> None:
        application = self._application
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._recovery
        if application.updater is not None and application.updater.running:
            await application.updater.stop()
        if self._webhook is not None:
            await self._webhook.cleanup()
        if application.running:
            await application.stop()
        await application.shutdown()

    # -- updates ---------------------------------------------------------------------------

    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Translate one update into one ChatBot call."""
        if update.callback_query is not None:
            await self._on_button(update.callback_query)
            return
        message = update.message
        if message is None or message.from_user is None:
            return
        if not self._allowed(message.from_user.id, message.chat.id):
            return
        event = f"telegram:{update.update_id}"
        text = message.text or message.caption or ""
        said = commands.parse(text, self._username)
        images = self._images(message)
        if said is not None:
            origin = await self._origin(message, admin=said.name == "settings")
            if not images and _from_someone_else(message.reply_to_message, self._bot_id):
                # A photo the bot may never have seen (a group's, not addressed to it).
                assert message.reply_to_message is not None
                images = self._images(message.reply_to_message)
            await self.chatbot.command(event, origin, said.name, said.arguments, images)
        elif images:
            origin = await self._origin(message)
            album = self._album(message)
            if album is None:
                if origin.private or self._addressed(message):
                    await self.chatbot.images(event, origin, images)
                else:
                    await self.chatbot.posted(event, origin, images)
                return
            album.addressed |= self._addressed(message)
            await asyncio.sleep(max(0.0, album.started + ALBUM_WAIT_S - time.monotonic()))
            # One after another: an album is one request, not one per photo against the
            # sender's limit on requests at once.
            async with album.turns:
                if origin.private or album.addressed:
                    await self.chatbot.images(event, origin, images)
                else:
                    await self.chatbot.posted(event, origin, images)
        elif message.text is not None:
            await self._on_text(event, message)

    async def _on_text(self, event: str, message: Message) -> None:
        replied = message.reply_to_message
        about = None
        if replied is not None:
            by_bot = not _from_someone_else(replied, self._bot_id)
            about = Replied(by_bot, replied.text, self._images(replied))
        assert message.text is not None
        await self.chatbot.text(event, await self._origin(message), message.text, about)

    def _album(self, message: Message) -> _Album | None:
        """The album ``message`` belongs to, if any, shared by its sibling photos."""
        group = message.media_group_id
        if group is None:
            return None
        album = self._albums.get(group)
        if album is None:
            album = self._albums[group] = _Album()
            # Every sibling arrives within ALBUM_WAIT_S and keeps its own reference.
            asyncio.get_running_loop().call_later(ALBUM_WAIT_S * 4, self._albums.pop, group, None)
        return album

    async def _on_button(self, query: CallbackQuery) -> None:
        message = query.message
        if not isinstance(message, Message) or query.data is None:
            await query.answer()
            return
        if not self._allowed(query.from_user.id, message.chat.id):
            await query.answer("This bot does not answer you here.")
            return
        chat = message.chat
        origin = Origin(
            UserRef("telegram", str(query.from_user.id)),
            ChatRef("telegram", str(chat.id)),
            message_id=str(message.message_id),
            author=_author(query.from_user.username, query.from_user.first_name),
            chat_title=chat.title or "",
            private=chat.type == ChatType.PRIVATE,
            chat_admin=query.data.startswith("st:")
            and await self._is_admin(chat, query.from_user.id),
        )

        async def acknowledge(note: str) -> None:
            await query.answer(note or None)

        await self.chatbot.button(origin, query.data, acknowledge)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        logger.error("telegram: an update failed", exc_info=context.error)

    # -- reading a message -------------------------------------------------------------------

    async def _origin(self, message: Message, *, admin: bool = False) -> Origin:
        chat, user = message.chat, message.from_user
        assert user is not None
        return Origin(
            UserRef("telegram", str(user.id)),
            ChatRef("telegram", str(chat.id)),
            message_id=str(message.message_id),
            reply_to=(
                str(message.reply_to_message.message_id)
                if message.reply_to_message is not None
                else None
            ),
            author=_author(user.username, user.first_name),
            chat_title=chat.title or "",
            private=chat.type == ChatType.PRIVATE,
            # Asked only where it matters: it costs a call to Telegram.
            chat_admin=admin and await self._is_admin(chat, user.id),
        )

    def _images(self, message: Message) -> list[IncomingImage]:
        bot = self._application.bot
        if message.photo:
            largest = message.photo[-1]  # sizes come smallest first

            async def photo() -> bytes:
                return bytes(await (await bot.get_file(largest.file_id)).download_as_bytearray())

            return [IncomingImage("photo.jpg", largest.file_size, "image/jpeg", photo)]
        document = message.document
        if document is not None:
            file_id = document.file_id

            async def attached() -> bytes:
                return bytes(await (await bot.get_file(file_id)).download_as_bytearray())

            return [
                IncomingImage(
                    document.file_name or "image",
                    document.file_size,
                    document.mime_type,
                    attached,
                )
            ]
        return []

    def _addressed(self, message: Message) -> bool:
        """In a group: the message mentions the bot, or replies to it."""
        replied = message.reply_to_message
        if (
            replied is not None
            and replied.from_user is not None
            and replied.from_user.id == (self._bot_id)
        ):
            return True
        mentions = message.parse_entities([MessageEntityType.MENTION]) | (
            message.parse_caption_entities([MessageEntityType.MENTION])
        )
        return any(
            text.lower() == f"@{self._username}".lower() for text in mentions.values()
        ) or any(
            entity.user is not None and entity.user.id == self._bot_id
            for entity in (*message.entities, *message.caption_entities)
            if entity.type == MessageEntity.TEXT_MENTION
        )

    def _allowed(self, user_id: int, chat_id: int) -> bool:
        users, chats = self._settings.allowed_users, self._settings.allowed_chats
        if users and str(user_id) not in users:
            return False
        return not chats or str(chat_id) in chats

    async def _is_admin(self, chat: Chat, user_id: int) -> bool:
        if chat.type == ChatType.PRIVATE:
            return True
        member = await self._application.bot.get_chat_member(chat.id, user_id)
        return member.status in _ADMINS

    # -- webhook ---------------------------------------------------------------------------

    async def _start_webhook(self) -> None:
        secret = os.environ.get(self._settings.webhook_secret_env, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise RuntimeError(
                f"telegram webhook mode needs a secret in {self._settings.webhook_secret_env}: "
                "1 to 256 characters, letters, digits, _ and - (Telegram's rule)"
            )
        application = self._application

        async def receive(request: web.Request) -> web.Response:
            # Only Telegram knows the secret: anything else posting here is refused.
            given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
            if not hmac.compare_digest(given.encode(), secret.encode()):
                return web.Response(status=403)
            try:
                body = await request.json()
                update = Update.de_json(body, application.bot) if isinstance(body, dict) else None
            except (ValueError, KeyError, TypeError):
                update = None
            if update is None:
                return web.Response(status=400, text="not a Telegram update")
            await application.update_queue.put(update)
            return web.Response()

        app = web.Application()
        path = "/" + self._settings.webhook_url.split("://", 1)[1].partition("/")[2]
        app.router.add_post(path, receive)
        runner = web.AppRunner(app)
        await runner.setup()
        host, _, port = self._settings.webhook_listen.rpartition(":")
        await web.TCPSite(runner, host, int(port)).start()
        self._webhook = runner
        await application.bot.set_webhook(
            self._settings.webhook_url, secret_token=secret, allowed_updates=_UPDATES
        )


@dataclasses.dataclass
class _Album:
    """What the photos of one album, arriving one message each, learn from each other."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    addressed: bool = False
    turns: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


def _from_someone_else(message: Message | None, bot_id: int) -> bool:
    return message is not None and (message.from_user is None or message.from_user.id != bot_id)


def _author(username: str | None, first_name: str) -> str:
    return f"@{username}" if username else first_name
