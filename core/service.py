"""The use cases every adapter calls; nothing here knows Discord, Telegram, HTTP or SQL.

Every use case returns a ``Reply`` (see ``core.replies``): entering it admits the request
and finds its image, raising any refusal as one ``CaptionbotError`` sentence before the
first part; reading it yields typed parts (``core.types.Part``) as they are made.

Which image a request means:

1. the one it carries (bytes, or an http(s) link the service fetches),
2. else the one its message replies to: a user's message or one of the bot's answers
   (which one of several, for a message with several images); a reply to a message the
   bot does not know is refused with a sentence, never answered about another image,
3. else the chat's last image.

Results are cached by image, task, the task's output identity (model and every setting
that shapes the output) and the request's own parameters; identical work already in
flight is joined instead of run again. So the same image never costs the device twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from core import codec, metrics
from core.admission import Admission, UsageLine
from core.engine import Engine, Outcome, Partial, Reservation, Warming
from core.errors import (
    CaptionbotError,
    DuplicateEvent,
    EngineDead,
    InferenceFailed,
    InvalidRequest,
    NoUsableText,
    ShuttingDown,
)
from core.flights import Flights
from core.images import MAX_BYTES, decode_working
from core.ports import (
    AnswerRecord,
    ChatRef,
    Forgotten,
    ImageFetcher,
    Job,
    Rating,
    ResultKey,
    Store,
)
from core.replies import Reply, ResolvedImage
from core.settings import ServiceSettings
from core.types import (
    Answer,
    AskRequest,
    Caption,
    CaptionRequest,
    FromAnswer,
    GeneratedImage,
    ImageInput,
    Link,
    MoodLabels,
    MoodRequest,
    OcrRequest,
    OcrResult,
    Origin,
    Part,
    PostContext,
    ReimagineRequest,
    SocialCaption,
    SocialDraft,
    StepProgress,
    Stored,
    Tags,
    TagsRequest,
    Unavailable,
    Upload,
    Waiting,
    WarmingUp,
    WriteRequest,
)

logger = logging.getLogger(__name__)

# A chat no platform has: a readiness check reads its settings to see the store answer.
_PROBE_CHAT = ChatRef("readiness", "probe")

# The request being served, so the one log line per model request can name its platform.
_current: contextvars.ContextVar[Origin] = contextvars.ContextVar("captionbot_origin")
# The engine room the request reserved when it was admitted: its model requests use it.
_reserved: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar("captionbot_room")

DESCRIBE_PARTS = ("caption", "ocr", "tags", "social")
# What a rating may be about: the task that made the rated result, or a whole answer.
RATED = ("caption", "ocr", "tags", "vqa", "write", "reimagine", "describe", "ask")
MAX_STYLE_CHARS = 60
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HANDLE = re.compile(r"[A-Za-z0-9_-]{8,32}")
# Draws a reroll makes before telling the user its caption could not be written.
_SAMPLE_TRIES = 3


@dataclass(frozen=True, slots=True)
class ChatSettings:
    parts: tuple[str, ...] = DESCRIBE_PARTS
    # The social caption's tone for this chat; "" uses the configured one.
    style: str = ""
    # In a group: describe every image posted, not only those the bot is asked about.
    auto_describe: bool = False
    # In a group: a short description (caption, text in it) of each image posted without
    # one of its own, for members who use screen readers.
    alt_text: bool = False


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """Where a new request to ``task`` would stand."""

    task: str
    loaded: bool
    queued: int
    eta_s: float


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    accepting: bool
    in_flight: int
    tasks: tuple[TaskStatus, ...]


class JournalEntry:
    """A platform event accepted into the journal, to be answered exactly once.

    ``request`` is whatever the adapter needs to redo the event (the command and its
    text); ``images`` are the images the work stored, so an answer after a restart never
    downloads them again (``Stored(sha)``).
    """

    def __init__(
        self,
        service: Service,
        event_id: str,
        origin: Origin,
        kind: str,
        request: Mapping[str, Any],
        images: list[str],
        recovered: bool = False,
        messages: list[str] | None = None,
    ) -> None:
        self.event_id = event_id
        self.origin = origin
        self.kind = kind
        self.request = dict(request)
        self.images = images
        self.recovered = recovered
        # The answer messages the work had begun, in order: after a restart the answers
        # are finished in them, so a chat sees one answer rather than a stub and a copy.
        self.messages = messages or []
        self._unclaimed = list(self.messages)
        self._service = service

    def payload(self) -> str:
        return json.dumps(
            {
                "origin": dataclasses.asdict(self.origin),
                "request": self.request,
                "images": self.images,
                "messages": self.messages,
            },
            ensure_ascii=False,
        )

    def claim_message(self) -> str | None:
        """The next message an earlier run began for this event, to finish the answer in."""
        return self._unclaimed.pop(0) if self._unclaimed else None

    async def began_message(self, message_id: str) -> None:
        if message_id not in self.messages:
            self.messages.append(message_id)
            await self._service._store.update_job(self.event_id, self.payload())

    async def keep_image(self, sha256: str) -> None:
        if sha256 not in self.images:
            self.images.append(sha256)
            await self._service._store.update_job(self.event_id, self.payload())

    async def answered(self) -> None:
        """Call once the answer's platform message exists: a restart will not redo it."""
        await self._service._store.finish_job(self.event_id, self._service._clock())


