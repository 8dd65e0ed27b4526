"""``core.chat.port.Platform`` over a discord.py ``Client``: sending, editing and prompting
in Discord's terms. What to send is decided in ``core.chat``; this only translates.
discord.py waits out Discord's 429s itself, so ``PlatformBusy`` is never raised here."""

from __future__ import annotations

import datetime
import io
import mimetypes
from dataclasses import dataclass
from typing import Any

import discord

from core.chat.port import IncomingImage, Keyboard, Limits
from core.ports import ChatRef

# Discord's own limits: 2000 characters a message; members upload 10 MB (more with boosts).
TEXT_CHARS = 2000
# Discord allows about five messages in five seconds per channel; edits count the same.
CHAT_INTERVAL_S = 1.0
# Discord has no per-minute cap like Telegram's groups: the interval above is the bound.
CHANNEL_PER_MINUTE = 60
NO_MENTIONS = discord.AllowedMentions.none()
# The channels a bot's answers can go to: all can fetch a partial message to edit.
Sendable = discord.TextChannel | discord.Thread | discord.DMChannel | discord.VoiceChannel


# An interaction's token answers it for 15 minutes from its creation (discord.py's
# ``expires_at``); stop using it a little early, for the clocks' difference.
TOKEN_MARGIN = datetime.timedelta(seconds=30)
_DEFERRED = "interaction-"


@dataclass
class _Deferred:
    """A slash command or menu that was deferred, waiting for its answer."""

    interaction: discord.Interaction
    answered: bool = False

    def usable(self) -> bool:
        return discord.utils.utcnow() < self.interaction.expires_at - TOKEN_MARGIN


class DiscordPlatform:
    name = "discord"

    def __init__(self, client: discord.Client, *, max_download_bytes: int) -> None:
        self._client = client
        self.limits = Limits(
            text_chars=TEXT_CHARS,
            caption_chars=TEXT_CHARS,
            chat_interval_s=CHAT_INTERVAL_S,
            group_per_minute=CHANNEL_PER_MINUTE,
            max_download_bytes=max_download_bytes,
        )
        self._deferred: dict[str, _Deferred] = {}

    def deferred(self, interaction: discord.Interaction) -> str:
        """A stand-in message id for a deferred interaction, to reply to: the first
        message replying to it completes the deferral, later ones are its follow-ups, and
        once its token has expired they are plain channel messages."""
        for key in [key for key, waiting in self._deferred.items() if not waiting.usable()]:
            del self._deferred[key]
        key = f"{_DEFERRED}{interaction.id}"
        self._deferred[key] = _Deferred(interaction)
        return key

    async def send_text(
        self, chat: ChatRef, text: str, *, reply_to: str | None = None, keyboard: Keyboard = ()
    ) -> str:
        return await self._reply(chat, text, reply_to, buttons_of(keyboard))

    async def edit_text(
        self, chat: ChatRef, message_id: str, text: str, *, keyboard: Keyboard = ()
    ) -> None:
        channel = await self._channel(chat)
        await channel.get_partial_message(int(message_id)).edit(
            content=text, view=buttons_of(keyboard), allowed_mentions=NO_MENTIONS
        )

    async def send_image(
        self,
        chat: ChatRef,
        png: bytes,
        caption: str,
        *,
        reply_to: str | None = None,
        keyboard: Keyboard = (),
    ) -> str:
        image = discord.File(io.BytesIO(png), "reimagined.png")
        return await self._reply(chat, caption, reply_to, buttons_of(keyboard), image)

    async def prompt(
        self, chat: ChatRef, text: str, *, editable: str = "", reply_to: str | None = None
    ) -> str:
        # Discord has no forced reply: the prompt asks for a reply, and the text to edit
        # comes in a code block, which Discord offers to copy.
        body = f"{text}\n```\n{editable}\n```" if editable else text
        return await self.send_text(chat, body, reply_to=reply_to)

    async def typing(self, chat: ChatRef) -> None:
        channel = await self._channel(chat)
        await channel.typing()

    async def _reply(
        self,
        chat: ChatRef,
        content: str,
        reply_to: str | None,
        view: discord.ui.View,
        file: discord.File | None = None,
    ) -> str:
        waiting = self._deferred.get(reply_to or "")
        if waiting is not None and waiting.usable():
            interaction = waiting.interaction
            if not waiting.answered:
                waiting.answered = True
                first = await interaction.edit_original_response(
                    content=content,
                    view=view,
                    allowed_mentions=NO_MENTIONS,
                    attachments=[] if file is None else [file],  # a deferral has none yet
                )
                return str(first.id)
            sent = await interaction.followup.send(
                content,
                view=view,
                allowed_mentions=NO_MENTIONS,
                wait=True,
                files=[] if file is None else [file],
            )
            return str(sent.id)
        if reply_to is not None and reply_to.startswith(_DEFERRED):
            # Expired, or deferred before a restart: the answer stands on its own.
            reply_to = None
        channel = await self._channel(chat)
        return await _send(channel, content, _reference(chat, reply_to), view, file)

    async def _channel(self, chat: ChatRef) -> Sendable:
        found = self._client.get_channel(int(chat.chat_id))
        if found is None:
            found = await self._client.fetch_channel(int(chat.chat_id))
        if not isinstance(found, Sendable):
            raise TypeError(f"Discord channel {chat.chat_id} cannot take the bot's answers")
        return found


def buttons_of(keyboard: Keyboard) -> discord.ui.View:
    """The keyboard as message components. Presses are handled by custom id in the
    adapter's interaction handler, not by this object, so that buttons work the same on
    answers from before a restart; stopping it keeps discord.py from holding every view
    it ever sent in memory."""
    view = discord.ui.View(timeout=None)
    for row, buttons in enumerate(keyboard):
        for button in buttons:
            view.add_item(discord.ui.Button(label=button.label, custom_id=button.data, row=row))
    view.stop()
    return view


def incoming_image(
    attachment: discord.Attachment, position: int = 0, message_id: str | None = None
) -> IncomingImage:
    """An attachment, before it is downloaded; its type guessed from its name when Discord
    does not say (ChatBot refuses what is not an image by it)."""
    return IncomingImage(
        attachment.filename,
        attachment.size,
        attachment.content_type or mimetypes.guess_type(attachment.filename)[0],
        attachment.read,
        position=position,
        alt=attachment.description or "",
        message_id=message_id,
    )


def _reference(chat: ChatRef, message_id: str | None) -> discord.MessageReference | None:
    """What makes a message a reply (still sent if the replied-to one is gone)."""
    if message_id is None:
        return None
    return discord.MessageReference(
        message_id=int(message_id), channel_id=int(chat.chat_id), fail_if_not_exists=False
    )


async def _send(
    channel: Sendable,
    content: str,
    reference: discord.MessageReference | None,
    view: discord.ui.View,
    file: discord.File | None = None,
) -> str:
    # discord.py takes "no reference" and "no file" only as absent arguments.
    extra: dict[str, Any] = {}
    if reference is not None:
        extra["reference"] = reference
    if file is not None:
        extra["file"] = file
    message = await channel.send(content, view=view, allowed_mentions=NO_MENTIONS, **extra)
    return str(message.id)
