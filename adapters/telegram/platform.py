"""``core.chat.port.Platform`` over python-telegram-bot's ``Bot``: sending, editing and
prompting in Telegram's terms. What to send is decided in ``core.chat``; this only
translates, and turns Telegram's 429 into ``PlatformBusy``."""

from __future__ import annotations

import datetime as dtm
from collections.abc import Awaitable, Callable
from typing import TypeVar

from telegram import (
    Bot,
    ForceReply,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    MessageEntity,
    ReplyParameters,
)
from telegram.constants import ChatAction, MessageEntityType
from telegram.error import BadRequest, RetryAfter

from core.chat.port import Keyboard, Limits, PlatformBusy
from core.ports import ChatRef

T = TypeVar("T")

# Telegram's own limits (https://core.telegram.org/bots/api, and its FAQ on broadcasting):
# 4096 characters a message, 1024 a caption, about one message a second in a chat and
# twenty a minute in a group, 20 MB per download from its server, 10 MB per photo upload.
TEXT_CHARS = 4096
CAPTION_CHARS = 1024
PHOTO_UPLOAD_BYTES = 10 * 1024 * 1024


class TelegramPlatform:
    name = "telegram"

    def __init__(self, bot: Bot, *, max_download_bytes: int) -> None:
        self._bot = bot
        self.limits = Limits(
            text_chars=TEXT_CHARS,
            caption_chars=CAPTION_CHARS,
            chat_interval_s=1.0,
            group_per_minute=20,
            max_download_bytes=max_download_bytes,
        )

    async def send_text(
        self, chat: ChatRef, text: str, *, reply_to: str | None = None, keyboard: Keyboard = ()
    ) -> str:
        message = await _calm(
            lambda: self._bot.send_message(
                chat_id=int(chat.chat_id),
                text=text,
                reply_parameters=_replying(reply_to),
                reply_markup=_markup(keyboard),
            )
        )
        return str(message.message_id)

    async def edit_text(
        self, chat: ChatRef, message_id: str, text: str, *, keyboard: Keyboard = ()
    ) -> None:
        try:
            await _calm(
                lambda: self._bot.edit_message_text(
                    text=text,
                    chat_id=int(chat.chat_id),
                    message_id=int(message_id),
                    reply_markup=_markup(keyboard),
                )
            )
        except BadRequest as error:
            # Telegram refuses an edit that changes nothing; for us that is success.
            if "not modified" not in error.message.lower():
                raise

    async def send_image(
        self,
        chat: ChatRef,
        png: bytes,
        caption: str,
        *,
        reply_to: str | None = None,
        keyboard: Keyboard = (),
    ) -> str:
        chat_id, replying, markup = int(chat.chat_id), _replying(reply_to), _markup(keyboard)
        message: Message
        if len(png) > PHOTO_UPLOAD_BYTES:
            # Too big for a photo: a document keeps every pixel anyway.
            document = InputFile(png, filename="captionbot.png")
            message = await _calm(
                lambda: self._bot.send_document(
                    chat_id,
                    document,
                    caption=caption,
                    reply_parameters=replying,
                    reply_markup=markup,
                )
            )
        else:
            message = await _calm(
                lambda: self._bot.send_photo(
                    chat_id, png, caption=caption, reply_parameters=replying, reply_markup=markup
                )
            )
        return str(message.message_id)

    async def prompt(
        self, chat: ChatRef, text: str, *, editable: str = "", reply_to: str | None = None
    ) -> str:
        body, entities = text, []
        if editable:
            # Shown as code: in Telegram a tap copies it, ready to edit in the reply.
            body = f"{text}\n\n{editable}"
            entities = [
                MessageEntity(
                    MessageEntityType.CODE,
                    offset=_utf16_length(f"{text}\n\n"),
                    length=_utf16_length(editable),
                )
            ]
        message = await _calm(
            lambda: self._bot.send_message(
                chat_id=int(chat.chat_id),
                text=body,
                entities=entities,
                reply_parameters=_replying(reply_to),
                reply_markup=ForceReply(selective=True, input_field_placeholder="Your text"),
            )
        )
        return str(message.message_id)

    async def typing(self, chat: ChatRef) -> None:
        await self._bot.send_chat_action(chat_id=int(chat.chat_id), action=ChatAction.TYPING)


async def _calm(call: Callable[[], Awaitable[T]]) -> T:
    """``call``, with Telegram's flood control as ``PlatformBusy`` for the outbox to wait."""
    try:
        return await call()
    except RetryAfter as busy:
        wait = busy.retry_after
        seconds = wait.total_seconds() if isinstance(wait, dtm.timedelta) else float(wait)
        raise PlatformBusy(seconds) from busy


def _replying(message_id: str | None) -> ReplyParameters | None:
    if message_id is None:
        return None
    # The message may be gone by the time the answer is ready: answer without it then.
    return ReplyParameters(int(message_id), allow_sending_without_reply=True)


def _markup(keyboard: Keyboard) -> InlineKeyboardMarkup | None:
    if not keyboard:
        return None
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton(b.label, callback_data=b.data) for b in row] for row in keyboard]
    )


def _utf16_length(text: str) -> int:
    # Telegram counts entity offsets in UTF-16 code units (an emoji can take two).
    return len(text.encode("utf-16-le")) // 2
