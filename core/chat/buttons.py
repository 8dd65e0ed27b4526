"""The buttons under the bot's messages, and the short data they carry.

Data is ``action:argument``: an answer's handle (10 characters) for the answer buttons,
a setting for the settings menu. Telegram allows 64 bytes; these take at most 24.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from core.chat.port import Button, Keyboard
from core.service import DESCRIBE_PARTS, ChatSettings

# Styles the settings menu offers for the social caption ("" is the configured tone).
STYLES = ("", "witty", "warm", "professional", "playful")
PART_NAMES = {
    "caption": "Caption",
    "ocr": "Text in the image",
    "tags": "Hashtags",
    "social": "Social caption",
}


class Action(StrEnum):
    REIMAGINE = "ri"
    ASK = "ak"
    REROLL = "rr"
    UP = "up"
    DOWN = "dn"
    AGAIN = "ra"
    SETTINGS = "st"


@dataclass(frozen=True, slots=True)
class Pressed:
    action: Action
    argument: str


def data(action: Action, argument: str) -> str:
    return f"{action}:{argument}"


def parse(raw: str) -> Pressed | None:
    """What a button's data asks for; None for data this bot did not make."""
    action, _, argument = raw.partition(":")
    try:
        return Pressed(Action(action), argument)
    except ValueError:
        return None


def answer_keyboard(handle: str) -> Keyboard:
    """Under a description: edit and reimagine, ask, a new caption, thumbs."""
    return (
        (
            Button("🎨 Reimagine", data(Action.REIMAGINE, handle)),
            Button("❓ Ask", data(Action.ASK, handle)),
            Button("🔁 Reroll caption", data(Action.REROLL, handle)),
        ),
        (Button("👍", data(Action.UP, handle)), Button("👎", data(Action.DOWN, handle))),
    )


def reply_keyboard(handle: str) -> Keyboard:
    """Under an answer to a question, a caption, text or hashtags: go on from its image."""
    return (
        (
            Button("🎨 Reimagine", data(Action.REIMAGINE, handle)),
            Button("❓ Ask", data(Action.ASK, handle)),
        ),
        (Button("👍", data(Action.UP, handle)), Button("👎", data(Action.DOWN, handle))),
    )


def image_keyboard(handle: str) -> Keyboard:
    """Under a made image: make it again (a new seed), edit the text, thumbs."""
    return (
        (
            Button("🎲 Again", data(Action.AGAIN, handle)),
            Button("🎨 Edit and reimagine", data(Action.REIMAGINE, handle)),
        ),
        (Button("👍", data(Action.UP, handle)), Button("👎", data(Action.DOWN, handle))),
    )


def settings_keyboard(settings: ChatSettings, *, group: bool) -> Keyboard:
    """Toggles for the parts a description has, the style, and (in groups) auto-describe
    and alt text."""
    rows: list[tuple[Button, ...]] = []
    for part in DESCRIBE_PARTS:
        mark = "✅" if part in settings.parts else "⬜"
        rows.append((Button(f"{mark} {PART_NAMES[part]}", data(Action.SETTINGS, f"p:{part}")),))
    current = settings.style if settings.style in STYLES else ""
    next_style = STYLES[(STYLES.index(current) + 1) % len(STYLES)]
    rows.append(
        (
            Button(
                f"✍️ Style: {settings.style or 'default'}",
                data(Action.SETTINGS, f"s:{next_style}"),
            ),
        )
    )
    if group:
        mark = "✅" if settings.auto_describe else "⬜"
        rows.append(
            (
                Button(
                    f"{mark} Describe every image posted here",
                    data(Action.SETTINGS, "a:" + ("off" if settings.auto_describe else "on")),
                ),
            )
        )
        mark = "✅" if settings.alt_text else "⬜"
        rows.append(
            (
                Button(
                    f"{mark} Alt text for images posted without one",
                    data(Action.SETTINGS, "t:" + ("off" if settings.alt_text else "on")),
                ),
            )
        )
    return tuple(rows)
