"""The Discord adapter: discord.py events in, ``core.chat.ChatBot`` calls out.

Messages with images (in a DM, mentioning the bot, replying to it, or in a channel that
describes every image) become ``ChatBot.images``; replies to the bot's prompts become
``ChatBot.text``; every button press, on answers old or new, arrives in
``on_interaction`` by its custom id and becomes ``ChatBot.button``. What to answer and
how is decided in ``core.chat``.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Awaitable, Callable
from typing import Any, cast

import discord
from discord import app_commands

from adapters.discord import slash
from adapters.discord.platform import DiscordPlatform
from core.chat.bot import ChatBot
from core.chat.port import IncomingImage, Replied
from core.ports import ChatRef, UserRef
from core.service import Service
from core.settings import DiscordSettings
from core.types import Origin

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
# What works without the message-content intent, said once at start when it is missing.
NO_CONTENT_INTENT = (
    "discord: the Message Content intent is not enabled for this bot, so images posted in "
    "servers are not seen unless the message mentions the bot (DMs still work); enable it "
    "in the Developer Portal under Bot > Privileged Gateway Intents"
)


class DiscordAdapter:
    """Build, then ``connect`` with a way to run the client (``client.start`` in
    production, a simulated Discord in tests); ``close`` at the end."""

    def __init__(
        self, service: Service, settings: DiscordSettings, *, message_content: bool = True
    ) -> None:
        self._service = service
        self._settings = settings
        intents = discord.Intents.default()
        intents.message_content = message_content
        self.client = discord.Client(
            intents=intents, allowed_mentions=discord.AllowedMentions.none()
        )
        self.client.event(self.on_message)
        self.client.event(self.on_interaction)
        # Kept as ``client.tree``, where discord.py (and simcord) look for it.
        self.tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(self.client)
        self.client.tree = self.tree  # type: ignore[attr-defined]
        slash.register(self.tree, self._slash)
        self.client.setup_hook = self._setup  # type: ignore[method-assign]
        self.platform = DiscordPlatform(
            self.client, max_download_bytes=int(settings.max_download_mb * _MB)
        )
        self.chatbot = ChatBot(service, self.platform)
        if not message_content:
            logger.warning(NO_CONTENT_INTENT)

    async def _setup(self) -> None:
        test_guild = self._settings.test_guild
        await slash.sync_if_changed(
            self.tree, discord.Object(int(test_guild)) if test_guild else None
        )

    # -- slash commands ---------------------------------------------------------------------

    async def _slash(
        self,
        interaction: discord.Interaction,
        name: str,
        arguments: str,
        image: discord.Attachment | None,
        strength: float | None,
        seed: int | None,
    ) -> None:
        channel = interaction.channel
        if channel is None or not self._allowed(interaction.user, channel):
            await interaction.response.send_message(
                "This bot does not answer you here.", ephemeral=True
            )
            return
        await interaction.response.defer(thinking=True)
        origin = Origin(
            UserRef("discord", str(interaction.user.id)),
            ChatRef("discord", str(channel.id)),
            message_id=self.platform.deferred(interaction),
            author=interaction.user.display_name,
            chat_title=getattr(channel, "name", "") or "",
            private=isinstance(channel, discord.DMChannel),
            chat_admin=_manages_server(interaction.user),
        )
        images = [slash.attached(image)] if image is not None else []
        await self.chatbot.command(
            f"discord:{interaction.id}",
            origin,
            name,
            arguments,
            images,
            strength=strength,
            seed=seed,
        )

    # -- messages ---------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if message.author.bot or me is None or not self._allowed(message.author, message.channel):
            return
        event = f"discord:{message.id}"
        origin = self._origin(message)
        images = _images(message)
        replied = await self._replied(message)
        if images:
            if origin.private or self._addressed(message, replied):
                await self.chatbot.images(event, origin, images)
            elif await self._auto(origin):
                # Described unasked: other files in the channel are none of the bot's business.
                pictures = [i for i in images if (i.mime or "").startswith("image/")]
                if pictures:
                    await self.chatbot.images(event, origin, pictures)
        elif replied is not None and replied.by_bot:
            await self.chatbot.text(event, origin, message.content, replied)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        if interaction.type is not discord.InteractionType.component:
            return
        data = cast(dict[str, Any], interaction.data or {})
        custom_id = data.get("custom_id")
        message = interaction.message
        if not isinstance(custom_id, str) or message is None or interaction.channel is None:
            return
        if not self._allowed(interaction.user, interaction.channel):
            await interaction.response.send_message(
                "This bot does not answer you here.", ephemeral=True
            )
            return
        # Discord wants an answer within 3 s; the press's work (a new caption) may take longer.
        await interaction.response.defer()
        origin = Origin(
            UserRef("discord", str(interaction.user.id)),
            ChatRef("discord", str(interaction.channel.id)),
            message_id=str(message.id),
            author=interaction.user.display_name,
            chat_title=getattr(interaction.channel, "name", "") or "",
            private=isinstance(interaction.channel, discord.DMChannel),
            chat_admin=_manages_server(interaction.user),
        )

        async def acknowledge(note: str) -> None:
            if note:
                await interaction.followup.send(note, ephemeral=True)

        await self.chatbot.button(origin, custom_id, acknowledge)

    # -- reading a message -------------------------------------------------------------------

    def _origin(self, message: discord.Message) -> Origin:
        reference = message.reference
        return Origin(
            UserRef("discord", str(message.author.id)),
            ChatRef("discord", str(message.channel.id)),
            message_id=str(message.id),
            reply_to=(
                str(reference.message_id)
                if reference is not None and reference.message_id is not None
                else None
            ),
            author=message.author.display_name,
            chat_title=getattr(message.channel, "name", "") or "",
            private=isinstance(message.channel, discord.DMChannel),
            chat_admin=_manages_server(message.author),
        )

    async def _replied(self, message: discord.Message) -> Replied | None:
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        replied = reference.resolved
        if not isinstance(replied, discord.Message):
            try:
                replied = await message.channel.fetch_message(reference.message_id)
            except discord.HTTPException:
                return None
        me = self.client.user
        by_bot = me is not None and replied.author.id == me.id
        return Replied(by_bot, replied.content, _images(replied))

    def _addressed(self, message: discord.Message, replied: Replied | None) -> bool:
        me = self.client.user
        mentioned = me is not None and any(user.id == me.id for user in message.mentions)
        return mentioned or (replied is not None and replied.by_bot)

    async def _auto(self, origin: Origin) -> bool:
        return (await self._service.chat_settings(origin.chat)).auto_describe

    def _allowed(self, user: discord.User | discord.Member, channel: object) -> bool:
        settings = self._settings
        guild = getattr(channel, "guild", None)
        if guild is not None:
            if settings.allowed_guilds and str(guild.id) not in settings.allowed_guilds:
                return False
            channel_id = str(getattr(channel, "id", ""))
            parent = str(getattr(channel, "parent_id", "") or "")  # a thread counts as its channel
            listed = settings.allowed_channels
            if listed and channel_id not in listed and parent not in listed:
                return False
        if settings.allowed_roles:
            roles = {str(role.id) for role in getattr(user, "roles", ())}
            return bool(roles & set(settings.allowed_roles))
        return True

    # -- running -----------------------------------------------------------------------------

    async def close(self) -> None:
        if not self.client.is_closed():
            await self.client.close()


async def connected(
    service: Service,
    settings: DiscordSettings,
    connect: Callable[[discord.Client], Awaitable[None]],
) -> DiscordAdapter:
    """An adapter whose client ``connect`` brought online. Without the message-content
    intent approved for the application, Discord refuses the connection: then the bot
    says what that costs and connects without it, as slash commands and context menus
    need no message content."""
    adapter = DiscordAdapter(service, settings)
    try:
        await connect(adapter.client)
    except discord.PrivilegedIntentsRequired:
        await adapter.close()
        adapter = DiscordAdapter(service, settings, message_content=False)
        await connect(adapter.client)
    return adapter


def _images(message: discord.Message) -> list[IncomingImage]:
    """Every attachment, in order; ChatBot refuses what is not an image by its type."""
    found = []
    for position, attachment in enumerate(message.attachments):
        found.append(
            IncomingImage(
                attachment.filename,
                attachment.size,
                attachment.content_type or _guessed_type(attachment.filename),
                attachment.read,
                position=position,
            )
        )
    return found


def _guessed_type(filename: str) -> str | None:
    return mimetypes.guess_type(filename)[0]


def _manages_server(user: discord.User | discord.Member) -> bool:
    permissions = getattr(user, "guild_permissions", None)
    return bool(permissions is not None and permissions.manage_guild)
