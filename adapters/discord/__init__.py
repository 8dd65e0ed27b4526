"""Discord: the adapter over discord.py, and the chat platform it gives ``core.chat``."""

from adapters.discord.adapter import DiscordAdapter

__all__ = ["DiscordAdapter"]
