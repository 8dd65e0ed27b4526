"""The Discord adapter: discord.py events in, ``core.chat.ChatBot`` calls out.

Messages with images (attached, or a link's image preview Discord adds later) become
``ChatBot.images`` when they address the bot and ``ChatBot.posted`` otherwise (the
channel's settings decide); replies to the bot's prompts become ``ChatBot.text``. Slash
commands (``slash``) become ``ChatBot.command``, the "Describe image" menu
``ChatBot.alt_text``. Buttons and forms arrive in ``on_interaction`` by their custom ids,
on answers old or new: 🎨 and ❓ open a form (a modal must be the first answer to the press,
so nothing slow comes before it), the others become ``ChatBot.button``. What to answer and
how is decided in ``core.chat``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mimetypes
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, cast

import discord
from discord import app_commands

from adapters.discord import slash
from adapters.discord.platform import DiscordPlatform, incoming_image
from core import metrics
from core.chat.bot import ChatBot
from core.chat.port import Form, IncomingImage, Replied
from core.ports import ChatRef, UserRef
from core.service import Service
from core.settings import DiscordSettings
from core.types import Origin

logger = logging.getLogger(__name__)


class _RateLimitCounter(logging.Filter):
    """Counts Discord's 429s for the metrics. discord.py waits them out itself and says so
    only in its log (at WARNING, which this needs to stay enabled); nothing is filtered."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_RATE_LIMIT_LINES):
            metrics.RATE_LIMITED.labels("discord").inc()
        return True


