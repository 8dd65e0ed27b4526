"""The bot's slash commands on Discord: their options in Discord's terms, and their sync.

Every command is deferred at once (Discord wants an answer within 3 s, a model run may
take longer) and then handed to ``ChatBot.command`` like a command typed on any platform;
its answer completes the deferral (``DiscordPlatform.deferred``). The command texts are
``core.chat.commands``'; only what Discord needs besides lives here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import discord
from discord import app_commands

from core.chat import commands

logger = logging.getLogger(__name__)

# What runs a command: (interaction, name, arguments, image, strength, seed).
Runner = Callable[
    [discord.Interaction, str, str, discord.Attachment | None, float | None, int | None],
    Awaitable[None],
]

_SUMMARIES = {command.name: command.summary for command in commands.COMMANDS}
_IMAGE = "The image (default: the last image in this channel)"


# What a message context menu runs: (interaction, the message it was used on).
MenuRunner = Callable[[discord.Interaction, discord.Message], Coroutine[Any, Any, None]]

DESCRIBE_MENU = "Describe image"
REIMAGINE_MENU = "Reimagine image"


def register(
    tree: app_commands.CommandTree[Any],
    run: Runner,
    *,
    describe_menu: MenuRunner,
    reimagine_menu: MenuRunner,
) -> None:
    """Add every command to ``tree``, each calling ``run``, and the two message context
    menus (right-click a message, Apps)."""
    tree.add_command(app_commands.ContextMenu(name=DESCRIBE_MENU, callback=describe_menu))
    tree.add_command(app_commands.ContextMenu(name=REIMAGINE_MENU, callback=reimagine_menu))

    def about(name: str) -> str:
        return _SUMMARIES[name][:100]  # Discord's limit for a description

    for name in ("caption", "ocr", "tags", "write"):
        tree.add_command(_image_command(name, about(name), run))

    @tree.command(name="ask", description=about("ask"))
    @app_commands.describe(question="What you want to know about the image", image=_IMAGE)
    async def ask(
        interaction: discord.Interaction,
        question: str,
        image: discord.Attachment | None = None,
    ) -> None:
        await run(interaction, "ask", question, image, None, None)

    @tree.command(name="reimagine", description=about("reimagine"))
    @app_commands.describe(
        text="What the new image shows",
        image=_IMAGE,
        strength="How far to move from the image, 0.1 (a little) to 1.0 (anything)",
        seed="The same seed and text give the same image",
    )
    async def reimagine(
        interaction: discord.Interaction,
        text: str,
        image: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.1, 1.0] | None = None,
        seed: app_commands.Range[int, 0, 2**32 - 1] | None = None,
    ) -> None:
        await run(interaction, "reimagine", text, image, strength, seed)

    @tree.command(name="imagine", description=about("imagine"))
    @app_commands.describe(text="What the image shows")
    async def imagine(interaction: discord.Interaction, text: str) -> None:
        await run(interaction, "imagine", text, None, None, None)

    @tree.command(name="settings", description=about("settings"))
    @app_commands.default_permissions(manage_guild=True)
    async def settings(interaction: discord.Interaction) -> None:
        await run(interaction, "settings", "", None, None, None)

    for name in ("usage", "forget", "help"):
        tree.add_command(_plain_command(name, about(name), run))


def _image_command(
    name: str, description: str, run: Runner
) -> app_commands.Command[Any, Any, None]:
    @app_commands.describe(image=_IMAGE)
    async def callback(
        interaction: discord.Interaction, image: discord.Attachment | None = None
    ) -> None:
        await run(interaction, name, "", image, None, None)

    return app_commands.Command(name=name, description=description, callback=callback)


def _plain_command(
    name: str, description: str, run: Runner
) -> app_commands.Command[Any, Any, None]:
    async def callback(interaction: discord.Interaction) -> None:
        await run(interaction, name, "", None, None, None)

    return app_commands.Command(name=name, description=description, callback=callback)


async def sync_if_changed(
    tree: app_commands.CommandTree[Any], guild: discord.abc.Snowflake | None
) -> bool:
    """Register the commands with Discord only when their definitions differ from what
    Discord holds (syncing is rate-limited, and global changes take a while to spread)."""
    if guild is not None:
        tree.copy_global_to(guild=guild)
    local = sorted(_shape(c.to_dict(tree)) for c in tree.get_commands(guild=guild))
    fetched = await tree.fetch_commands(guild=guild)
    remote = sorted(_shape(_definition_of(c)) for c in fetched)
    if local == remote:
        logger.info("discord: commands unchanged, not synced")
        return False
    await tree.sync(guild=guild)
    logger.info("discord: %d commands synced", len(local))
    return True


def _definition_of(command: app_commands.AppCommand) -> dict[str, Any]:
    definition = dict(command.to_dict())
    # Not in discord.py's ``to_dict``, though Discord returns it.
    permissions = command.default_member_permissions
    definition["default_member_permissions"] = None if permissions is None else permissions.value
    return definition


def _shape(definition: dict[str, Any]) -> str:
    """A command's definition reduced to what the user sees, comparable across sides."""
    permissions = definition.get("default_member_permissions")
    return repr(
        (
            definition.get("type", 1),
            definition["name"],
            definition.get("description", ""),
            None if permissions is None else str(permissions),
            [_option(option) for option in definition.get("options", [])],
        )
    )


def _option(option: dict[str, Any]) -> tuple[Any, ...]:
    return (
        option["type"],
        option["name"],
        option.get("description", ""),
        bool(option.get("required", False)),
        option.get("min_value"),
        option.get("max_value"),
        option.get("min_length"),
        option.get("max_length"),
    )
