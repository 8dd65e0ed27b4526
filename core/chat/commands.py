"""The bot's commands: names, what they take, their help, and reading them from text."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    arguments: str  # "" when it takes none
    summary: str  # one line, for the platform's command menu (Telegram: at most 256)


COMMANDS = (
    Command("ask", "question", "Ask about the image you reply to, or the last one"),
    Command("reimagine", "new text", "A new image from the image and your text"),
    Command("imagine", "text", "An image from text alone"),
    Command("caption", "", "Describe the image in one sentence"),
    Command("ocr", "", "Read the text in the image"),
    Command("tags", "", "Hashtags for the image"),
    Command("write", "", "A ready-to-post social caption for the image"),
    Command("settings", "", "What this chat's descriptions contain"),
    Command("usage", "", "What you have left today"),
    Command("forget", "", "Delete the images you sent and all made from them"),
    Command("help", "", "What this bot does"),
)
NAMES = frozenset(command.name for command in COMMANDS) | {"start"}

_COMMAND = re.compile(r"^/(?P<name>[A-Za-z0-9_]{1,32})(?:@(?P<bot>[A-Za-z0-9_]{1,64}))?(?:\s+|$)")


@dataclass(frozen=True, slots=True)
class Said:
    """A command found at the start of a message (a text or an image's caption)."""

    name: str
    arguments: str


def parse(text: str, bot_username: str) -> Said | None:
    """``/ask what is it?`` or ``/ask@ThisBot what is it?``; None when the text is not one
    of this bot's commands (another bot's, or no command)."""
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    name = match.group("name").lower()
    if name not in NAMES:
        return None
    addressed = match.group("bot")
    if addressed is not None and addressed.lower() != bot_username.lower():
        return None
    return Said(name, text.strip()[match.end() :].strip())


def help_text(*, group: bool) -> str:
    lines = [
        "Send me a photo and I describe it: a caption, the text in it, hashtags and a "
        "ready-to-post social caption. Then press 🎨 Reimagine, edit the caption, and I "
        "make a new image from it.",
        "",
    ]
    for command in COMMANDS:
        usage = f"/{command.name}" + (f" {command.arguments}" if command.arguments else "")
        lines.append(f"{usage} — {command.summary}")
    lines += [
        "",
        "Reply to a photo or to one of my answers to mean that image; otherwise I use the "
        "last image in this chat.",
    ]
    if group:
        lines.append(
            "In a group I describe photos that mention me or reply to me, or every photo "
            "when /settings says so."
        )
    return "\n".join(lines)


# Prompts the bot sends for text; a reply to one of them carries its answer. The first
# line names what is asked, so a reply is understood after a restart too.
REIMAGINE_PROMPT = "🎨 Reimagine: reply with the new text for the image."
ASK_PROMPT = "❓ Ask: reply with your question about the image."

# The same, where a platform asks in a form (Discord's modals): (title, field label).
REIMAGINE_FORM = ("Reimagine the image", "The new image shows")
ASK_FORM = ("Ask about the image", "Your question")
# What a form's field takes; the models' own limits (shorter by default) still apply,
# and say so in one sentence.
FORM_CHARS = 1000
