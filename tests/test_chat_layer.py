"""The platform-neutral chat layer: splitting, the answer view, pacing and coalescing,
commands and buttons; with a recording platform that implements ``core.chat.port``."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import pytest

from core.chat import buttons, commands
from core.chat.bot import describe_briefly
from core.chat.live import LiveMessage, Outbox
from core.chat.port import Keyboard, Limits, PlatformBusy
from core.chat.text import clip, split_text
from core.chat.view import AnswerView, waiting_line
from core.ports import ChatRef
from core.service import ChatSettings
from core.types import (
    Caption,
    OcrResult,
    SocialCaption,
    SocialDraft,
    StepProgress,
    Tags,
    Unavailable,
    Waiting,
    WarmingUp,
)

CHAT = ChatRef("fake", "1")


@dataclass
class Recording:
    """A platform that records what it is asked to send, with times from a fake clock."""

    name: str = "fake"
    limits: Limits = field(
        default_factory=lambda: Limits(
            text_chars=50,
            caption_chars=20,
            chat_interval_s=1.0,
            group_per_minute=20,
            max_download_bytes=1000,
        )
    )
    now: float = 0.0
    sent: list[tuple[float, str, str, str]] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)

    def _record(self, what: str, message: str, text: str) -> None:
        if self.busy:
            raise PlatformBusy(self.busy.pop(0))
        self.sent.append((self.now, what, message, text))

    async def send_text(
        self, chat: ChatRef, text: str, *, reply_to: str | None = None, keyboard: Keyboard = ()
    ) -> str:
        message = str(len(self.sent) + 1)
        self._record("send", message, text)
        return message

    async def edit_text(
        self, chat: ChatRef, message_id: str, text: str, *, keyboard: Keyboard = ()
    ) -> None:
        self._record("edit", message_id, text)

    async def send_image(self, *args: object, **kwargs: object) -> str:
        raise NotImplementedError

    async def prompt(self, *args: object, **kwargs: object) -> str:
        raise NotImplementedError

    async def typing(self, chat: ChatRef) -> None:
        pass


def clocked(platform: Recording) -> Outbox:
    async def sleep(seconds: float) -> None:
        platform.now += max(0.0, seconds)
        await asyncio.sleep(0)

    return Outbox(platform, clock=lambda: platform.now, sleep=sleep)


# -- text --------------------------------------------------------------------------------


def test_split_text_breaks_at_lines_then_words_and_keeps_the_words() -> None:
    text = "first line is here\n" + " ".join(f"word{i}" for i in range(30))
    pieces = split_text(text, 40)
    assert all(len(piece) <= 40 for piece in pieces)
    assert pieces[0] == "first line is here"
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
    assert split_text("x" * 95, 40) == ["x" * 40, "x" * 40, "x" * 15]
    assert split_text("", 40) == [""]
    assert clip("one two three four", 10) == "one two…"


# -- the answer view ---------------------------------------------------------------------


def test_parts_fill_in_in_order_and_drafts_are_replaced() -> None:
    view = AnswerView()
    assert view.text() == "👀 Looking at your image…"
    view.apply(WarmingUp("caption", None))
    assert "first start can take a minute" in view.text()
    view.apply(Caption("A dog on a beach."))
    view.apply(OcrResult(()))
    view.apply(Tags(("#dog", "#beach")))
    view.apply(SocialDraft("Sun and"))
    assert view.text().endswith("Social caption:\nSun and\n\n✍️ Writing…")
    view.apply(SocialCaption("Sun and sand! #dog"))
    view.finish()
    assert view.text() == (
        "A dog on a beach.\n\nText in the image:\n(none)\n\n#dog #beach\n\n"
        "Social caption:\nSun and sand! #dog"
    )


def test_a_missing_part_says_why_and_an_error_ends_the_view() -> None:
    view = AnswerView()
    view.apply(Caption("A cat."))
    view.apply(Unavailable("social", "This bot cannot write social captions right now."))
    view.finish("The bot is busy.")
    assert view.text() == (
        "A cat.\n\n— This bot cannot write social captions right now.\n\n⚠️ The bot is busy."
    )


@pytest.mark.parametrize(
    ("part", "line"),
    [
        (Waiting("caption", 0, 0.4), "⏳ You are next for describing the image…"),
        (
            Waiting("caption", 1, 3.2),
            "⏳ 1 request is ahead of you for describing the image, about 3 s…",
        ),
        (
            Waiting("reimagine", 4, 80),
            "⏳ 4 requests are ahead of you for making the image, about 80 s…",
        ),
        (WarmingUp("write", 11.4), "⏳ Warming up for writing the social caption, about 11 s…"),
    ],
)
def test_waiting_lines_never_count_the_user(part: Waiting | WarmingUp, line: str) -> None:
    assert waiting_line(part) == line


def test_step_progress_shows_while_an_image_is_made() -> None:
    view = AnswerView(opening="🎨 Making your image…")
    view.apply(StepProgress(3, 20))
    assert view.text() == "🎨 Step 3 of 20…"


# -- pacing and coalescing -----------------------------------------------------------------


async def test_a_chat_gets_at_most_one_message_a_second_and_a_group_twenty_a_minute() -> None:
    platform = Recording()
    outbox = clocked(platform)
    for i in range(30):
        await outbox.send(CHAT, lambda i=i: platform.send_text(CHAT, f"m{i}"), group=True)
    times = [at for at, *_ in platform.sent]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    for start in times:
        assert sum(start <= t < start + 60 for t in times) <= 20


async def test_the_pace_counts_from_when_the_platform_answered() -> None:
    """A slow request (its arrival at the platform unknown) cannot bring the next one
    within a second of it there."""
    platform = Recording()
    outbox = clocked(platform)

    async def slow_send(text: str) -> str:
        platform.now += 0.5  # the request on its way, and its answer on the way back
        return await platform.send_text(CHAT, text)

    await outbox.send(CHAT, lambda: slow_send("first"), group=False)
    await outbox.send(CHAT, lambda: platform.send_text(CHAT, "second"), group=False)
    [(first, *_), (second, *_)] = platform.sent
    assert second - first >= 1.0


async def test_a_429_is_waited_out_and_retried() -> None:
    platform = Recording(busy=[7.0, 3.0])
    outbox = clocked(platform)
    message = await outbox.send(CHAT, lambda: platform.send_text(CHAT, "hello"), group=False)
    assert message == "1"
    [(at, _, _, text)] = platform.sent
    assert text == "hello" and at >= 10.0


async def test_a_live_message_sends_only_the_newest_state_and_always_the_last() -> None:
    platform = Recording()
    live = LiveMessage(clocked(platform), CHAT, group=False)
    await live.start("starting")
    for i in range(100):
        live.update(f"draft {i}")
    await asyncio.sleep(0)
    final = "final" + " word" * 20  # 105 characters: three pieces of at most 50
    await live.finish(final)
    edits = [text for _, what, _, text in platform.sent if what == "edit"]
    assert len(edits) <= 3  # not a hundred stale drafts
    sends = [text for _, what, _, text in platform.sent if what == "send"]
    assert edits[-1].startswith("final") and len(sends) == 3  # the text past 50 follows
    assert " ".join([edits[-1], *sends[1:]]) == final


async def test_a_first_message_that_waits_its_turn_goes_out_with_the_newest_state() -> None:
    """In a busy chat, a part ready while the first message waits for the pace goes out in
    it, not a second turn later in an edit."""
    platform = Recording()
    outbox = clocked(platform)
    ahead = LiveMessage(outbox, CHAT, group=False)
    await ahead.start("another answer")
    behind = LiveMessage(outbox, CHAT, group=False)
    starting = asyncio.ensure_future(behind.start("looking"))
    await asyncio.sleep(0)  # waiting for the chat's next second
    behind.update("looking\na cat on a mat")
    assert await starting == "2"
    await behind.finish("looking\na cat on a mat")
    ahead.abandon()
    assert platform.sent == [
        (0.0, "send", "1", "another answer"),
        (1.0, "send", "2", "looking\na cat on a mat"),
    ]


# -- commands and buttons --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("/ask what is it?", commands.Said("ask", "what is it?")),
        ("/ASK@CaptionBot  what is it? ", commands.Said("ask", "what is it?")),
        ("/reimagine", commands.Said("reimagine", "")),
        ("/start", commands.Said("start", "")),
        ("/ask@OtherBot what?", None),
        ("/launch now", None),
        ("ask what?", None),
    ],
)
def test_commands_are_read_from_text(text: str, said: commands.Said | None) -> None:
    assert commands.parse(text, "CaptionBot") == said


def test_button_data_fits_telegram_and_reads_back() -> None:
    handle = "Ab3dE9xQ2k"
    rows = (
        buttons.answer_keyboard(handle)
        + buttons.image_keyboard(handle)
        + buttons.settings_keyboard(ChatSettings(style="professional"), group=True)
    )
    for row in rows:
        for button in row:
            assert len(button.data.encode()) <= 64
            assert buttons.parse(button.data) is not None
    assert buttons.parse("rr:" + handle) == buttons.Pressed(buttons.Action.REROLL, handle)
    assert buttons.parse("zz:1") is None


def test_the_settings_menu_shows_the_chats_choices() -> None:
    menu = buttons.settings_keyboard(ChatSettings(parts=("caption", "tags")), group=True)
    labels = [button.label for row in menu for button in row]
    assert labels[:4] == ["✅ Caption", "⬜ Text in the image", "✅ Hashtags", "⬜ Social caption"]
    assert labels[-2:] == [
        "⬜ Describe every image posted here",
        "⬜ Alt text for images posted without one",
    ]
    private = buttons.settings_keyboard(ChatSettings(), group=False)
    assert not any("every image" in button.label for row in private for button in row)
    assert not any("Alt text" in button.label for row in private for button in row)


def test_alt_text_reads_plainly() -> None:
    assert describe_briefly("a dog on a beach", "") == "Image description: a dog on a beach"
    assert describe_briefly("a shop front", "OPEN\n 24   HOURS", "Image 2 of 3") == (
        "Image 2 of 3: a shop front\nText in the image: OPEN 24 HOURS"
    )
