"""The flows of the chat bot, written once for every platform.

An adapter turns each platform event into one call here, with an ``Origin``, the event's
id and what the event carries, and implements ``Platform`` for the way back. Each event
is journalled before any work and closed once its answer is out, so a restart answers
what was cut off (``recover``) and a redelivered event is not answered twice.

The flows:

- ``images``: describe each image of a message in one answer message that fills in as
  parts arrive, with the typing action while it works and the buttons at the end.
- ``command``: /ask, /reimagine, /imagine, /caption, /ocr, /tags, /write, /settings,
  /usage, /forget, /help and /start. /reimagine without text asks for it (the edit loop).
- ``button``: the buttons under answers, images and the settings menu.
- ``text``: a reply to one of the bot's prompts (the edited caption, a question).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from core.chat import buttons, commands
from core.chat.buttons import Action
from core.chat.live import LiveMessage, Outbox, typing
from core.chat.port import Form, IncomingImage, Keyboard, Platform, Replied
from core.chat.text import clip, split_text
from core.chat.view import AnswerView
from core.errors import CaptionbotError, DuplicateEvent, EngineDead, ShuttingDown
from core.replies import Reply
from core.service import DESCRIBE_PARTS, JournalEntry, Service
from core.types import (
    Caption,
    FromAnswer,
    GeneratedImage,
    ImageInput,
    OcrResult,
    Origin,
    Stored,
    Upload,
)

logger = logging.getLogger(__name__)

# What a chat is told when the bot stops under its request: the journal answers it after
# the restart, so it need not be sent again.
RESTARTING = "The bot is restarting; this will be answered when it is back."
_MB = 1024 * 1024


class ChatBot:
    def __init__(self, service: Service, platform: Platform, *, bot_username: str = "") -> None:
        self.service = service
        self.platform = platform
        self.outbox = Outbox(platform)
        self.bot_username = bot_username

    # -- events ------------------------------------------------------------------------------

    async def images(self, event: str, origin: Origin, images: Sequence[IncomingImage]) -> None:
        """Describe each image a message carries, each in its own answer."""
        async with self._journalled(event, origin, {"describe": True}) as entry:
            if entry is None:
                return
            for incoming in images:
                upload = await self._download(origin, incoming)
                if upload is not None:
                    await self._describe(origin, upload, entry)

    async def posted(self, event: str, origin: Origin, images: Sequence[IncomingImage]) -> None:
        """Images posted in a group without asking the bot: described where the chat wants
        every image described, or given alt text where it wants that and they have none.
        Other files posted are none of the bot's business."""
        pictures = [image for image in images if (image.mime or "").startswith("image/")]
        if not pictures:
            return
        settings = await self.service.chat_settings(origin.chat)
        if settings.auto_describe:
            await self.images(event, origin, pictures)
        elif settings.alt_text:
            undescribed = [image for image in pictures if not image.alt.strip()]
            if undescribed:
                await self.alt_text(event, origin, undescribed)

    async def command(
        self,
        event: str,
        origin: Origin,
        name: str,
        arguments: str,
        images: Sequence[IncomingImage] = (),
        *,
        strength: float | None = None,
        seed: int | None = None,
    ) -> None:
        """A command, with the images of its message when it came as a photo's caption
        (or as a command's image option); ``strength`` and ``seed`` tune a reimagine."""
        request: dict[str, Any] = {"command": name, "arguments": arguments}
        tuning = {"strength": strength, "seed": seed}
        request.update({key: value for key, value in tuning.items() if value is not None})
        async with self._journalled(event, origin, request) as entry:
            if entry is None:
                return
            image: ImageInput = None
            if images:
                image = await self._download(origin, images[0])
                if image is None:
                    return
            await self._command(entry, origin, name, arguments, image, strength=strength, seed=seed)

    async def text(self, event: str, origin: Origin, text: str, replied: Replied | None) -> None:
        """A text with no command: the answer to one of the bot's prompts (the edited
        caption, a question) or, in a private chat, a question about the photo or answer
        it replies to. Other texts in a group are the group's own conversation."""
        prompt = _prompt_of(replied.text) if replied is not None and replied.by_bot else None
        if prompt is not None:
            request = {"prompt": prompt, "text": text}
            async with self._journalled(event, origin, request) as entry:
                if entry is not None:
                    await self._answer_prompt(origin, prompt, text, entry)
        elif not origin.private:
            return
        elif text.startswith("/"):
            name = text[1:].split(maxsplit=1)[0].partition("@")[0] if text[1:].strip() else ""
            await self._say(origin, f"I don't know the command /{name[:32]}; see /help.")
        elif replied is not None and (replied.by_bot or replied.images):
            await self.command(event, origin, "ask", text, replied.images)
        else:
            await self._say(origin, "Send me a photo to describe it, or see /help.")

    async def button(
        self, origin: Origin, raw: str, acknowledge: Callable[[str], Awaitable[None]]
    ) -> None:
        """A button pressed under ``origin.message_id``; ``acknowledge`` shows the presser
        a short note (or nothing) and must be called once, soon."""
        pressed = buttons.parse(raw)
        if pressed is None:
            await acknowledge("This button is from an older version of the bot.")
            return
        try:
            note = await self._press(origin, pressed)
        except CaptionbotError as error:
            note = str(error)
        await acknowledge(note)

    async def form_for_button(self, origin: Origin, raw: str) -> Form | None:
        """The form a button opens where the platform has forms: 🎨 offers the answer's
        caption to edit, ❓ asks for a question. None for other buttons, and for one that
        no longer works (``button`` then says why)."""
        pressed = buttons.parse(raw)
        if pressed is None:
            return None
        try:
            match pressed.action:
                case Action.REIMAGINE:
                    return reimagine_form(await self.service.caption_of(origin, pressed.argument))
                case Action.ASK:
                    await self.service.answer(origin, pressed.argument)
                    return ask_form()
        except CaptionbotError:
            pass
        return None

    async def form_for_message(self, origin: Origin) -> Form:
        """The reimagine form for the image of the message ``origin`` replies to (a
        context menu's target), offering the caption already known for it, if any."""
        return reimagine_form(await self.service.known_caption(origin))

    async def submitted(
        self,
        event: str,
        origin: Origin,
        kind: str,
        text: str,
        *,
        handle: str | None = None,
        images: Sequence[IncomingImage] = (),
    ) -> None:
        """A filled form: about the image of the answer behind ``handle``, or else about the
        first of ``images``, or else about the image of the message ``origin`` replies to."""
        request = {"form": kind, "text": text, "handle": handle}
        async with self._journalled(event, origin, request) as entry:
            if entry is None:
                return
            image: ImageInput = FromAnswer(handle) if handle else None
            if image is None and images:
                image = await self._download(origin, images[0])
                if image is None:
                    return
            await self._answer_about(origin, kind, text, image, entry)

    async def alt_text(self, event: str, origin: Origin, images: Sequence[IncomingImage]) -> None:
        """A short description of each image (its caption and the text in it), for members
        who use screen readers: asked for, or posted without one where the chat wants it."""
        async with self._journalled(event, origin, {"alt_text": True}) as entry:
            if entry is None:
                return
            uploads = [await self._download(origin, incoming) for incoming in images]
            taken = [upload for upload in uploads if upload is not None]
            if taken or not images:  # none: a menu on an answer, whose image the bot knows
                await self._alt_texts(origin, taken, entry)

    async def recover(self) -> int:
        """After a restart: answer, once, the events that were accepted but not answered."""
        return await self.service.recover(self.platform.name, self._redo)

    # -- describing ---------------------------------------------------------------------------

    async def _download(self, origin: Origin, incoming: IncomingImage) -> Upload | None:
        """The image's bytes; None, after telling the chat why, when it cannot be taken."""
        mime = incoming.mime or ""
        if mime and not mime.startswith("image/"):
            kind = "PDF document" if mime == "application/pdf" else "file"
            await self._say(
                origin, f"That is a {kind}, not an image; send a photo or an image file."
            )
            return None
        limit = self.platform.limits.max_download_bytes
        if incoming.size is not None and incoming.size > limit:
            await self._say(origin, _too_big(incoming.size, limit))
            return None
        data = await incoming.download()
        if len(data) > limit:  # a size the platform did not tell (an embedded image)
            await self._say(origin, _too_big(len(data), limit))
            return None
        return Upload(
            data, incoming.name, position=incoming.position, message_id=incoming.message_id
        )

    async def _describe(self, origin: Origin, image: ImageInput, entry: JournalEntry) -> None:
        reply = self.service.describe(origin, image, job=entry)
        await self._stream(origin, reply, AnswerView(), buttons.answer_keyboard, entry)

    async def _stream(
        self,
        origin: Origin,
        reply: Reply[Any],
        view: AnswerView,
        keyboard: Callable[[str], Keyboard],
        entry: JournalEntry | None,
    ) -> None:
        """One answer message that follows ``reply`` as it grows, then gets its buttons."""
        followed = await self._follow(origin, reply, view, entry, is_answer=True)
        if followed is not None:
            live, _ = followed
            view.finish()
            await live.finish(view.text(), keyboard(reply.handle))

    async def _follow(
        self,
        origin: Origin,
        reply: Reply[Any],
        view: AnswerView,
        entry: JournalEntry | None,
        *,
        is_answer: bool,
    ) -> tuple[LiveMessage, Any] | None:
        """Show ``reply`` growing in one message (``is_answer``: the message replies to
        the answer mean); that message and the reply's last part, or None when the reply
        ended early and the message says why."""
        live = LiveMessage(
            self.outbox, origin.chat, group=not origin.private, reply_to=origin.message_id
        )
        last: Any = None
        try:
            async with reply.waiting_in_line(), typing(self.platform, origin.chat):
                # Read while the first message waits for its turn (seconds, in a busy
                # group): it goes out with the parts that are ready by then.
                reading = asyncio.ensure_future(_follow_parts(reply, view, live))
                try:
                    message_id = await self._begin(live, view.text(), entry)
                    if is_answer:
                        await reply.sent(message_id)
                    last = await reading
                finally:
                    await _stopped(reading)
        except ShuttingDown:
            await self._end(origin, live, view, RESTARTING)
            raise
        except CaptionbotError as error:
            await self._end(origin, live, view, str(error))
            return None
        except BaseException:
            live.abandon()
            raise
        return live, last

    async def _begin(self, live: LiveMessage, text: str, entry: JournalEntry | None) -> str:
        """Start an answer's message: after a restart, the one the cut-off answer began."""
        message_id = await live.start(text, resume=entry.claim_message() if entry else None)
        if entry is not None:
            await entry.began_message(message_id)
        return message_id

    async def _end(self, origin: Origin, live: LiveMessage, view: AnswerView, why: str) -> None:
        """A request that ended early: its answer says why, or a reply does when none."""
        if live.message_id is None:
            await self._say(origin, why)
        else:
            view.finish(why)
            await live.finish(view.text())

    # -- commands ----------------------------------------------------------------------------

    async def _command(
        self,
        entry: JournalEntry,
        origin: Origin,
        name: str,
        arguments: str,
        image: ImageInput,
        *,
        strength: float | None = None,
        seed: int | None = None,
    ) -> None:
        service = self.service
        match name:
            case "start" | "help":
                await self._say(origin, commands.help_text(group=not origin.private))
            case "ask":
                if not arguments:
                    await self._say(origin, "Ask what? For example: /ask what colour is the car?")
                    return
                view = AnswerView(question=arguments, opening="🤔 Looking…")
                reply = service.ask(origin, arguments, image)
                await self._stream(origin, reply, view, buttons.reply_keyboard, entry)
            case "reimagine":
                if arguments:
                    await self._reimagine(
                        origin,
                        arguments,
                        image,
                        entry,
                        use_context=True,
                        strength=strength,
                        seed=seed,
                    )
                else:
                    await self._ask_for_edit(origin, image)
            case "imagine":
                if not arguments:
                    await self._say(origin, "Imagine what? For example: /imagine a lighthouse.")
                    return
                await self._reimagine(origin, arguments, None, entry, use_context=False)
            case "caption" | "ocr" | "tags" | "write":
                one: Reply[Any]
                if name == "caption":
                    one = service.caption(origin, image)
                elif name == "ocr":
                    one = service.ocr(origin, image)
                elif name == "tags":
                    one = service.tags(origin, image)
                else:
                    one = service.write(origin, image)
                view = AnswerView(opening="👀 Looking at the image…")
                await self._stream(origin, one, view, buttons.reply_keyboard, entry)
            case "settings":
                await self._show_settings(origin)
            case "usage":
                lines = await service.usage(origin)
                text = "\n".join(
                    f"{line.use_case}: {line.used} used"
                    + ("" if line.left is None else f", {line.left} left")
                    for line in lines
                )
                await self._say(origin, "Today (UTC):\n" + text)
            case "forget":
                forgotten = await service.forget(origin)
                await self._say(
                    origin,
                    f"Forgot {forgotten.images} image{'s' if forgotten.images != 1 else ''} "
                    "you sent and everything made from them.",
                )

    async def _reimagine(
        self,
        origin: Origin,
        text: str,
        image: ImageInput,
        entry: JournalEntry | None,
        *,
        use_context: bool,
        strength: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Progress in a message, then the new image with its seed and buttons under it."""
        view = AnswerView(opening="🎨 Making your image…")
        reply = self.service.reimagine(
            origin, text, image, use_context_image=use_context, strength=strength, seed=seed
        )
        followed = await self._follow(origin, reply, view, entry, is_answer=False)
        if followed is None:
            return
        live, made = followed
        assert isinstance(made, GeneratedImage)  # the reply ends with its image
        caption = f"🎨 {text}\nseed {made.seed}"
        overflow = len(caption) > self.platform.limits.caption_chars
        if overflow:  # the whole text follows as a message of its own
            caption = clip(f"🎨 seed {made.seed}", self.platform.limits.caption_chars)
        keyboard = buttons.image_keyboard(reply.handle)
        sent = await self.outbox.send(
            origin.chat,
            lambda: self.platform.send_image(
                origin.chat, made.png, caption, reply_to=origin.message_id, keyboard=keyboard
            ),
            group=not origin.private,
        )
        await reply.sent(sent)
        if overflow:
            await self._say(origin, f"🎨 {text}")
        view.finish()
        await live.finish(f"✅ Made in {made.steps} steps.")

    async def _ask_for_edit(self, origin: Origin, image: ImageInput) -> None:
        """The edit loop's first step: the current caption, to edit and send back."""
        answer = await self.service.replied_answer(origin) if image is None else None
        if answer is not None:
            handle, caption = answer.handle, await self.service.caption_of(origin, answer.handle)
        else:
            reply = self.service.caption(origin, image)
            caption_part: Caption = await reply.waiting_in_line()
            handle, caption = reply.handle, caption_part.text
        await self._prompt(origin, handle, commands.REIMAGINE_PROMPT, caption)

    async def _prompt(self, origin: Origin, handle: str, question: str, editable: str) -> None:
        prompt_id = await self.outbox.send(
            origin.chat,
            lambda: self.platform.prompt(
                origin.chat, question, editable=editable, reply_to=origin.message_id
            ),
            group=not origin.private,
        )
        # A reply to the prompt means this answer's image, after a restart too.
        await self.service.link_message(origin, handle, prompt_id)

    async def _answer_prompt(
        self, origin: Origin, prompt: str, text: str, entry: JournalEntry
    ) -> None:
        answer = await self.service.replied_answer(origin)
        if answer is None:
            await self._say(origin, "I no longer know which image that was; send it again.")
            return
        await self._answer_about(origin, prompt, text, FromAnswer(answer.handle), entry)

    async def _answer_about(
        self, origin: Origin, kind: str, text: str, image: ImageInput, entry: JournalEntry
    ) -> None:
        """The text a prompt or a form asked for: a reimagine's new text, or a question."""
        if kind == "reimagine":
            await self._reimagine(origin, text, image, entry, use_context=False)
        else:
            view = AnswerView(question=text, opening="🤔 Looking…")
            reply = self.service.ask(origin, text, image)
            await self._stream(origin, reply, view, buttons.reply_keyboard, entry)

    async def _alt_texts(
        self, origin: Origin, images: Sequence[ImageInput], entry: JournalEntry
    ) -> None:
        """One alt text per image, each a reply of its own; no images: the replied one's."""
        for index, image in enumerate(images or [None]):
            label = f"Image {index + 1} of {len(images)}" if len(images) > 1 else ""
            await self._alt_text(origin, image, entry, label)

    async def _alt_text(
        self, origin: Origin, image: ImageInput, entry: JournalEntry, label: str
    ) -> None:
        caption_reply = self.service.caption(origin, image)
        try:
            caption: Caption = await caption_reply.waiting_in_line()
            sha = caption_reply.sha256
            assert sha is not None  # known once the caption is
            await entry.keep_image(sha)
            read: OcrResult = await self.service.ocr(origin, Stored(sha)).waiting_in_line()
        except ShuttingDown:
            raise
        except CaptionbotError as error:
            await self._say(origin, str(error))
            return
        await self._say(origin, describe_briefly(caption.text, read.text, label))

    # -- buttons -----------------------------------------------------------------------------

    async def _press(self, origin: Origin, pressed: buttons.Pressed) -> str:
        """Do what a button asks; the short note its presser sees."""
        service, handle = self.service, pressed.argument
        match pressed.action:
            case Action.REIMAGINE:
                answer = await service.answer(origin, handle)
                await self._prompt(
                    origin,
                    handle,
                    commands.REIMAGINE_PROMPT,
                    await service.caption_of(origin, answer.handle),
                )
                return ""
            case Action.ASK:
                await service.answer(origin, handle)
                await self._prompt(origin, handle, commands.ASK_PROMPT, "")
                return ""
            case Action.REROLL:
                await self._reroll(origin, handle)
                return "A new caption."
            case Action.UP | Action.DOWN:
                await service.rate_answer(origin, handle, 1 if pressed.action == Action.UP else -1)
                return "Thanks for the rating."
            case Action.AGAIN:
                answer = await service.answer(origin, handle)
                shown = json.loads(answer.result)
                source = Stored(answer.sha256) if answer.sha256 else None
                await self._reimagine(
                    origin, str(shown.get("prompt", "")), source, None, use_context=False
                )
                return ""
            case Action.SETTINGS:
                return await self._change_setting(origin, handle)

    async def _reroll(self, origin: Origin, handle: str) -> None:
        """A new caption, shown in the answer the button is under."""
        caption: Caption = await self.service.reroll(origin, handle).waiting_in_line()
        answer = await self.service.answer(origin, handle)
        view = AnswerView.of_answer(answer.result)
        view.caption = caption.text
        keyboard = (
            buttons.answer_keyboard(handle)
            if answer.kind == "describe"
            else buttons.reply_keyboard(handle)
        )
        if origin.message_id is not None:
            message_id = origin.message_id
            await self.outbox.send(
                origin.chat,
                lambda: self.platform.edit_text(
                    origin.chat, message_id, view.text(), keyboard=keyboard
                ),
                group=not origin.private,
            )

    # -- settings ----------------------------------------------------------------------------

    async def _show_settings(self, origin: Origin) -> None:
        if not self.service.may_change_settings(origin):
            await self._say(origin, "Only this chat's administrators can change its settings.")
            return
        settings = await self.service.chat_settings(origin.chat)
        keyboard = buttons.settings_keyboard(settings, group=not origin.private)
        await self._say(origin, "What a described image gets in this chat:", keyboard)

    async def _change_setting(self, origin: Origin, choice: str) -> str:
        kind, _, value = choice.partition(":")
        current = await self.service.chat_settings(origin.chat)
        if kind == "p" and value in DESCRIBE_PARTS:
            parts = set(current.parts) ^ {value}
            settings = await self.service.update_chat_settings(origin, parts=tuple(parts))
        elif kind == "s" and value in buttons.STYLES:
            settings = await self.service.update_chat_settings(origin, style=value)
        elif kind == "a" and value in ("on", "off"):
            settings = await self.service.update_chat_settings(origin, auto_describe=value == "on")
        elif kind == "t" and value in ("on", "off"):
            settings = await self.service.update_chat_settings(origin, alt_text=value == "on")
        else:
            return "That setting is not offered any more."
        if origin.message_id is not None:
            message_id = origin.message_id
            keyboard = buttons.settings_keyboard(settings, group=not origin.private)
            await self.outbox.send(
                origin.chat,
                lambda: self.platform.edit_text(
                    origin.chat,
                    message_id,
                    "What a described image gets in this chat:",
                    keyboard=keyboard,
                ),
                group=not origin.private,
            )
        return "Saved."

    # -- plumbing ----------------------------------------------------------------------------

    async def _say(self, origin: Origin, text: str, keyboard: Keyboard = ()) -> str:
        """A reply to the message that asked, split at the platform's limit."""
        pieces = split_text(text, self.platform.limits.text_chars)
        first = ""
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            sent = await self.outbox.send(
                origin.chat,
                lambda piece=piece, last=last: self.platform.send_text(  # type: ignore[misc]
                    origin.chat,
                    piece,
                    reply_to=origin.message_id,
                    keyboard=keyboard if last else (),
                ),
                group=not origin.private,
            )
            first = first or sent
        return first

    @contextlib.asynccontextmanager
    async def _journalled(
        self, event: str, origin: Origin, request: dict[str, Any]
    ) -> AsyncIterator[JournalEntry | None]:
        """The event journalled before any work (None: seen before, so not answered again)
        and closed once its answer is out. A bot that stops under it leaves it open, for
        ``recover`` after the restart; any other failure closes it, so that one poisoned
        event is not tried at every start."""
        try:
            entry = await self.service.journal(event, origin, "chat", request)
        except DuplicateEvent:
            logger.info("%s was delivered again; it is answered once, not again", event)
            yield None
            return
        try:
            yield entry
        except (ShuttingDown, EngineDead):
            raise
        except BaseException:
            await entry.answered()
            raise
        await entry.answered()

    async def _redo(self, entry: JournalEntry) -> None:
        """Answer a journalled event again, from the images it had already stored."""
        origin, request = entry.origin, entry.request
        logger.info("answering %s after the restart", entry.event_id)
        images = [Stored(sha) for sha in entry.images]
        if request.get("describe"):
            for image in images:
                await self._describe(origin, image, entry)
        elif "command" in request:
            await self._command(
                entry,
                origin,
                str(request["command"]),
                str(request.get("arguments", "")),
                images[0] if images else None,
                strength=request.get("strength"),
                seed=request.get("seed"),
            )
        elif "prompt" in request:
            await self._answer_prompt(origin, str(request["prompt"]), str(request["text"]), entry)
        elif "form" in request:
            handle = request.get("handle")
            about: ImageInput = FromAnswer(str(handle)) if handle else images[0] if images else None
            await self._answer_about(
                origin, str(request["form"]), str(request["text"]), about, entry
            )
        elif request.get("alt_text"):
            await self._alt_texts(origin, images, entry)


def reimagine_form(caption: str) -> Form:
    title, label = commands.REIMAGINE_FORM
    return Form("reimagine", title, label, caption[: commands.FORM_CHARS], commands.FORM_CHARS)


def ask_form() -> Form:
    title, label = commands.ASK_FORM
    return Form("ask", title, label, "", commands.FORM_CHARS)


def describe_briefly(caption: str, text_in_image: str, label: str = "") -> str:
    """Alt text: what the image shows and the text in it, plain enough for a screen reader
    (no emoji before the words that matter)."""
    lines = [f"{label}: {caption}" if label else f"Image description: {caption}"]
    if text_in_image.strip():
        lines.append(f"Text in the image: {' '.join(text_in_image.split())}")
    return "\n".join(lines)


def _too_big(size: int, limit: int) -> str:
    return f"That file is {size / _MB:.0f} MB; this bot takes images up to {limit / _MB:.0f} MB."


def _prompt_of(replied_text: str | None) -> str | None:
    if replied_text is None:
        return None
    if replied_text.startswith(commands.REIMAGINE_PROMPT):
        return "reimagine"
    if replied_text.startswith(commands.ASK_PROMPT):
        return "ask"
    return None


async def _follow_parts(reply: Reply[Any], view: AnswerView, live: LiveMessage) -> Any:
    """Show each part of ``reply`` as it comes; the last one."""
    last: Any = None
    async for last in reply:
        view.apply(last)
        live.update(view.text())
    return last


async def _stopped(task: asyncio.Task[Any]) -> None:
    """End ``task`` if it still runs. Its error, if any, was raised to whoever awaited it;
    when nobody did (the first message failed), that failure is the one that counts."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()
