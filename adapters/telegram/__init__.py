"""The Telegram adapter: python-telegram-bot v22 over ``core.chat``."""

from adapters.telegram.adapter import TelegramAdapter

__all__ = ["TelegramAdapter"]
