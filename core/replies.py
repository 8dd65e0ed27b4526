"""A ``Reply``: what the bot says back to one request, from admission to the last part.

    async with service.describe(origin, Upload(data)) as reply:  # refusals raise here
        async for part in reply:                                  # parts as they come
            ...
        await reply.sent(message_id)                              # the bot's own message

or ``value = await service.ask(origin, question)`` for the final value alone.

Entering does everything that can refuse, before any part exists, in this order: the
user's slot for requests at once; finding and checking the image and the request's own
checks; room in the engine for every model request the answer will make at once; and
last the daily quota, so a refused request never spends any. Only then does the work
start, in a task the service owns, so that shutdown can end it with an explicit error.
Leaving the ``async with`` (or stopping reading and leaving) cancels what is still running
and frees the slot and the room at once.

Parts queue without blocking the work; a new draft of the social caption or a new step
count replaces one the reader has not taken yet, so a slow reader sees the newest state
and never a backlog.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from core import metrics
from core.errors import (
    CaptionbotError,
    InferenceFailed,
    InvalidRequest,
    LimitReached,
    Overloaded,
)
from core.types import Origin, Part, SocialDraft, StepProgress, Waiting, WarmingUp

if TYPE_CHECKING:
    from core.engine import Reservation
    from core.service import Service

logger = logging.getLogger(__name__)

# Parts that only say "this far so far": the next one of the same kind replaces them.
_TRANSIENT = (SocialDraft, StepProgress)


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """The image a request is about, stored and checked."""

    sha256: str
    data: bytes
    name: str


class _End:
    """Marks the end of the parts."""


_END = _End()


class _Parts:
    """An unbounded queue in which a transient part replaces the one before it."""

    def __init__(self) -> None:
        self._items: collections.deque[Part | BaseException | _End] = collections.deque()
        self._changed = asyncio.Event()
        self.closed = False

    def put(self, item: Part | BaseException | _End) -> None:
        if self.closed:
            return
        if isinstance(item, _TRANSIENT) and self._items and type(self._items[-1]) is type(item):
            self._items[-1] = item
        else:
            self._items.append(item)
        if isinstance(item, BaseException | _End):
            self.closed = True  # an end or an error is the last thing a reader gets
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def get(self) -> Part | BaseException | _End:
        while not self._items:
            if self.closed:
                return _END
            self._changed.clear()
            await self._changed.wait()
        return self._items.popleft()


T = TypeVar("T")
Producer = Callable[["Reply[Any]"], AsyncIterator[Part]]


class Reply(Generic[T]):
    def __init__(
        self,
        service: Service,
        origin: Origin,
        kind: str,
        enter: Callable[[Reply[T]], Awaitable[None]],
        produce: Callable[[Reply[T]], AsyncIterator[Part]],
        result: type[T],
        *,
        quota: str,
        engine_slots: int,
    ) -> None:
        """``enter(reply)`` finds the image (``reply.image``) and checks the request,
        raising any refusal; ``produce(reply)`` yields its parts, the last of which, a
        ``result``, is what awaiting the reply gives. ``quota`` names the daily quota it
        spends; ``engine_slots`` how many model requests it makes at once at most."""
        self.origin = origin
        self.kind = kind
        self.image: ResolvedImage | None = None
        # Set once admitted: the short id on this answer's buttons, valid once it ends.
        self.handle = ""
        # What the answer showed, by part name, kept with the handle for its buttons.
        self.shown: dict[str, Any] = {}
        # The image a reimagine made, once stored: replies to the answer mean that one.
        self.made_sha256: str | None = None
        self._service = service
        self._result = result
        self._quota = quota
        self._engine_slots = engine_slots
        self._enter = enter
        self._produce = produce
        self._release: Callable[[], None] | None = None
        self._reservation: Reservation | None = None
        self._parts = _Parts()
        self._task: asyncio.Task[None] | None = None
        self._entered = False
        self._waits_in_line = False

    @property
    def sha256(self) -> str | None:
        """The image this answer is about (None for an image made from text alone)."""
        return None if self.image is None else self.image.sha256

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Reply[T]:
        if self._entered:
            raise RuntimeError("a Reply is entered once")
        self._entered = True
        self._release = self._service._admit(self)
        try:
            await self._enter(self)
            # Shutdown may have begun while this request was being admitted.
            self._service._still_accepting()
            try:
                self._reservation = self._service._engine.reserve(self._engine_slots)
            except Overloaded:
                if not self._waits_in_line:
                    raise
                # The work waits for its room first, telling its place in line.
            await self._service._admission.take(self.origin.user, self._quota)
        except BaseException as refused:
            self._count(refused)
            await self.aclose()
            raise
        self._task = self._service._spawn(
            self._run(), f"captionbot-{self.kind}", self.origin, self._reservation
        )
        return self

    def waiting_in_line(self) -> Reply[T]:
        """When the bot is full, wait in line for room (with ``Waiting`` parts telling the
        place) instead of refusing: for chat answers, whose users cannot retry the way an
        API client does. Call before entering."""
        self._waits_in_line = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop what still runs and free the user's slot and engine room; safe to call
        more than once."""
        self._parts.close()
        try:
            if self._task is not None and not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task])
        finally:
            if self._reservation is not None:
                self._reservation.release()
            if self._release is not None:
                self._release()

    def __await__(self) -> Generator[Any, None, T]:
        return self._final().__await__()

    async def _final(self) -> T:
        """Run to the end and return the last part (the answer's value)."""
        last: Part | None = None
        async with self:
            async for part in self:
                last = part
        if not isinstance(last, self._result):
            raise InferenceFailed("The bot had nothing to say; please try again.")
        return last

    # -- reading -------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Part]:
        if self._task is None:
            raise RuntimeError("enter the Reply with `async with` before reading it")
        return self

    async def __anext__(self) -> Part:
        item = await self._parts.get()
        if isinstance(item, _End):
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def sent(self, message_id: str) -> None:
        """The bot's answer went out as platform message ``message_id``: replies to it
        mean this answer's image (the new one, for a reimagine), after restarts too."""
        await self._service._record_message(self, message_id)

    # -- the work ------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            if self._reservation is None:
                self._reservation = await self._service._engine.wait_for_room(
                    self._engine_slots, self._tell_place
                )
                self._service._use_room(self._reservation)
            async for part in self._produce(self):
                if isinstance(part, WarmingUp):
                    metrics.WARMING_UP.labels(part.task).inc()
                self._parts.put(part)
            await self._service._record_answer(self)
        except CaptionbotError as error:
            self._count(error)
            self._parts.put(error)
        except asyncio.CancelledError as cancelled:
            self._count(cancelled)
            raise
        except Exception as exc:
            self._count(exc)
            logger.exception("%s failed", self.kind)
            self._parts.put(
                InferenceFailed("Something went wrong on the bot's side; please try again.")
            )
            del exc
        else:
            self._count(None)
            self._parts.put(_END)
        finally:
            # The room is for model requests: a slow reader of the parts holds none of it.
            if self._reservation is not None:
                self._reservation.release()

    def _count(self, ended: BaseException | None) -> None:
        """The request's outcome, for the metrics: ok, refused (the user's request or
        limits said no), failed (the bot could not), or cancelled."""
        if ended is None:
            outcome = "ok"
        elif isinstance(ended, InvalidRequest | LimitReached | Overloaded):
            outcome = "refused"
        elif isinstance(ended, asyncio.CancelledError):
            outcome = "cancelled"
        else:
            outcome = "failed"
        metrics.REQUESTS.labels(self.origin.user.platform, self.kind, outcome).inc()

    def _tell_place(self, ahead: int, eta_s: float) -> None:
        self._parts.put(Waiting(self.kind, ahead, eta_s))

    def abort(self, error: CaptionbotError) -> None:
        """End the reply now with ``error`` (shutdown); the reader gets it next."""
        self._parts.put(error)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def wait(self) -> None:
        """Until the work has ended, whoever reads it."""
        if self._task is not None:
            await asyncio.wait([self._task])
