"""The use cases every adapter calls; nothing here knows Discord, Telegram or SQL.

Each use case: admit the user (requests at once, daily quota; admins are exempt), find the
image (the one sent, else the one replied to, else the chat's last), answer from the
results cache when image, task, model and parameters match, else run the engine and
cache what it returns. The same image never costs the device twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, time, timedelta
from typing import Any

from core import codec
from core.engine import Engine, Outcome, Partial, Warming
from core.errors import InvalidRequest, LimitReached
from core.images import decode_image
from core.ports import ChatRef, Forgotten, Job, Rating, ResultKey, Store, UserRef
from core.settings import ServiceSettings
from core.types import (
    Answer,
    AskRequest,
    Caption,
    CaptionRequest,
    GeneratedImage,
    MoodLabels,
    MoodRequest,
    OcrRequest,
    OcrResult,
    PostContext,
    ReimagineRequest,
    SocialCaption,
    StepProgress,
    Tags,
    TagsRequest,
    WriteRequest,
)

logger = logging.getLogger(__name__)

# The request being served, so the one log line per model request can name its platform.
_current: contextvars.ContextVar[Origin] = contextvars.ContextVar("captionbot_origin")

DESCRIBE_PARTS = ("caption", "ocr", "tags", "social")


@dataclass(frozen=True, slots=True)
class Origin:
    """Who asked, where, and in reply to what."""

    user: UserRef
    chat: ChatRef
    # The platform message carrying the request, and the one it replies to.
    message_id: str | None = None
    reply_to: str | None = None
    # Shown to the caption writer as metadata (data, never instructions).
    author: str = ""
    chat_title: str = ""


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a ``describe`` answer, delivered as soon as it exists.

    ``name`` is ``caption`` (a Caption), ``ocr`` (an OcrResult), ``tags`` (a tuple of
    hashtags), ``social_draft`` (the writer's text so far) or ``social`` (a SocialCaption);
    ``waiting`` (a Waiting) comes first when the request must queue or a model warm up.
    """

    name: str
    value: Any


@dataclass(frozen=True, slots=True)
class Waiting:
    """Where a request stands before its work starts."""

    task: str
    queued: int
    eta_s: float
    warming_up: bool


@dataclass(frozen=True, slots=True)
class ChatSettings:
    parts: tuple[str, ...] = DESCRIBE_PARTS
    # The social caption's tone for this chat; "" uses the configured one.
    style: str = ""


