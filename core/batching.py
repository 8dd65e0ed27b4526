"""One batcher per task: collect, group by key, run one forward, hand each caller its output."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from core import metrics
from core.errors import CaptionbotError, EngineDead, InferenceFailed

logger = logging.getLogger(__name__)

# How much longer than ``max_wait_s`` a short batch waits for items still being prepared:
# 16 images posted at once reach the batcher over the time two threads take to decode
# them, more than the 20-50 ms a batch waits, and a batch of 8 then ran as 5 and 3.
_ARRIVAL_GRACE = 4

ItemT = TypeVar("ItemT")
OutT = TypeVar("OutT")


@dataclass(slots=True)
class _Pending(Generic[ItemT, OutT]):
    item: ItemT
    key: Hashable
    future: asyncio.Future[tuple[OutT, float]]
    enqueued: float = field(default_factory=time.monotonic)


class BatchTimes:
    """Exponential moving average of seconds per batch, for ETAs."""

    def __init__(self) -> None:
        self.mean_s: float | None = None

    def add(self, seconds: float) -> None:
        self.mean_s = seconds if self.mean_s is None else 0.8 * self.mean_s + 0.2 * seconds


class Batcher(Generic[ItemT, OutT]):
    """Groups concurrent submissions into batches for one task.

    A batch waits at most ``max_wait_s`` after its first item for companions with the same
    key; while items are still being prepared (``arriving``), up to ``_ARRIVAL_GRACE``
    times that more, since running it short would give them a forward of their own
    moments later. For each batch the batcher awaits ``acquire`` (the engine makes the
    model resident and keeps it so), drops callers that left meanwhile, awaits ``run``
    (the forward on the device) and finally calls ``release``.
    """

    def __init__(
        self,
        name: str,
        *,
        batch_key: Callable[[ItemT], Hashable],
        batch_size: Callable[[], int],
        max_wait_s: float,
        acquire: Callable[[], Awaitable[None]],
        run: Callable[[list[ItemT]], Awaitable[tuple[Sequence[OutT], float]]],
        release: Callable[[], None],
    ) -> None:
        self.name = name
        self._batch_key = batch_key
        self._batch_size = batch_size
        self._max_wait_s = max_wait_s
        self._acquire = acquire
        self._run_forward = run
        self._release = release
        self._pending: list[_Pending[ItemT, OutT]] = []
        self._running = 0
        self._arriving = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.times = BatchTimes()
        # Forwards run so far; a cache hit never adds one.
        self.batches = 0

    @property
    def queued(self) -> int:
        """Items waiting plus items in the forward running now."""
        return len(self._pending) + self._running

    def eta_s(self, extra: int = 1) -> float:
        """Rough seconds until ``extra`` more items would be done."""
        per_batch = self.times.mean_s if self.times.mean_s is not None else 1.0
        batches = -(-(self.queued + extra) // max(1, self._batch_size()))
        return batches * per_batch

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"captionbot-batcher-{self.name}"
        )
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """However the loop ended, nobody may be left waiting on it."""
        if not task.cancelled() and task.exception() is not None:
            logger.critical("%s batcher died", self.name, exc_info=task.exception())
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(EngineDead())
        self._pending.clear()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(EngineDead("The bot is shutting down."))
        self._pending.clear()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around preparing an item that will be submitted: a short batch waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wakeup.set()

    async def submit(self, item: ItemT) -> tuple[OutT, float]:
        """Queue ``item``; return its output and the device seconds of its batch."""
        if self._task is not None and self._task.done():
            raise EngineDead()
        future: asyncio.Future[tuple[OutT, float]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, self._batch_key(item), future))
        self._wakeup.set()
        return await future

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Pending[ItemT, OutT]]:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._pending[0]
        size = max(1, self._batch_size())
        deadline = first.enqueued + self._max_wait_s
        grace_ends = deadline + self._max_wait_s * _ARRIVAL_GRACE
        while sum(p.key == first.key for p in self._pending) < size:
            now = time.monotonic()
            remaining = (grace_ends if self._arriving else deadline) - now
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        batch: list[_Pending[ItemT, OutT]] = []
        rest: list[_Pending[ItemT, OutT]] = []
        for pending in self._pending:
            if pending.future.done():
                continue  # the caller went away: never spend the device on it
            if pending.key == first.key and len(batch) < size:
                batch.append(pending)
            else:
                rest.append(pending)
        self._pending = rest
        return batch

    async def _run(self, batch: list[_Pending[ItemT, OutT]]) -> None:
        self._running = len(batch)
        metrics.BATCH_SIZE.labels(self.name).observe(len(batch))
        acquired = False
        try:
            await self._acquire()
            acquired = True
            # Callers may have left while the model loaded.
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                return
            outputs, seconds = await self._run_forward([p.item for p in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(
                    f"forward returned {len(outputs)} outputs for {len(batch)} inputs"
                )
        except Exception as exc:  # every caller of this batch, and only them, gets it
            error = exc if isinstance(exc, CaptionbotError) else _failed(self.name, exc)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        except BaseException:
            # Cancelled (shutdown) or worse: the batch is no longer in _pending, so its
            # callers would wait forever unless told here.
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(EngineDead("The bot is shutting down."))
            raise
        finally:
            self._running = 0
            if acquired:
                self._release()
        self.times.add(seconds)
        self.batches += 1
        for pending, output in zip(batch, outputs, strict=True):
            if not pending.future.done():
                pending.future.set_result((output, seconds))


def _failed(name: str, exc: BaseException) -> InferenceFailed:
    logger.error("%s batch failed", name, exc_info=exc)
    error = InferenceFailed(f"The {name} model failed on this request; please try again.")
    error.__cause__ = exc
    return error
