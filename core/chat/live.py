"""Sending at a pace the platform allows, and one message that follows an answer as it grows.

``Outbox`` paces every message and edit: at most one per chat every ``chat_interval_s``,
no more than ``group_per_minute`` to a group in a minute, and a ``PlatformBusy`` (a 429)
waited out and retried. ``LiveMessage`` shows the newest state of an answer: sent as soon as
the pace allows, with whatever parts have come by then, then edited as more arrive; states
that come while a message or edit waits for its turn replace each other, so a chat never
receives a queue of stale edits, and the final state always goes out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from core import metrics
from core.chat.port import Keyboard, Platform, PlatformBusy
from core.chat.text import clip, split_text
from core.ports import ChatRef

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A platform that keeps answering 429 after this many waits is given up on for this call.
_ATTEMPTS = 6
_TYPING_EVERY_S = 4.0


class Outbox:
    def __init__(
        self,
        platform: Platform,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.platform = platform
        self._clock = clock
        self._sleep = sleep
        self._locks: dict[ChatRef, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._last: dict[ChatRef, float] = {}
        self._minute: dict[ChatRef, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )

    async def send(self, chat: ChatRef, call: Callable[[], Awaitable[T]], *, group: bool) -> T:
        """Run ``call`` (one message or edit to ``chat``) when the pace allows."""
        async with self._locks[chat]:
            for _ in range(_ATTEMPTS):
                await self._pace(chat, group)
                self._mark(chat)
                try:
                    return await call()
                except PlatformBusy as busy:
                    metrics.RATE_LIMITED.labels(self.platform.name).inc()
                    logger.info("%s asked to wait %.1f s", self.platform.name, busy.retry_after_s)
                    await self._sleep(busy.retry_after_s)
                finally:
                    # Counted from the answer too: then no network jitter can bring two
                    # calls closer together at the platform than the interval.
                    self._last[chat] = self._clock()
            return await call()  # the last try: its error, if any, is the caller's

    async def _pace(self, chat: ChatRef, group: bool) -> None:
        limits = self.platform.limits
        last = self._last.get(chat)
        if last is not None:
            wait = last + limits.chat_interval_s - self._clock()
            if wait > 0:
                await self._sleep(wait)
        if group:
            sent = self._minute[chat]
            while sent and sent[0] <= self._clock() - 60:
                sent.popleft()
            if len(sent) >= limits.group_per_minute:
                await self._sleep(sent[0] + 60 - self._clock())

    def _mark(self, chat: ChatRef) -> None:
        now = self._clock()
        self._last[chat] = now
        self._minute[chat].append(now)


class LiveMessage:
    def __init__(
        self, outbox: Outbox, chat: ChatRef, *, group: bool, reply_to: str | None = None
    ) -> None:
        self._outbox = outbox
        self._platform = outbox.platform
        self._chat = chat
        self._group = group
        self._reply_to = reply_to
        self.message_id: str | None = None
        self._sent: tuple[str, Keyboard] | None = None
        self._wanted: tuple[str, Keyboard] | None = None
        self._changed = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def limit(self) -> int:
        return self._platform.limits.text_chars

    async def start(self, text: str, *, resume: str | None = None) -> str:
        """Send the message when the pace allows, or show it in message ``resume`` (one an
        earlier run began) while that one can still be edited; the message's id.

        What goes out is the newest state at that moment: ``text``, or what ``update``
        asked for while the message waited for its turn. In a busy group the first
        message can wait seconds, and a first part ready meanwhile goes out in it instead
        of waiting a second turn for an edit."""
        if self._wanted is None:
            self._wanted = (clip(text, self.limit), ())
        if resume is not None:
            try:
                await self._outbox.send(
                    self._chat,
                    lambda: self._show_newest(
                        lambda text, keys: self._platform.edit_text(
                            self._chat, resume, text, keyboard=keys
                        )
                    ),
                    group=self._group,
                )
                self.message_id = resume
            except Exception as error:  # deleted meanwhile, say: a new message does as well
                logger.info("could not continue message %s (%s); sending anew", resume, error)
        if self.message_id is None:
            self.message_id = await self._outbox.send(
                self._chat,
                lambda: self._show_newest(
                    lambda text, keys: self._platform.send_text(
                        self._chat, text, reply_to=self._reply_to, keyboard=keys
                    )
                ),
                group=self._group,
            )
        self._flusher = asyncio.create_task(self._flush(), name="captionbot-live-message")
        return self.message_id

    async def _show_newest(self, show: Callable[[str, Keyboard], Awaitable[T]]) -> T:
        newest = self._wanted
        assert newest is not None  # start sets it first
        shown = await show(*newest)
        self._sent = newest
        return shown

    def update(self, text: str, keyboard: Keyboard = ()) -> None:
        """Show this next, as soon as the pace allows (replacing any state not yet shown)."""
        self._wanted = (clip(text, self.limit), keyboard)
        self._changed.set()

    async def finish(self, text: str, keyboard: Keyboard = ()) -> None:
        """Show the final state for sure; text past the limit follows in more messages."""
        pieces = split_text(text, self.limit)
        self.update(pieces[0], keyboard)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._show_wanted()
        for piece in pieces[1:]:
            await self._outbox.send(
                self._chat,
                lambda piece=piece: self._platform.send_text(  # type: ignore[misc]
                    self._chat, piece, reply_to=self.message_id
                ),
                group=self._group,
            )

    def abandon(self) -> None:
        """Stop following updates (the answer failed): no edit is left waiting to go out."""
        if self._flusher is not None:
            self._flusher.cancel()

    async def _flush(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._show_wanted()
            except Exception as error:
                # An intermediate state is worth no failure: the next state or the final
                # one (whose errors reach the caller) replaces it.
                logger.warning("an edit of message %s failed: %s", self.message_id, error)

    async def _show_wanted(self) -> None:
        wanted = self._wanted
        if wanted is None or wanted == self._sent or self.message_id is None:
            return
        message_id = self.message_id
        await self._outbox.send(
            self._chat,
            lambda: self._platform.edit_text(self._chat, message_id, wanted[0], keyboard=wanted[1]),
            group=self._group,
        )
        self._sent = wanted


@contextlib.asynccontextmanager
async def typing(platform: Platform, chat: ChatRef) -> AsyncIterator[None]:
    """Show the typing action while the block runs (platforms let it fade in seconds)."""

    async def keep() -> None:
        while True:
            with contextlib.suppress(Exception):  # a courtesy: never worth failing for
                await platform.typing(chat)
            await asyncio.sleep(_TYPING_EVERY_S)

    task = asyncio.create_task(keep(), name="captionbot-typing")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