class Service:
    def __init__(
        self,
        engine: Engine,
        store: Store,
        settings: ServiceSettings,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._store = store
        self._settings = settings
        self._clock = clock
        self._in_flight: dict[UserRef, int] = {}
        self._quotas = {
            "describe": settings.daily_describe,
            "ask": settings.daily_ask,
            "write": settings.daily_write,
            "reimagine": settings.daily_reimagine,
        }

    # -- use cases -------------------------------------------------------------------------

    async def describe(
        self, origin: Origin, image: bytes, name: str = "image"
    ) -> AsyncGenerator[Part, None]:
        """Caption first, then OCR text, hashtags (with mood labels) and the social caption."""
        async with self._admitted(origin, "describe"):
            sha = await self._keep(origin, image, name)
            parts = (await self.chat_settings(origin.chat)).parts
            if (waiting := self._must_wait("caption")) is not None:
                yield Part("waiting", waiting)
            # OCR runs beside the caption; whichever it is, the caption is shown first.
            caption_job = asyncio.ensure_future(self._caption(sha, image, name, ""))
            ocr_job = asyncio.ensure_future(self._ocr(sha, image, name))
            try:
                caption = await caption_job
                if "caption" in parts:
                    yield Part("caption", caption)
                ocr = await ocr_job
                if "ocr" in parts:
                    yield Part("ocr", ocr)
                hashtags: tuple[str, ...] = ()
                if "tags" in parts or "social" in parts:
                    hashtags = await self._hashtags(sha, image, name, caption, ocr)
                    if "tags" in parts:
                        yield Part("tags", hashtags)
                if "social" in parts:
                    context = self._post(origin, caption.text, ocr.text, hashtags)
                    style = (await self.chat_settings(origin.chat)).style
                    async for part in self._write(sha, WriteRequest(context, style)):
                        yield part
            finally:
                for job in (caption_job, ocr_job):
                    job.cancel()
                await asyncio.gather(caption_job, ocr_job, return_exceptions=True)

    async def caption(
        self, origin: Origin, image: bytes | None = None, prefix: str = ""
    ) -> Caption:
        async with self._admitted(origin, "describe"):
            sha, data = await self._image(origin, image)
            return await self._caption(sha, data, "image", prefix)

    async def ocr(self, origin: Origin, image: bytes | None = None) -> OcrResult:
        async with self._admitted(origin, "describe"):
            sha, data = await self._image(origin, image)
            return await self._ocr(sha, data, "image")

    async def tags(self, origin: Origin, image: bytes | None = None) -> tuple[str, ...]:
        async with self._admitted(origin, "describe"):
            sha, data = await self._image(origin, image)
            caption, ocr = await asyncio.gather(
                self._caption(sha, data, "image", ""), self._ocr(sha, data, "image")
            )
            return await self._hashtags(sha, data, "image", caption, ocr)

    async def ask(
        self, origin: Origin, question: str, image: bytes | None = None, name: str = "image"
    ) -> Answer:
        """Answer about the image sent, else the one replied to, else the chat's last."""
        async with self._admitted(origin, "ask"):
            sha, data = await self._image(origin, image, name)
            request = AskRequest(data, question, name)
            params = {"question": " ".join(question.split()).lower()}
            result: Answer = await self._cached(
                "vqa", sha, params, lambda: self._run("vqa", request)
            )
            return result

    async def write(
        self, origin: Origin, image: bytes | None = None, style: str = ""
    ) -> AsyncGenerator[Part, None]:
        """The social caption for an image, streamed as ``social_draft`` parts then ``social``."""
        async with self._admitted(origin, "write"):
            sha, data = await self._image(origin, image)
            caption, ocr = await asyncio.gather(
                self._caption(sha, data, "image", ""), self._ocr(sha, data, "image")
            )
            hashtags = await self._hashtags(sha, data, "image", caption, ocr)
            context = self._post(origin, caption.text, ocr.text, hashtags)
            style = style or (await self.chat_settings(origin.chat)).style
            async for part in self._write(sha, WriteRequest(context, style)):
                yield part

    async def reimagine(
        self,
        origin: Origin,
        text: str,
        image: bytes | None = None,
        *,
        name: str = "image",
        use_context_image: bool = True,
        strength: float | None = None,
        steps: int | None = None,
        seed: int | None = None,
    ) -> AsyncGenerator[Part, None]:
        """A new image from ``text``: img2img on the referenced image, or txt2img without one.

        Yields ``progress`` parts (StepProgress) while it runs, then ``image``.
        """
        async with self._admitted(origin, "reimagine"):
            data: bytes | None = image
            if image is not None or use_context_image:
                if image is not None:
                    _, data = await self._image(origin, image, name)
                else:
                    with contextlib.suppress(InvalidRequest):  # no image yet: txt2img
                        _, data = await self._image(origin, None)
            request = ReimagineRequest(text, data, name, strength=strength, steps=steps, seed=seed)
            if (waiting := self._must_wait("reimagine")) is not None:
                yield Part("waiting", waiting)
            async with contextlib.aclosing(self._engine.stream("reimagine", request)) as events:
                async for event in events:
                    if isinstance(event, Partial) and isinstance(event.value, StepProgress):
                        yield Part("progress", event.value)
                    elif isinstance(event, Outcome):
                        _log_request("reimagine", event)
                        result: GeneratedImage = event.value
                        yield Part("image", result)

    async def rate(self, origin: Origin, sha256: str, task: str, score: int) -> None:
        """Thumbs up (+1) or down (-1) on a result."""
        if score not in (1, -1):
            raise InvalidRequest("A rating is thumbs up or thumbs down.")
        await self._store.rate(Rating(origin.user, sha256, task, score, self._clock()))

    async def forget(self, origin: Origin) -> Forgotten:
        """Delete the images this user sent and everything derived from them."""
        return await self._store.forget_user(origin.user)

    async def chat_settings(self, chat: ChatRef) -> ChatSettings:
        stored = await self._store.get_chat_settings(chat)
        if stored is None:
            return ChatSettings(parts=self._settings.describe_parts)
        values = json.loads(stored)
        return ChatSettings(
            parts=tuple(values.get("parts", DESCRIBE_PARTS)), style=values.get("style", "")
        )

    async def update_chat_settings(
        self, origin: Origin, *, parts: tuple[str, ...] | None = None, style: str | None = None
    ) -> ChatSettings:
        if self._settings.admins and not self._is_admin(origin.user):
            raise InvalidRequest("Only the bot's admins can change this chat's settings.")
        current = await self.chat_settings(origin.chat)
        if parts is not None:
            unknown = sorted(set(parts) - set(DESCRIBE_PARTS))
            if unknown or not parts:
                raise InvalidRequest(f"Parts are any of {', '.join(DESCRIBE_PARTS)}.")
            current = replace(current, parts=tuple(p for p in DESCRIBE_PARTS if p in parts))
        if style is not None:
            if len(style) > 60:
                raise InvalidRequest("A style is a few words, at most 60 characters.")
            current = replace(current, style=style.strip())
        value = json.dumps({"parts": list(current.parts), "style": current.style})
        await self._store.put_chat_settings(origin.chat, value)
        return current

    # -- job journal: answer every accepted event exactly once ---------------------------

    async def accept(self, job: Job) -> bool:
        """Journal a platform event before working on it; False means it was seen before
        (a redelivery) and must not be answered again."""
        return await self._store.begin_job(job)

    async def done(self, event_id: str) -> None:
        """The event was answered; a restart will not answer it again."""
        await self._store.finish_job(event_id, self._clock())

    async def recover(self, platform: str, answer: Callable[[Job], Awaitable[None]]) -> int:
        """After a restart, answer ``platform``'s accepted but unanswered events, oldest
        first, once each; returns how many. An answer that fails is logged and closed, so
        one poisoned event cannot be retried at every start."""
        recovered = 0
        for job in await self._store.unfinished_jobs():
            if job.chat.platform != platform:
                continue
            try:
                await answer(job)
            except Exception:
                logger.exception("recovering %s failed; it will not be retried", job.event_id)
            await self.done(job.event_id)
            recovered += 1
        if recovered:
            logger.info("recovered %d unanswered %s events", recovered, platform)
        return recovered

    def waiting(self, task: str) -> Waiting:
        """Place in line and ETA for a new request to ``task``."""
        for stats in self._engine.stats().tasks:
            if stats.name == task:
                return Waiting(task, stats.queued, stats.eta_s, not stats.loaded)
        return Waiting(task, 0, 0.0, False)

    # -- internals ---------------------------------------------------------------------

    def _must_wait(self, task: str) -> Waiting | None:
        waiting = self.waiting(task)
        return waiting if waiting.queued or waiting.warming_up else None

    def _is_admin(self, user: UserRef) -> bool:
        return f"{user.platform}:{user.user_id}" in self._settings.admins

    @contextlib.asynccontextmanager
    async def _admitted(self, origin: Origin, use_case: str) -> AsyncIterator[None]:
        user = origin.user
        if self._is_admin(user):
            token = _current.set(origin)
            try:
                yield
            finally:
                _current.reset(token)
            return
        running = self._in_flight.get(user, 0)
        if running >= self._settings.per_user_in_flight:
            raise LimitReached(
                f"You already have {running} requests running; wait for one to finish.",
                self.waiting("caption").eta_s or 5.0,
            )
        limit = self._quotas[use_case]
        if limit:
            used = await self._store.add_usage(user, use_case, self._clock().date())
            if used > limit:
                now = self._clock()
                midnight = datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC)
                raise LimitReached(
                    f"You have used your {limit} {use_case} requests for today; "
                    "the count starts again at midnight UTC.",
                    (midnight - now).total_seconds(),
                )
        self._in_flight[user] = running + 1
        token = _current.set(origin)
        try:
            yield
        finally:
            _current.reset(token)
            self._in_flight[user] -= 1
            if not self._in_flight[user]:
                del self._in_flight[user]

    async def _keep(self, origin: Origin, image: bytes, name: str) -> str:
        # Refused before it is stored, so a bad upload never becomes the chat's last image.
        await asyncio.to_thread(decode_image, image, name)
        stored = await self._store.put_image(image, origin.user, self._clock())
        await self._store.remember_image(
            origin.chat, origin.message_id, stored.sha256, self._clock()
        )
        return stored.sha256

    async def _image(
        self, origin: Origin, image: bytes | None, name: str = "image"
    ) -> tuple[str, bytes]:
        if image is not None:
            return await self._keep(origin, image, name), image
        sha = None
        if origin.reply_to is not None:
            sha = await self._store.image_of_message(origin.chat, origin.reply_to)
        if sha is None:
            sha = await self._store.last_image(origin.chat)
        data = await self._store.get_image(sha) if sha is not None else None
        if sha is None or data is None:
            raise InvalidRequest("Send an image first, or reply to one.")
        return sha, data

    async def _run(self, task: str, request: Any) -> Any:
        outcome = await self._engine.run(task, request)
        _log_request(task, outcome)
        return outcome.value

    async def _cached(
        self, task: str, sha: str, params: dict[str, Any], run: Callable[[], Awaitable[Any]]
    ) -> Any:
        key = ResultKey(
            sha, task, self._engine.task(task).describe(), json.dumps(params, sort_keys=True)
        )
        hit = await self._store.get_result(key)
        if hit is not None:
            _log_request(task, None)
            return codec.decode(hit)
        value = await run()
        await self._store.put_result(key, codec.encode(value), self._clock())
        return value

    async def _caption(self, sha: str, image: bytes, name: str, prefix: str) -> Caption:
        request = CaptionRequest(image, name, prefix)
        result: Caption = await self._cached(
            "caption", sha, {"prefix": prefix}, lambda: self._run("caption", request)
        )
        return result

    async def _ocr(self, sha: str, image: bytes, name: str) -> OcrResult:
        result: OcrResult = await self._cached(
            "ocr", sha, {}, lambda: self._run("ocr", OcrRequest(image, name))
        )
        return result

    async def _hashtags(
        self, sha: str, image: bytes, name: str, caption: Caption, ocr: OcrResult
    ) -> tuple[str, ...]:
        request = TagsRequest(caption.text, ocr.text)
        params = {"input": hashlib.sha256(f"{caption.text}\n{ocr.text}".encode()).hexdigest()}
        tags: Tags = await self._cached("tags", sha, params, lambda: self._run("tags", request))
        labels: tuple[str, ...] = ()
        if "mood" in self._engine.task_names:
            mood: MoodLabels = await self._cached(
                "mood", sha, {}, lambda: self._run("mood", MoodRequest(image, name))
            )
            labels = mood.hashtags
        return tuple(dict.fromkeys([*tags.hashtags, *labels]))

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

    async def _write(self, sha: str, request: WriteRequest) -> AsyncGenerator[Part, None]:
        params = {"context": dataclasses.asdict(request.context), "style": request.style}
        key = ResultKey(
            sha, "write", self._engine.task("write").describe(), json.dumps(params, sort_keys=True)
        )
        hit = await self._store.get_result(key)
        if hit is not None:
            _log_request("write", None)
            yield Part("social", codec.decode(hit))
            return
        async with contextlib.aclosing(self._engine.stream("write", request)) as events:
            async for event in events:
                if isinstance(event, Warming):
                    yield Part("waiting", self.waiting("write"))
                elif isinstance(event, Partial):
                    yield Part("social_draft", event.value)
                else:
                    _log_request("write", event)
                    social: SocialCaption = event.value
                    await self._store.put_result(key, codec.encode(social), self._clock())
                    yield Part("social", social)


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