_RATE_LIMIT_LINES = ("We are being rate limited.", "Global rate limit has been hit.")
logging.getLogger("discord.http").addFilter(_RateLimitCounter())

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
        self.client.event(self.on_message_edit)
        self.client.event(self.on_ready)
        self._recovery: asyncio.Task[int] | None = None
        # Kept as ``client.tree``, where discord.py (and simcord) look for it.
        self.tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(self.client)
        self.client.tree = self.tree  # type: ignore[attr-defined]
        slash.register(
            self.tree,
            self._slash,
            describe_menu=self._describe_menu,
            reimagine_menu=self._reimagine_menu,
        )
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
        if not await self._admitted(interaction):
            return
        await interaction.response.defer(thinking=True)
        images = [incoming_image(image)] if image is not None else []
        await self.chatbot.command(
            f"discord:{interaction.id}",
            self._interaction_origin(interaction),
            name,
            arguments,
            images,
            strength=strength,
            seed=seed,
        )

    # -- context menus ----------------------------------------------------------------------

    async def _describe_menu(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        """Alt text on demand: the caption and the text in each image of ``message``."""
        if not await self._admitted(interaction) or not await self._has_image(interaction, message):
            return
        await interaction.response.defer(thinking=True)
        pictures = [i for i in self._images(message) if (i.mime or "").startswith("image/")]
        origin = self._interaction_origin(interaction, about=message)
        await self.chatbot.alt_text(f"discord:{interaction.id}", origin, pictures)

    async def _reimagine_menu(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        """A form offering the image's caption (when already known) to edit into the new
        image's text: a form must be the first answer, so nothing slow comes before it."""
        if not await self._admitted(interaction) or not await self._has_image(interaction, message):
            return
        form = await self.chatbot.form_for_message(
            self._interaction_origin(interaction, about=message)
        )
        await interaction.response.send_modal(_modal(form, f"m{message.id}"))

    async def _has_image(self, interaction: discord.Interaction, message: discord.Message) -> bool:
        me = self.client.user
        if any(i.mime and i.mime.startswith("image/") for i in self._images(message)) or (
            me is not None and message.author.id == me.id
        ):
            return True
        await interaction.response.send_message("That message has no image.", ephemeral=True)
        return False

    # -- forms ------------------------------------------------------------------------------

    async def _form_submitted(self, interaction: discord.Interaction, custom_id: str) -> None:
        _, kind, about = custom_id.split(":", 2) if custom_id.count(":") >= 2 else ("", "", "")
        text = _field_value(cast(dict[str, Any], interaction.data or {}), _FIELD)
        if kind not in _FORM_KINDS or not _FORM_ABOUT.fullmatch(about) or not text.strip():
            await interaction.response.send_message(
                "This form is from an older version of the bot; use the buttons again.",
                ephemeral=True,
            )
            return
        await interaction.response.defer(thinking=True)
        event = f"discord:{interaction.id}"
        if about.startswith("a"):  # an answer's buttons opened it
            origin = self._interaction_origin(interaction)
            await self.chatbot.submitted(event, origin, kind, text, handle=about[1:])
            return
        images: list[IncomingImage] = []  # a context menu on a message opened it
        channel = interaction.channel
        if isinstance(channel, discord.abc.Messageable):
            try:
                target = await channel.fetch_message(int(about[1:]))
            except discord.HTTPException:
                target = None  # deleted meanwhile: whatever the bot knows of it still works
            if target is not None:
                images = [i for i in self._images(target) if (i.mime or "").startswith("image/")]
        origin = self._interaction_origin(interaction, about=about[1:])
        await self.chatbot.submitted(event, origin, kind, text, images=images)

    # -- interactions, shared ---------------------------------------------------------------

    async def _admitted(self, interaction: discord.Interaction) -> bool:
        """Whether the bot answers this user here; if not, the user is told, privately."""
        channel = interaction.channel
        if channel is not None and self._allowed(interaction.user, channel):
            return True
        await interaction.response.send_message(
            "This bot does not answer you here.", ephemeral=True
        )
        return False

    def _interaction_origin(
        self,
        interaction: discord.Interaction,
        *,
        about: discord.Message | str | None = None,
        message_id: str | None = None,
    ) -> Origin:
        """Who used a command, menu, button or form, and where. Answers go to the
        interaction (``DiscordPlatform.deferred``) unless ``message_id`` names the message
        it came from; ``about`` is the message a context menu was used on."""
        channel = interaction.channel
        assert channel is not None  # checked by _admitted
        target = about.id if isinstance(about, discord.Message) else about
        return Origin(
            UserRef("discord", str(interaction.user.id)),
            ChatRef("discord", str(channel.id)),
            message_id=message_id or self.platform.deferred(interaction),
            reply_to=None if target is None else str(target),
            author=interaction.user.display_name,
            chat_title=getattr(channel, "name", "") or "",
            private=isinstance(channel, discord.DMChannel),
            chat_admin=_manages_server(interaction.user),
        )

    # -- messages ---------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if message.author.bot or me is None or not self._allowed(message.author, message.channel):
            return
        images = self._images(message)
        replied = await self._replied(message)
        if images:
            await self._arrived(f"discord:{message.id}", message, images, replied)
        elif replied is not None and replied.by_bot:
            origin = self._origin(message)
            await self.chatbot.text(f"discord:{message.id}", origin, message.content, replied)

    async def on_message_edit(self, before: discord.Message, after: discord.Message) -> None:
        """Discord adds a link's image preview to a message after it was posted: the new
        embedded images are taken as if they had come with it."""
        me = self.client.user
        if after.author.bot or me is None or not self._allowed(after.author, after.channel):
            return
        had = len(_embedded(before))
        added = [
            image for image in self._images(after) if image.position >= had + len(after.attachments)
        ]
        if added:
            event = f"discord:{after.id}:embed{had}"
            await self._arrived(event, after, added, await self._replied(after))

    async def _arrived(
        self,
        event: str,
        message: discord.Message,
        images: list[IncomingImage],
        replied: Replied | None,
    ) -> None:
        origin = self._origin(message)
        if origin.private or self._addressed(message, replied):
            await self.chatbot.images(event, origin, images)
        else:
            await self.chatbot.posted(event, origin, images)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Buttons and forms, by their custom ids: on answers from before a restart too
        (discord.py keeps no view of its own for them)."""
        data = cast(dict[str, Any], interaction.data or {})
        custom_id = data.get("custom_id")
        if not isinstance(custom_id, str):
            return
        if interaction.type is discord.InteractionType.modal_submit:
            if custom_id.startswith(_FORM) and await self._admitted(interaction):
                await self._form_submitted(interaction, custom_id)
            return
        message = interaction.message
        if interaction.type is not discord.InteractionType.component or message is None:
            return
        if not await self._admitted(interaction):
            return
        origin = self._interaction_origin(interaction, message_id=str(message.id))
        form = await self.chatbot.form_for_button(origin, custom_id)
        if form is not None:  # a form must be the first answer to the press
            handle = custom_id.partition(":")[2]
            await interaction.response.send_modal(_modal(form, f"a{handle}"))
            return
        # Discord wants an answer within 3 s; the press's work (a new caption) may take longer.
        await interaction.response.defer()

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
        return Replied(by_bot, replied.content, self._images(replied))

    def _images(self, message: discord.Message) -> list[IncomingImage]:
        """Every attachment, then every embedded image, in order; ChatBot refuses what is
        not an image by its type, and an embedded image's size once downloaded."""
        found = [
            incoming_image(attachment, position, str(message.id))
            for position, attachment in enumerate(message.attachments)
        ]
        http = self.client.http
        for address in _embedded(message):
            name = urllib.parse.urlsplit(address).path.rsplit("/", 1)[-1] or "image"
            found.append(
                IncomingImage(
                    name,
                    None,  # Discord does not say; the download is checked instead
                    mimetypes.guess_type(name)[0] or "image/*",
                    functools.partial(http.get_from_cdn, address),
                    position=len(found),
                    message_id=str(message.id),
                )
            )
        return found

    def _addressed(self, message: discord.Message, replied: Replied | None) -> bool:
        me = self.client.user
        mentioned = me is not None and any(user.id == me.id for user in message.mentions)
        return mentioned or (replied is not None and replied.by_bot)

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

    async def on_ready(self) -> None:
        """Connected (Discord says so again after a new session: recovered once)."""
        if self._recovery is None:
            # What a previous run accepted but did not finish is answered now, once.
            self._recovery = asyncio.create_task(self.chatbot.recover(), name="discord-recovery")

    def connected(self) -> bool:
        """Logged in, with the gateway session up (discord.py reconnects by itself)."""
        return self.client.is_ready() and not self.client.is_closed()

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # reported by recover
                await self._recovery
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


def _embedded(message: discord.Message) -> list[str]:
    """The addresses of a message's embedded images (a link's image preview), through
    Discord's media proxy: never a request from the bot to a host a user chose."""
    found = []
    for embed in message.embeds:
        if embed.type != "image":  # articles' thumbnails, videos: not the image posted
            continue
        for picture in (embed.image, embed.thumbnail):
            if picture.proxy_url:
                found.append(picture.proxy_url)
                break
    return found


def _manages_server(user: discord.User | discord.Member) -> bool:
    permissions = getattr(user, "guild_permissions", None)
    return bool(permissions is not None and permissions.manage_guild)


_FORM = "form:"
_FORM_KINDS = ("reimagine", "ask")
# What a form is about: ``a`` and an answer's handle, or ``m`` and a message id.
_FORM_ABOUT = re.compile(r"a[A-Za-z0-9_-]{1,64}|m[0-9]{1,20}")
_FIELD = "text"


def _modal(form: Form, about: str) -> discord.ui.Modal:
    """The form as a modal whose custom id says what it is for (``about``: ``a`` and an
    answer's handle, or ``m`` and a message id), so a submission is understood by any run
    of the bot; discord.py is not asked to keep it."""
    modal = discord.ui.Modal(title=form.title[:45], custom_id=f"{_FORM}{form.kind}:{about}")
    modal.add_item(
        discord.ui.TextInput(
            label=form.label[:45],
            custom_id=_FIELD,
            style=discord.TextStyle.paragraph,
            default=form.text or None,
            max_length=min(form.max_chars, 4000),
        )
    )
    modal.stop()
    return modal


def _field_value(data: dict[str, Any], custom_id: str) -> str:
    """A submitted modal's text input, wherever its layout nests it."""
    stack: list[Any] = [data.get("components", [])]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if item.get("custom_id") == custom_id and isinstance(item.get("value"), str):
                return str(item["value"])
            stack.extend(value for value in item.values() if isinstance(value, list | dict))
    return ""