class Service:
    def __init__(
        self,
        engine: Engine,
        store: Store,
        settings: ServiceSettings,
        *,
        fetcher: ImageFetcher | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._store = store
        self._settings = settings
        self._fetcher = fetcher
        self._clock = clock
        self._admission = Admission(settings, store, clock, lambda: self.eta("caption"))
        self._flights = Flights()
        # Every reply admitted and not yet closed, for shutdown.
        self._replies: set[Reply[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepting = True

    # -- use cases -------------------------------------------------------------------------

    def describe(
        self, origin: Origin, image: ImageInput, *, job: JournalEntry | None = None
    ) -> Reply[object]:
        """Caption first, then the text in the image, hashtags (with mood labels) and the
        social caption, as the chat's settings choose."""

        async def enter(reply: Reply[Any]) -> None:
            reply.image = await self._image(origin, image, job)
            self._engine.validate("caption", CaptionRequest(reply.image.data, reply.image.name))

        # Caption, text and mood run side by side.
        return Reply(
            self,
            origin,
            "describe",
            enter,
            self._describe,
            object,
            quota="describe",
            engine_slots=3,
        )

    def caption(self, origin: Origin, image: ImageInput = None, prefix: str = "") -> Reply[Caption]:
        """One sentence about the image; ``prefix`` starts it ("a photography of")."""

        async def enter(reply: Reply[Any]) -> None:
            reply.image = await self._image(origin, image)
            self._engine.validate("caption", CaptionRequest(reply.image.data, prefix=prefix))

        async def produce(reply: Reply[Caption]) -> AsyncIterator[Part]:
            image = _required(reply)
            if waiting := await self._must_wait("caption", image, {"prefix": prefix}):
                yield waiting
            caption = await self._caption(image, prefix)
            reply.shown["caption"] = caption.text
            yield caption

        return Reply(
            self, origin, "caption", enter, produce, Caption, quota="describe", engine_slots=1
        )

    def ocr(self, origin: Origin, image: ImageInput = None) -> Reply[OcrResult]:
        """The text written in the image."""

        async def enter(reply: Reply[Any]) -> None:
            reply.image = await self._image(origin, image)

        async def produce(reply: Reply[OcrResult]) -> AsyncIterator[Part]:
            ocr = await self._ocr(_required(reply))
            reply.shown["ocr"] = ocr.text
            yield ocr

        return Reply(
            self, origin, "ocr", enter, produce, OcrResult, quota="describe", engine_slots=1
        )

    def tags(self, origin: Origin, image: ImageInput = None) -> Reply[Tags]:
        """Hashtags from the caption and the text in the image, with mood labels."""

        async def enter(reply: Reply[Any]) -> None:
            reply.image = await self._image(origin, image)

        async def produce(reply: Reply[Tags]) -> AsyncIterator[Part]:
            image = _required(reply)
            caption, ocr = await _together(self._caption(image, ""), self._ocr(image))
            tags = await self._hashtags(image, caption.text, ocr.text)
            reply.shown.update(caption=caption.text, ocr=ocr.text, tags=list(tags.hashtags))
            yield tags

        return Reply(self, origin, "tags", enter, produce, Tags, quota="describe", engine_slots=2)

    def ask(self, origin: Origin, question: str, image: ImageInput = None) -> Reply[Answer]:
        """Answer a question about the image."""

        async def enter(reply: Reply[Any]) -> None:
            reply.image = await self._image(origin, image)
            self._engine.validate("vqa", AskRequest(reply.image.data, question))

        async def produce(reply: Reply[Answer]) -> AsyncIterator[Part]:
            resolved = _required(reply)
            # Spacing never changes an answer; case may (a BLIP-2 prompt keeps it).
            params = {"question": " ".join(question.split())}
            if (waiting := await self._must_wait("vqa", resolved, params)) is not None:
                yield waiting
            request = AskRequest(resolved.data, question, resolved.name)
            answer: Answer = await self._cached(
                "vqa", resolved.sha256, params, lambda: self._run("vqa", request)
            )
            reply.shown.update(question=question, answer=answer.text)
            yield answer

        return Reply(self, origin, "ask", enter, produce, Answer, quota="ask", engine_slots=1)

    def write(
        self,
        origin: Origin,
        image: ImageInput = None,
        style: str = "",
        *,
        platform: str = "",
        date: str = "",
    ) -> Reply[SocialCaption]:
        """The social caption for an image: ``SocialDraft`` parts, then ``SocialCaption``.

        ``platform`` and ``date`` describe where and when the post goes out, when that is
        not the chat the request came from, today.
        """

        async def enter(reply: Reply[Any]) -> None:
            reply.image = await self._image(origin, image)
            self._check_style(style)

        async def produce(reply: Reply[SocialCaption]) -> AsyncIterator[Part]:
            resolved = _required(reply)
            caption, ocr = await _together(self._caption(resolved, ""), self._ocr(resolved))
            tags = await self._hashtags(resolved, caption.text, ocr.text)
            reply.shown.update(caption=caption.text, ocr=ocr.text, tags=list(tags.hashtags))
            chosen = style or (await self.chat_settings(origin.chat)).style
            context = self._post(origin, caption.text, ocr.text, tags.hashtags)
            context = replace(
                context, platform=platform or context.platform, date=date or context.date
            )
            async for part in self._write(resolved.sha256, WriteRequest(context, chosen)):
                if isinstance(part, SocialCaption):
                    reply.shown["social"] = part.text
                yield part

        return Reply(
            self, origin, "write", enter, produce, SocialCaption, quota="write", engine_slots=2
        )

    def reimagine(
        self,
        origin: Origin,
        text: str,
        image: ImageInput = None,
        *,
        use_context_image: bool = True,
        strength: float | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        job: JournalEntry | None = None,
    ) -> Reply[GeneratedImage]:
        """A new image from ``text``: img2img on the image meant, or txt2img with none.

        With no image given, ``use_context_image`` takes the image replied to or the chat's
        last one, and makes one from text alone when the chat has none yet; ``False``
        (``/imagine``) always makes one from text alone.
        """

        def request(reply: Reply[GeneratedImage]) -> ReimagineRequest:
            data = None if reply.image is None else reply.image.data
            return ReimagineRequest(
                text, data, strength=strength, steps=steps, guidance=guidance, seed=seed
            )

        async def enter(reply: Reply[GeneratedImage]) -> None:
            if image is not None or (use_context_image and origin.reply_to is not None):
                reply.image = await self._image(origin, image, job)
            elif use_context_image:
                # The chat's last image when it has one; else an image from text alone.
                sha = await self._store.last_image(origin.chat)
                reply.image = None if sha is None else await self._stored(sha)
                if sha is not None and job is not None:
                    await job.keep_image(sha)
            self._engine.validate("reimagine", request(reply))

        async def produce(reply: Reply[GeneratedImage]) -> AsyncIterator[Part]:
            events = self._engine.stream("reimagine", request(reply), _reserved.get(None))
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    if isinstance(event, Warming):
                        yield WarmingUp("reimagine", event.eta_s)
                    elif isinstance(event, Partial) and isinstance(event.value, StepProgress):
                        yield event.value
                    elif isinstance(event, Outcome):
                        _log_request("reimagine", event)
                        made: GeneratedImage = event.value
                        stored = await self._store.put_image(made.png, origin.user, self._clock())
                        reply.made_sha256 = stored.sha256
                        reply.shown.update(
                            prompt=text, seed=made.seed, steps=made.steps, made=stored.sha256
                        )
                        yield made

        return Reply(
            self,
            origin,
            "reimagine",
            enter,
            produce,
            GeneratedImage,
            quota="reimagine",
            engine_slots=1,
        )

    def reroll(self, origin: Origin, handle: str) -> Reply[Caption]:
        """A new caption for the answer behind ``handle``; that answer then shows it, so
        a reimagine from its buttons starts from the new caption."""
        original: list[AnswerRecord] = []

        async def enter(reply: Reply[Caption]) -> None:
            answer = await self._answer(origin, handle)
            if answer.kind == "reimagine" or answer.sha256 is None:
                raise InvalidRequest(
                    "Only a description's caption can be made again; reply to the new image "
                    "to describe it."
                )
            original.append(answer)
            # The rerolled answer is the one its buttons belong to, not a new one.
            reply.handle = answer.handle
            reply.image = await self._image(origin, Stored(answer.sha256))
            self._engine.validate("caption", CaptionRequest(reply.image.data, sample=True))

        async def produce(reply: Reply[Caption]) -> AsyncIterator[Part]:
            resolved = _required(reply)
            request = CaptionRequest(resolved.data, resolved.name, sample=True)
            caption = await self._sampled_caption(request)
            reply.shown.update(json.loads(original[0].result))
            reply.shown["caption"] = caption.text
            yield caption

        return Reply(
            self, origin, "reroll", enter, produce, Caption, quota="describe", engine_slots=1
        )

    async def _sampled_caption(self, request: CaptionRequest) -> Caption:
        """A sampled caption; a draw that cleans up to no text is drawn again (it is one
        sample among many, not the image's fault), up to ``_SAMPLE_TRIES`` in all."""
        for _ in range(_SAMPLE_TRIES - 1):
            with contextlib.suppress(NoUsableText):
                caption: Caption = await self._run("caption", request)
                return caption
        last: Caption = await self._run("caption", request)
        return last

    # -- answers and their buttons ---------------------------------------------------------

    async def answer(self, origin: Origin, handle: str) -> AnswerRecord:
        """The answer behind a button's ``handle``, if it belongs to this chat."""
        return await self._answer(origin, handle)

    async def replied_answer(self, origin: Origin) -> AnswerRecord | None:
        """The answer of the bot's message that ``origin`` replies to; None when it replies
        to no message, or to one that is not an answer of the bot's."""
        if origin.reply_to is None:
            return None
        handle = await self._store.answer_of_message(origin.chat, origin.reply_to)
        return None if handle is None else await self._store.get_answer(handle)

    async def link_message(self, origin: Origin, handle: str, message_id: str) -> None:
        """Make a message of the bot's (a prompt for a question, or for an edited caption)
        stand for the answer behind ``handle``: a reply to it means that answer's image,
        and ``replied_answer`` finds the answer, after restarts too."""
        answer = await self._answer(origin, handle)
        sha = json.loads(answer.result).get("made") or answer.sha256
        if sha:
            await self._store.remember_image(
                origin.chat, message_id, 0, sha, origin.user, self._clock(), answer=handle
            )

    def may_change_settings(self, origin: Origin) -> bool:
        """The user of a private chat, the chat's administrators and the bot's admins."""
        return origin.private or origin.chat_admin or self._admission.is_admin(origin.user)

    async def caption_of(self, origin: Origin, handle: str) -> str:
        """The caption an answer showed, for a user to edit into a reimagine prompt."""
        text = _caption_shown(await self._answer(origin, handle))
        if not text:
            raise InvalidRequest("That answer has no caption to edit; write the new text.")
        return text

    async def known_caption(self, origin: Origin) -> str:
        """The caption already known for the message ``origin`` replies to (the bot's
        answer's, or one made before for that message's image), without running a model;
        "" when none is."""
        answer = await self.replied_answer(origin)
        if answer is not None and (text := _caption_shown(answer)):
            return text
        if origin.reply_to is None:
            return ""
        images = await self._store.images_of_message(origin.chat, origin.reply_to)
        if not images:
            return ""
        position = origin.reply_position if origin.reply_position is not None else min(images)
        sha = images.get(position)
        if sha is None:
            return ""
        hit = await self._store.get_result(self._key("caption", sha, {"prefix": ""}))
        return codec.decode(hit).text if hit is not None else ""

    async def rate(self, origin: Origin, sha256: str, task: str, score: int) -> None:
        """Thumbs up (+1) or down (-1) on a result."""
        if not _SHA256.fullmatch(sha256):
            raise InvalidRequest("A rating names an image by its sha256 (64 hex digits).")
        if task not in RATED:
            raise InvalidRequest(f"A rating is about one of: {', '.join(RATED)}.")
        if type(score) is not int or score not in (1, -1):  # bool is an int; True is not +1
            raise InvalidRequest("A rating is thumbs up (1) or thumbs down (-1).")
        await self._store.rate(Rating(origin.user, sha256, task, score, self._clock()))

    async def rate_answer(self, origin: Origin, handle: str, score: int) -> None:
        """Thumbs up (+1) or down (-1) from an answer's buttons."""
        answer = await self._answer(origin, handle)
        if type(score) is not int or score not in (1, -1):
            raise InvalidRequest("A rating is thumbs up (1) or thumbs down (-1).")
        # A made image is rated as itself, not as the image it was made from.
        sha = json.loads(answer.result).get("made") or answer.sha256
        if not sha:
            raise InvalidRequest("That answer cannot be rated.")
        rating = Rating(origin.user, sha, answer.kind, score, self._clock(), answer.handle)
        await self._store.rate(rating)

    # -- chats and users -------------------------------------------------------------------

    async def forget(self, origin: Origin) -> Forgotten:
        """Unlink the user from everything they sent; delete what only they sent.

        Their requests still running are ended first, so none of them writes an answer
        or a result back after the forgetting.
        """
        theirs = [r for r in self._replies if r.origin.user == origin.user and not r.done]
        for reply in theirs:
            reply.abort(InvalidRequest("Stopped: you asked the bot to forget your images."))
        await asyncio.gather(*(reply.wait() for reply in theirs))
        return await self._store.forget_user(origin.user)

    async def usage(self, origin: Origin) -> tuple[UsageLine, ...]:
        """What the user has used of each daily quota today."""
        return await self._admission.usage(origin.user)

    async def chat_settings(self, chat: ChatRef) -> ChatSettings:
        stored = await self._store.get_chat_settings(chat)
        if stored is None:
            return ChatSettings(parts=self._settings.describe_parts)
        values = json.loads(stored)
        return ChatSettings(
            parts=tuple(values.get("parts", DESCRIBE_PARTS)),
            style=values.get("style", ""),
            auto_describe=bool(values.get("auto_describe", False)),
            alt_text=bool(values.get("alt_text", False)),
        )

    async def update_chat_settings(
        self,
        origin: Origin,
        *,
        parts: tuple[str, ...] | None = None,
        style: str | None = None,
        auto_describe: bool | None = None,
        alt_text: bool | None = None,
    ) -> ChatSettings:
        """Change what this chat's descriptions contain: the user of a private chat, the
        chat's administrators (as the platform says) and the bot's admins may."""
        if not self.may_change_settings(origin):
            raise InvalidRequest("Only this chat's administrators can change its settings.")
        current = await self.chat_settings(origin.chat)
        if parts is not None:
            unknown = sorted(set(parts) - set(DESCRIBE_PARTS))
            if unknown or not parts:
                raise InvalidRequest(f"Parts are any of {', '.join(DESCRIBE_PARTS)}.")
            current = replace(current, parts=tuple(p for p in DESCRIBE_PARTS if p in parts))
        if style is not None:
            self._check_style(style)
            current = replace(current, style=style.strip())
        if auto_describe is not None:
            current = replace(current, auto_describe=auto_describe)
        if alt_text is not None:
            current = replace(current, alt_text=alt_text)
        value = json.dumps(
            {
                "parts": list(current.parts),
                "style": current.style,
                "auto_describe": current.auto_describe,
                "alt_text": current.alt_text,
            }
        )
        await self._store.put_chat_settings(origin.chat, value)
        return current

    async def readiness(self) -> dict[str, bool]:
        """Whether what the service stands on works now: the store answers a query, and
        the engine's device thread is alive."""
        try:
            await self._store.get_chat_settings(_PROBE_CHAT)
            store = True
        except Exception as error:  # closed, locked, its disk gone: not ready, say why
            logger.warning("readiness: the store did not answer (%s)", error)
            store = False
        return {"store": store, "engine": not self._engine.stats().dead}

    def status(self) -> ServiceStatus:
        """Per task: loaded or not, how many wait, and about how long a new request waits."""
        stats = self._engine.stats()
        return ServiceStatus(
            accepting=self._accepting and not stats.dead,
            in_flight=len(self._replies),
            tasks=tuple(
                TaskStatus(task.name, task.loaded, task.queued, round(task.eta_s, 1))
                for task in stats.tasks
            ),
        )

    def eta(self, task: str) -> float:
        for stats in self._engine.stats().tasks:
            if stats.name == task:
                return stats.eta_s
        return 0.0

    # -- the job journal: answer every accepted event exactly once -----------------------

    async def journal(
        self, event_id: str, origin: Origin, kind: str, request: Mapping[str, Any]
    ) -> JournalEntry:
        """Journal a platform event before any work on it; ``DuplicateEvent`` if it was
        accepted before (a redelivery), which must not be answered again."""
        entry = JournalEntry(self, event_id, origin, kind, request, [])
        job = Job(event_id, origin.chat, origin.user, kind, entry.payload(), self._clock())
        if not await self._store.begin_job(job):
            raise DuplicateEvent(event_id)
        return entry

    async def recover(
        self, platform: str, answer: Callable[[JournalEntry], Awaitable[None]]
    ) -> int:
        """After a restart, answer ``platform``'s accepted but unanswered events, oldest
        first, once each; returns how many. An answer that fails is logged and closed, so
        one poisoned event cannot be retried at every start."""
        recovered = 0
        for job in await self._store.unfinished_jobs():
            if job.chat.platform != platform:
                continue
            try:
                await answer(_entry_of(self, job))
            except (EngineDead, ShuttingDown):
                raise  # not this event's fault: it stays unanswered for the next start
            except Exception:
                logger.exception("recovering %s failed; it will not be retried", job.event_id)
            await self._store.finish_job(job.event_id, self._clock())
            recovered += 1
            metrics.RECOVERED.labels(platform).inc()
        if recovered:
            logger.info("recovered %d unanswered %s events", recovered, platform)
        return recovered

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self, grace_s: float) -> None:
        """Take no new work; give what runs ``grace_s`` seconds to finish; then end the
        rest with ``ShuttingDown``, so every caller gets an explicit last word."""
        self._accepting = False
        running = [reply for reply in self._replies if not reply.done]
        if running:
            logger.info(
                "stopping: %d requests in flight; waiting up to %g s for them",
                len(running),
                grace_s,
            )
            _, late = await asyncio.wait(
                [asyncio.ensure_future(reply.wait()) for reply in running], timeout=grace_s
            )
            for waiter in late:
                waiter.cancel()
            cut = [reply for reply in running if not reply.done]
            for reply in cut:
                reply.abort(ShuttingDown())
            if cut:
                logger.warning(
                    "stopping: %d requests did not finish within %g s and were told the "
                    "bot is restarting",
                    len(cut),
                    grace_s,
                )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- for Reply ---------------------------------------------------------------------------

    def _admit(self, reply: Reply[Any]) -> Callable[[], None]:
        self._still_accepting()
        if self._engine.stats().dead:
            raise EngineDead()
        release_slot = self._admission.enter(reply.origin.user)
        self._replies.add(reply)
        reply.handle = _new_handle()

        def release() -> None:
            self._replies.discard(reply)
            release_slot()

        return release

    def _still_accepting(self) -> None:
        if not self._accepting:
            raise ShuttingDown()

    def _spawn(
        self,
        work: Coroutine[Any, Any, None],
        name: str,
        origin: Origin,
        reservation: Reservation | None,
    ) -> asyncio.Task[None]:
        # The work's own context names its origin (for the one log line per model request)
        # and the engine room it reserved; tasks it starts inherit both.
        context = contextvars.copy_context()
        context.run(_current.set, origin)
        context.run(_reserved.set, reservation)
        task = asyncio.get_running_loop().create_task(work, name=name, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    def _use_room(reservation: Reservation) -> None:
        """Model requests from here on in this task (and tasks it starts) use this room:
        for work that waited in line for it after it was spawned."""
        _reserved.set(reservation)

    async def _record_answer(self, reply: Reply[Any]) -> None:
        shown = json.dumps(reply.shown, ensure_ascii=False, sort_keys=True)
        await self._store.put_answer(
            AnswerRecord(
                reply.handle,
                reply.origin.chat,
                reply.origin.user,
                reply.kind,
                reply.sha256,
                shown,
                self._clock(),
            )
        )

    async def _record_message(self, reply: Reply[Any], message_id: str) -> None:
        sha = reply.made_sha256 or reply.sha256
        if sha is not None:
            await self._store.remember_image(
                reply.origin.chat,
                message_id,
                0,
                sha,
                reply.origin.user,
                self._clock(),
                answer=reply.handle,
            )

    # -- internals: images -------------------------------------------------------------------

    async def _image(
        self, origin: Origin, image: ImageInput, job: JournalEntry | None = None
    ) -> ResolvedImage:
        match image:
            case Upload(data=data, name=name, position=position, message_id=carrier):
                resolved = await self._keep(origin, data, name, position, carrier)
            case Link(url=url, position=position):
                if self._fetcher is None:
                    raise InvalidRequest("This bot takes images as files, not links.")
                fetched = await self._fetcher.fetch(url, MAX_BYTES)
                resolved = await self._keep(origin, fetched.data, fetched.name, position)
            case Stored(sha256=sha256):
                resolved = await self._stored(sha256)
            case FromAnswer(handle=handle):
                answer = await self._answer(origin, handle)
                # A made image's answer means the new image, as a reply to it does.
                sha = json.loads(answer.result).get("made") or answer.sha256
                if not sha:
                    raise InvalidRequest("That answer has no image.")
                resolved = await self._stored(sha)
            case None:
                resolved = await self._replied_to(origin)
        if job is not None:
            await job.keep_image(resolved.sha256)
        return resolved

    async def _keep(
        self, origin: Origin, data: bytes, name: str, position: int, carrier: str | None = None
    ) -> ResolvedImage:
        # Checked before it is stored, so a bad upload never becomes the chat's last image.
        # At a small working size: every byte is still decoded (a truncated file is still
        # refused), but a JPEG costs a fraction of a full decode.
        await asyncio.to_thread(decode_working, data, name, min_long_side=64, min_short_side=8)
        now = self._clock()
        stored = await self._store.put_image(data, origin.user, now)
        # The web and the command line have no message ids; an upload is its own message.
        message_id = carrier or origin.message_id or f"upload-{secrets.token_hex(8)}"
        await self._store.remember_image(
            origin.chat, message_id, position, stored.sha256, origin.user, now
        )
        return ResolvedImage(stored.sha256, data, name)

    async def _stored(self, sha256: str) -> ResolvedImage:
        data = await self._store.get_image(sha256)
        if data is None:
            raise InvalidRequest("That image is no longer kept; please send it again.")
        return ResolvedImage(sha256, data, "image")

    async def _replied_to(self, origin: Origin) -> ResolvedImage:
        if origin.reply_to is None:
            return await self._last_image(origin)
        images = await self._store.images_of_message(origin.chat, origin.reply_to)
        if not images:
            raise InvalidRequest(
                "I don't know the message you replied to; reply to an image or to my "
                "answer about it, or send the image again."
            )
        position = origin.reply_position
        if position is None:
            if len(images) > 1:
                raise InvalidRequest(
                    f"That message has {len(images)} images; reply to my answer about the "
                    "one you mean."
                )
            [position] = images
        if position not in images:
            raise InvalidRequest(
                f"I don't have image {position + 1} of that message; reply to my answer "
                "about the one you mean."
            )
        return await self._stored(images[position])

    async def _last_image(self, origin: Origin) -> ResolvedImage:
        sha = await self._store.last_image(origin.chat)
        if sha is None:
            raise InvalidRequest("Send an image first, or reply to one.")
        return await self._stored(sha)

    async def _answer(self, origin: Origin, handle: str) -> AnswerRecord:
        answer = await self._store.get_answer(handle) if _HANDLE.fullmatch(handle) else None
        if answer is None or answer.chat != origin.chat:
            raise InvalidRequest("That button no longer works here; send the image again.")
        return answer

    # -- internals: work -------------------------------------------------------------------

    async def _describe(self, reply: Reply[object]) -> AsyncIterator[Part]:
        image = _required(reply)
        origin = reply.origin
        settings = await self.chat_settings(origin.chat)
        wanted = settings.parts
        # Hashtags and the social caption are made from the caption and the text.
        needs_caption = bool({"caption", "tags", "social"} & set(wanted))
        needs_ocr = bool({"ocr", "tags", "social"} & set(wanted))
        # 1. The caption and the text in the image are made side by side; the caption is
        #    shown first, since it is what tells a user the bot is at work.
        waiting = await self._must_wait("caption", image, {"prefix": ""}) if needs_caption else None
        caption_job = _job(self._caption(image, "") if needs_caption else None)
        ocr_job = _job(self._ocr(image) if needs_ocr else None)
        try:
            if waiting is not None:
                yield waiting
            caption = await _part("caption", caption_job)
            if "caption" in wanted:
                yield caption
            ocr = await _part("ocr", ocr_job)
            if "ocr" in wanted:
                yield ocr
        finally:
            await _cancel(caption_job, ocr_job)
        caption_text = caption.text if isinstance(caption, Caption) else ""
        ocr_text = ocr.text if isinstance(ocr, OcrResult) else ""
        reply.shown.update(caption=caption_text, ocr=ocr_text)
        if not ("tags" in wanted or "social" in wanted):
            return
        # 2. Hashtags from both, then the social caption from everything.
        if caption_text or ocr_text:
            tags: Tags | Unavailable = await _part(
                "tags", self._hashtags(image, caption_text, ocr_text)
            )
        else:
            tags = Unavailable("tags", "There is nothing to make hashtags from.")
        hashtags = tags.hashtags if isinstance(tags, Tags) else ()
        reply.shown["tags"] = list(hashtags)
        if "tags" in wanted:
            yield tags
        if "social" not in wanted:
            return
        if not (caption_text or ocr_text):
            yield Unavailable("social", "There is nothing to write a caption from.")
            return
        # The social caption spends the write quota, only now that one will be written;
        # out of it, the rest of the answer has come all the same.
        refusal = await self._admission.try_take(origin.user, "write")
        if refusal is not None:
            yield Unavailable("social", str(refusal))
            return
        context = self._post(origin, caption_text, ocr_text, hashtags)
        try:
            async for part in self._write(image.sha256, WriteRequest(context, settings.style)):
                if isinstance(part, SocialCaption):
                    reply.shown["social"] = part.text
                yield part
        except (EngineDead, ShuttingDown):
            raise
        except CaptionbotError as error:
            yield Unavailable("social", str(error))

    async def _must_wait(
        self, task: str, image: ResolvedImage, params: dict[str, Any]
    ) -> Waiting | WarmingUp | None:
        """Where this request stands when it must wait: taken before it joins the queue,
        so ``ahead`` never counts the request itself; nothing when it joins identical
        work already under way or its result is cached."""
        key = self._key(task, image.sha256, params)
        if key in self._flights:
            return None
        stats = next((t for t in self._engine.stats().tasks if t.name == task), None)
        if stats is None or (stats.loaded and not stats.queued):
            return None
        standing: Waiting | WarmingUp = (
            WarmingUp(task, stats.ready_in_s)
            if not stats.loaded
            else Waiting(task, stats.queued, round(stats.eta_s, 1))
        )
        if await self._store.get_result(key) is not None:
            return None
        return standing

    def _key(self, task: str, sha: str, params: dict[str, Any]) -> ResultKey:
        return ResultKey(
            sha, task, self._engine.task(task).identity(), json.dumps(params, sort_keys=True)
        )

    async def _cached(
        self, task: str, sha: str, params: dict[str, Any], run: Callable[[], Awaitable[Any]]
    ) -> Any:
        key = self._key(task, sha, params)

        async def compute() -> Any:
            hit = await self._store.get_result(key)
            metrics.RESULTS_CACHE.labels(task, "hit" if hit is not None else "miss").inc()
            if hit is not None:
                _log_request(task, None)
                return codec.decode(hit)
            value = await run()
            await self._store.put_result(key, codec.encode(value), self._clock())
            return value

        return await self._flights.run(key, compute)

    async def _run(self, task: str, request: Any) -> Any:
        outcome = await self._engine.run(task, request, _reserved.get(None))
        _log_request(task, outcome)
        return outcome.value

    async def _caption(self, image: ResolvedImage, prefix: str) -> Caption:
        request = CaptionRequest(image.data, image.name, prefix)
        result: Caption = await self._cached(
            "caption", image.sha256, {"prefix": prefix}, lambda: self._run("caption", request)
        )
        return result

    async def _ocr(self, image: ResolvedImage) -> OcrResult:
        request = OcrRequest(image.data, image.name)
        result: OcrResult = await self._cached(
            "ocr", image.sha256, {}, lambda: self._run("ocr", request)
        )
        return result

    async def _hashtags(self, image: ResolvedImage, caption: str, ocr_text: str) -> Tags:
        request = TagsRequest(caption, ocr_text)
        text = json.dumps([caption, ocr_text], ensure_ascii=False)
        params = {"input": hashlib.sha256(text.encode()).hexdigest()}
        tags: Tags = await self._cached(
            "tags", image.sha256, params, lambda: self._run("tags", request)
        )
        labels: tuple[str, ...] = ()
        if "mood" in self._engine.task_names:
            mood_request = MoodRequest(image.data, image.name)
            mood: MoodLabels = await self._cached(
                "mood", image.sha256, {}, lambda: self._run("mood", mood_request)
            )
            labels = mood.hashtags
        return Tags(tuple(dict.fromkeys([*tags.hashtags, *labels])))

    def _post(
        self, origin: Origin, caption: str, ocr_text: str, hashtags: tuple[str, ...]
    ) -> PostContext:
        return PostContext(
            caption=caption,
            ocr_text=ocr_text,
            hashtags=hashtags,
            author=origin.author,
            date=self._clock().date().isoformat(),
            platform=origin.chat.platform,
            chat=origin.chat_title,
        )

    async def _write(self, sha: str, request: WriteRequest) -> AsyncIterator[Part]:
        """The social caption: cached, or joined when the same one is being written, or
        written here with its drafts."""
        params = {"context": dataclasses.asdict(request.context), "style": request.style}
        key = self._key("write", sha, params)
        hit = await self._store.get_result(key)
        if hit is not None:
            _log_request("write", None)
            yield codec.decode(hit)
            return
        if key in self._flights:
            # Someone else's identical request is writing it: their caption is ours. Its
            # drafts go to them; this request gets the result.
            yield await self._flights.run(key, _never)
            return
        drafts = _Latest()

        async def written() -> SocialCaption:
            events = self._engine.stream("write", request, _reserved.get(None))
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    if isinstance(event, Warming):
                        drafts.put(WarmingUp("write", event.eta_s))
                    elif isinstance(event, Partial):
                        drafts.put(SocialDraft(str(event.value)))
                    else:
                        _log_request("write", event)
                        social: SocialCaption = event.value
                        await self._store.put_result(key, codec.encode(social), self._clock())
                        return social
            raise InferenceFailed("The writer stopped before the caption was done.")

        writing = asyncio.ensure_future(self._flights.run(key, written))
        try:
            while not writing.done():
                part = await drafts.next_or(writing)
                if part is not None:
                    yield part
            yield writing.result()
        finally:
            await _cancel(writing)

    def _check_style(self, style: str) -> None:
        if len(style.strip()) > MAX_STYLE_CHARS:
            raise InvalidRequest(f"A style is a few words, at most {MAX_STYLE_CHARS} characters.")


# -- helpers -----------------------------------------------------------------------------


def _caption_shown(answer: AnswerRecord) -> str:
    shown = json.loads(answer.result)
    return str(shown.get("caption") or shown.get("prompt") or "")


def _required(reply: Reply[Any]) -> ResolvedImage:
    assert reply.image is not None  # entering resolved it, or refused
    return reply.image


async def _part(name: str, work: Awaitable[Any] | None) -> Any:
    """A part's value, or ``Unavailable`` with the reason when its model failed on it;
    None for a part nobody asked for."""
    if work is None:
        return None
    try:
        return await work
    except (EngineDead, ShuttingDown):
        raise
    except CaptionbotError as error:
        return Unavailable(name, str(error))


async def _together(*works: Coroutine[Any, Any, Any]) -> list[Any]:
    """Every result; or, as soon as one fails, that failure, with the others stopped."""
    jobs = [asyncio.ensure_future(work) for work in works]
    try:
        await asyncio.wait(jobs, return_when=asyncio.FIRST_EXCEPTION)
        return [job.result() for job in jobs]
    finally:
        await _cancel(*jobs)


def _job(work: Coroutine[Any, Any, Any] | None) -> asyncio.Future[Any] | None:
    return None if work is None else asyncio.ensure_future(work)


async def _cancel(*jobs: asyncio.Future[Any] | None) -> None:
    """Stop jobs a reply no longer needs, and wait until they have stopped."""
    running = [job for job in jobs if job is not None and not job.done()]
    for job in running:
        job.cancel()
    if running:
        await asyncio.wait(running)
    for finished in jobs:
        if finished is not None and finished.done() and not finished.cancelled():
            finished.exception()  # retrieved: a failure nobody needs is not "never retrieved"


async def _never() -> Any:
    raise AssertionError("joined work is never started by the joiner")


class _Latest:
    """The newest draft of a caption being written, for the one reader that streams it."""

    def __init__(self) -> None:
        self._value: Part | None = None
        self._changed = asyncio.Event()

    def put(self, value: Part) -> None:
        self._value = value
        self._changed.set()

    async def next_or(self, done: asyncio.Future[Any]) -> Part | None:
        """The newest value, or None once ``done`` finished first."""
        if self._value is None:
            changed = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait({changed, done}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
        value, self._value = self._value, None
        self._changed.clear()
        return value


def _new_handle() -> str:
    # 60 random bits in 10 URL-safe characters: unguessable, and short enough for
    # Telegram's 64-byte callback data with room for the action.
    return secrets.token_urlsafe(8)[:10]


def _entry_of(service: Service, job: Job) -> JournalEntry:
    try:
        payload = json.loads(job.payload)
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    raw = payload.get("origin")
    origin = Origin(job.user, job.chat)  # all an old or unreadable payload can give
    if isinstance(raw, dict):
        # Fields of the Origin it was journalled with that this version still has.
        known = {f.name for f in dataclasses.fields(Origin)} - {"user", "chat"}
        origin = dataclasses.replace(origin, **{k: v for k, v in raw.items() if k in known})
    request = payload.get("request", {})
    images = [sha for sha in payload.get("images", []) if _SHA256.fullmatch(str(sha))]
    messages = [str(m) for m in payload.get("messages", []) if isinstance(m, str | int)]
    return JournalEntry(
        service,
        job.event_id,
        origin,
        job.kind,
        request if isinstance(request, dict) else {},
        images,
        recovered=True,
        messages=messages,
    )


def _log_request(task: str, outcome: Outcome | None) -> None:
    """One line per model request: platform, task, queue wait, device time, cache hit."""
    origin = _current.get(None)
    platform = origin.chat.platform if origin is not None else "-"
    if outcome is None:
        logger.info("request platform=%s task=%s cache=hit", platform, task)
    else:
        logger.info(
            "request platform=%s task=%s queue_s=%.3f device_s=%.3f cache=miss",
            platform,
            task,
            outcome.queue_s,
            outcome.device_s,
        )
