"""What a chat platform adapter provides to ``ChatBot``: sending, editing, a prompt for
text, and its limits. Messages are named by the platform's own ids, as text."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from core.ports import ChatRef


@dataclass(frozen=True, slots=True)
class Button:
    label: str
    # What the platform hands back when it is pressed: at most 64 bytes (Telegram's limit).
    data: str


# Rows of buttons under a message.
Keyboard = tuple[tuple[Button, ...], ...]


@dataclass(frozen=True, slots=True)
class Limits:
    # Characters in a message's text, and in an image's caption.
    text_chars: int
    caption_chars: int
    # Seconds between two messages or edits to one chat, and what a group may receive in a
    # minute (Telegram: about 1 s and 20).
    chat_interval_s: float
    group_per_minute: int
    # The largest file the bot may download from the platform.
    max_download_bytes: int


@dataclass(frozen=True, slots=True)
class IncomingImage:
    """An image a message carries, before it is downloaded: enough to refuse it first."""

    name: str
    # Bytes and media type as the platform reports them; None when it does not say.
    size: int | None
    mime: str | None
    download: Callable[[], Awaitable[bytes]]
    # Its place among the message's images (an album or several attachments).
    position: int = 0
    # The description its sender gave it, where the platform has one (Discord's alt text).
    alt: str = ""
    # The message carrying it, when not the request's own (a context menu's target).
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Form:
    """Text a platform with forms (Discord's modals) asks for in one, instead of by a
    reply to a prompt: the edited caption for a reimagine, or a question."""

    kind: str  # "reimagine" or "ask"
    title: str
    label: str
    # Offered for editing (the caption to turn into the new image's text).
    text: str
    max_chars: int


@dataclass(frozen=True, slots=True)
class Replied:
    """The message a text answers, as far as the flows care."""

    by_bot: bool
    text: str | None = None
    images: Sequence[IncomingImage] = ()


class PlatformBusy(Exception):
    """The platform asks for a pause (Telegram's 429): wait ``retry_after_s``, then retry."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Platform(Protocol):
    name: str  # "telegram", "discord": also the platform of ChatRef and UserRef
    limits: Limits

    async def send_text(
        self, chat: ChatRef, text: str, *, reply_to: str | None = None, keyboard: Keyboard = ()
    ) -> str:
        """Send a message; its id. May raise ``PlatformBusy``."""
        ...

    async def edit_text(
        self, chat: ChatRef, message_id: str, text: str, *, keyboard: Keyboard = ()
    ) -> None:
        """Replace a message's text and buttons; an edit that changes nothing is no error.
        May raise ``PlatformBusy``."""
        ...

    async def send_image(
        self,
        chat: ChatRef,
        png: bytes,
        caption: str,
        *,
        reply_to: str | None = None,
        keyboard: Keyboard = (),
    ) -> str:
        """Send a PNG with a caption (as a file when it is too large for a photo)."""
        ...

    async def prompt(
        self, chat: ChatRef, text: str, *, editable: str = "", reply_to: str | None = None
    ) -> str:
        """Ask the user for text: a message the user answers by replying to it (Telegram's
        ForceReply); its id. ``editable`` is text offered for editing (the caption to turn
        into a new prompt), shown so that it is easy to copy where the platform allows."""
        ...

    async def typing(self, chat: ChatRef) -> None:
        """Show that the bot is at work (it fades after a few seconds)."""
        ...
