"""The inference engine: admission, pre/post-processing off the loop, batching, residency.

Residency: a task's model loads on first use (or at start with ``preload``). With a memory
budget, the least recently used model that is neither pinned nor in use is unloaded before
another loads, and again after a load if the measured size says so. A model larger than the
whole budget is a clear ``TaskUnavailable``, never an out-of-memory crash. Loads, warm-ups
and unloads are closures on the device thread, so they never race a forward.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import time
import traceback
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from core import metrics
from core.batching import Batcher
from core.errors import (
    CaptionbotError,
    EngineDead,
    InferenceFailed,
    ModelUnavailable,
    OutOfDeviceMemory,
    Overloaded,
    TaskUnavailable,
)
from core.executor import CpuLanes, DeviceThread, Executor, PinThreads
from core.settings import EngineSettings
from core.streams import Stream
from core.task import RecallingTask, Task
from core.types import EngineStats, TaskStats

logger = logging.getLogger(__name__)

AnyTask = Task[Any, Any, Any, Any]

# A larger batch must beat the smaller ones' time per item by more than this to be worth
# the extra wait for the first caller in it. Kept small: fp32 BLIP on a 2-core CPU gains
# only 6-24% per item from 4 to 8, and a 5% margin let noise settle on 4 (measured).
_NEAR_BEST = 1.02
# Stop measuring once a batch size is this much slower per item than the best so far.
_GIVE_UP = 1.25
_MB = 1024 * 1024
# A load failure of unknown cause is tried again after this long, not on every request.
_RETRY_UNKNOWN_S = 60.0
# How often a request waiting in line for room looks at its place and the engine's health.
_LINE_CHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """A result with the timings an adapter logs."""

    value: Any
    queue_s: float
    device_s: float


@dataclass(frozen=True, slots=True)
class Partial:
    """A partial result while a streaming task runs: text so far, step i of n."""

    value: Any


@dataclass(frozen=True, slots=True)
class Warming:
    """The model this request needs is loading; ``eta_s`` is a guess from earlier loads."""

    task: str
    eta_s: float | None


class Reservation:
    """Room for up to ``slots`` requests in flight, taken at once and held until released.

    A caller that will make several requests (a description: caption, text and mood side
    by side, then hashtags and a social caption) reserves its room up front, so it is
    either refused before it starts or never refused half-way. Requests made under a
    reservation are not counted again.
    """

    def __init__(self, engine: Engine, slots: int) -> None:
        self.slots = slots
        self._engine = engine
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._engine._room_freed(self.slots)


@dataclass(slots=True)
class _RoomWaiter:
    slots: int
    granted: asyncio.Future[Reservation]


@dataclass(slots=True)
class _Work:
    prepared: Any
    stream: Stream[Any] | None


class _Slot:
    """A task with its batcher and residency state."""

    def __init__(self, name: str, task: AnyTask) -> None:
        self.name = name
        self.task = task
        self.loaded = False
        self.batch_size = task.batching.batch_size or 1
        self.batcher: Batcher[_Work, Any] | None = None
        self.last_used = 0.0
        # Batches between "make resident" and the end of their forward; never evicted then.
        self.in_use = 0
        # Measured at the last load; None until the model has loaded once.
        self.memory_bytes: int | None = None
        self.load_s: float | None = None
        # Names this model's load time in the history kept across restarts.
        self.history_key = f"{name}: {task.identity()}"
        # A load failure, and until when requests are refused with it without trying.
        self.unavailable: ModelUnavailable | None = None
        self.unavailable_until = 0.0

    @property
    def streaming(self) -> bool:
        return hasattr(self.task, "forward_streaming")


class Engine:
    """Runs tasks on one device thread; use as ``async with Engine(...) as engine``."""

    def __init__(
        self,
        tasks: Mapping[str, AnyTask],
        settings: EngineSettings,
        executor: Executor | None = None,
        on_dead: Callable[[str], None] | None = None,
        pin_threads: PinThreads | None = None,
    ) -> None:
        """``on_dead(reason)`` is called once if the device thread hangs: the process
        cannot recover a stuck thread and should exit (the bot's lifecycle decides how).

        ``pin_threads(n)`` limits the calling thread's math library to ``n`` threads. The
        engine calls it first on every thread it owns: the CPU pool's threads get one
        each (decoding and clean-up need no team of their own), the forwards' thread
        every usable core (see ``CpuLanes`` for why only one team may be large)."""
        self._settings = settings
        self._slots = {name: _Slot(name, task) for name, task in tasks.items()}
        self._own_executor = executor is None
        self._pin_threads = pin_threads
        self._executor: Executor = (
            executor
            if executor is not None
            else _device_executor(settings.device, on_dead, pin_threads)
        )
        self._cpu: ThreadPoolExecutor | None = None
        self._closing = False
        self._in_flight = 0
        # Reservations waiting for room, first come first served (see ``wait_for_room``).
        self._room_line: collections.deque[_RoomWaiter] = collections.deque()
        self._budget = settings.memory_budget_mb * _MB
        # One load or eviction decision at a time keeps the memory accounting exact.
        self._residency = asyncio.Lock()
        # Set whenever a batch ends, so a load waiting for room can look again.
        self._released = asyncio.Event()
        # Models waiting for (or in) their load, in the order the device will load them.
        self._loading: list[_Slot] = []
        # Load times survive restarts, so "warming up" comes with an estimate from the start.
        self._history_path = Path(settings.model_cache) / "load-times.json"

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        metrics.ENGINE.watch(self.stats)
        if self._own_executor:
            assert isinstance(self._executor, DeviceThread | CpuLanes)
            self._executor.start()
        pin = self._pin_threads
        self._cpu = ThreadPoolExecutor(
            self._settings.cpu_workers,
            thread_name_prefix="captionbot-cpu",
            initializer=None if pin is None else lambda: pin(1),
        )
        history = await asyncio.to_thread(_read_load_times, self._history_path)
        for slot in self._slots.values():
            slot.load_s = history.get(slot.history_key)
            slot.batcher = self._make_batcher(slot)
            slot.batcher.start()
        if self._settings.preload:
            for name in self._slots:
                await self.ensure_loaded(name)

    async def aclose(self) -> None:
        self._closing = True
        for slot in self._slots.values():
            if slot.batcher is not None:
                await slot.batcher.aclose()
        if self._own_executor and not self._executor.dead:
            for slot in self._slots.values():
                if slot.loaded:
                    await self._unload(slot)
        await self._executor.aclose()
        if self._cpu is not None:
            self._cpu.shutdown(wait=False, cancel_futures=True)

    # -- requests ----------------------------------------------------------------------

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def task(self, name: str) -> AnyTask:
        return self._slot(name).task

    def validate(self, name: str, request: Any) -> None:
        """Refuse now a request that ``run`` would refuse as invalid, or a dead engine."""
        self._validated(name, request)

    def reserve(self, slots: int) -> Reservation:
        """Room for ``slots`` requests at once; ``Overloaded`` (with a wait estimate) when
        there is not, ``EngineDead`` when nothing can run. Pass it to ``run``/``stream``."""
        if self._executor.dead:
            raise EngineDead()
        # Room that frees up goes to those waiting in line first.
        if self._room_line or self._in_flight + slots > self._settings.max_in_flight:
            raise Overloaded(self._busy_for_s())
        self._in_flight += slots
        return Reservation(self, slots)

    async def wait_for_room(
        self, slots: int, place: Callable[[int, float], None] | None = None
    ) -> Reservation:
        """Like ``reserve``, but when the engine is full, wait in line for room (first come,
        first served) instead of raising ``Overloaded``: for callers that cannot ask their
        user to retry, like a chat answer. ``place(ahead, eta_s)`` hears where the caller
        stands whenever that changes. Cancelling the wait leaves the line."""
        if not self._room_line and self._in_flight + slots <= self._settings.max_in_flight:
            return self.reserve(slots)
        if self._executor.dead:
            raise EngineDead()
        if slots > self._settings.max_in_flight:
            raise Overloaded(self._busy_for_s())
        waiter = _RoomWaiter(slots, asyncio.get_running_loop().create_future())
        self._room_line.append(waiter)
        told = -1
        try:
            while not waiter.granted.done():
                ahead = self._room_line.index(waiter)
                if place is not None and ahead != told:
                    told = ahead
                    place(ahead, self._busy_for_s())
                await asyncio.wait([waiter.granted], timeout=_LINE_CHECK_S)
                if self._executor.dead and not waiter.granted.done():
                    raise EngineDead()
            return waiter.granted.result()
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                waiter.granted.result().release()
            else:
                waiter.granted.cancel()
                with contextlib.suppress(ValueError):
                    self._room_line.remove(waiter)
            raise

    def _room_freed(self, slots: int) -> None:
        self._in_flight -= slots
        line = self._room_line
        while line and self._in_flight + line[0].slots <= self._settings.max_in_flight:
            waiter = line.popleft()
            if not waiter.granted.done():
                self._in_flight += waiter.slots
                waiter.granted.set_result(Reservation(self, waiter.slots))

    def _busy_for_s(self) -> float:
        """About how long until the busiest task has worked through its queue."""
        busiest = max(self._slots.values(), key=self._eta, default=None)
        return self._eta(busiest) if busiest is not None else 1.0

    async def run(self, name: str, request: Any, reservation: Reservation | None = None) -> Outcome:
        """Validate, preprocess, batch, forward and postprocess one request."""
        with self._admitted(name, request, reservation) as slot:
            return await self._process(slot, request, None)

    async def stream(
        self, name: str, request: Any, reservation: Reservation | None = None
    ) -> AsyncGenerator[Warming | Partial | Outcome, None]:
        """Like ``run``, yielding progress first: ``Warming`` when the model must load, then
        the newest ``Partial`` whenever the reader is ready, then the ``Outcome``.

        Partials coalesce: a slow reader skips to the newest one and no backlog builds.
        Closing the generator (``contextlib.aclosing``, or being cancelled) stops the work
        for this request at its next step.
        """
        with self._admitted(name, request, reservation) as slot:
            stream: Stream[Any] = Stream()
            work = asyncio.ensure_future(self._process(slot, request, stream))
            work.add_done_callback(lambda _: stream.close())
            try:
                if not slot.loaded:
                    yield Warming(name, self._ready_in(slot))
                while (partial := await stream.next()) is not None:
                    rendered = partial
                    if slot.streaming:
                        render = slot.task.render_partial  # type: ignore[attr-defined]
                        rendered = await self._on_cpu(slot, render, partial)
                    yield Partial(rendered)
                yield await work
            finally:
                if not work.done():
                    stream.cancel()  # the device side sees it between steps
                    work.cancel()
                # Retrieved either way, so a failure after the reader left is not reported
                # as "never retrieved".
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work

    async def ensure_loaded(self, name: str) -> None:
        """Load, warm up and size the batches of a task's model, making room if needed."""
        slot = self._slot(name)
        if slot.loaded:
            return
        if slot not in self._loading:
            self._loading.append(slot)
        try:
            await self._load_resident(slot)
        finally:
            if slot in self._loading:
                self._loading.remove(slot)

    async def _load_resident(self, slot: _Slot) -> None:
        name = slot.name
        # 1. Download, if the files are not here yet: on an I/O thread and outside the load
        #    watchdog, since a first download can take longer than any load may.
        await self._fetch(slot)
        async with self._residency:
            if slot.loaded:
                return
            await self._make_room(slot, slot.memory_bytes or 0)
            # 2. Load. A failure while other models hold memory may be memory in disguise
            #    (bitsandbytes' out-of-memory comes out of transformers as a RuntimeError):
            #    free everything that may go and try once more before giving up.
            try:
                loaded = await self._load(slot)
            except ModelUnavailable as error:
                if error.retry_after_s is None or not self._evictable(slot):
                    self._remember(slot, error)
                    raise
                logger.warning(
                    "loading %s failed while other models were loaded; unloading them to "
                    "try once more (%s)",
                    name,
                    error.cause,
                )
                loaded = None
            if loaded is None:
                while (victim := self._least_recently_used(slot)) is not None:
                    await self._unload(victim)
                try:
                    loaded = await self._load(slot)
                except ModelUnavailable as error:
                    self._remember(slot, error)
                    raise
                if loaded is None:
                    raise TaskUnavailable(f"The {name} model does not fit in device memory.")
            measured, seconds = loaded
            slot.batch_size, slot.memory_bytes, slot.load_s = (
                measured.batch_size,
                measured.memory_bytes,
                seconds,
            )
            # The warm-up's time, until real batches are timed: the first forward's ETA
            # and lane come from a measurement, not a guess.
            if slot.batcher is not None and slot.batcher.times.mean_s is None:
                slot.batcher.times.add(measured.batch_s)
            slot.loaded = True
            metrics.MODEL_LOADS.labels(name).inc()
            metrics.MODEL_LOAD_TIME.labels(name).observe(seconds)
            await asyncio.to_thread(
                _record_load_time, self._history_path, slot.history_key, seconds
            )
            slot.last_used = time.monotonic()
            logger.info(
                "%s ready in %.1f s, %.0f MB: %s, batch size %d",
                name,
                seconds,
                slot.memory_bytes / _MB,
                slot.task.describe(),
                slot.batch_size,
            )
            if self._budget and slot.memory_bytes > self._budget:
                await self._unload(slot)
                raise TaskUnavailable(
                    f"The {name} model needs {slot.memory_bytes / _MB:.0f} MB, more than the "
                    f"{self._settings.memory_budget_mb:g} MB memory budget of this bot."
                )
            try:
                await self._make_room(slot, 0)
            except TaskUnavailable:
                await self._unload(slot)
                raise

    def stats(self) -> EngineStats:
        tasks = tuple(
            TaskStats(
                name=name,
                loaded=slot.loaded,
                queued=slot.batcher.queued if slot.batcher else 0,
                batch_size=slot.batch_size,
                mean_batch_s=slot.batcher.times.mean_s if slot.batcher else None,
                eta_s=self._eta(slot),
                memory_mb=None if slot.memory_bytes is None else slot.memory_bytes / _MB,
                batches=slot.batcher.batches if slot.batcher else 0,
                ready_in_s=None if slot.loaded else self._ready_in(slot),
            )
            for name, slot in self._slots.items()
        )
        return EngineStats(
            self._in_flight,
            self._settings.max_in_flight,
            self._executor.dead,
            tasks,
            resident_mb=self._resident_bytes() / _MB,
            budget_mb=self._settings.memory_budget_mb or None,
        )

    def batch_size(self, name: str) -> int:
        return self._slot(name).batch_size

    # -- internals ---------------------------------------------------------------------

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise TaskUnavailable(f"This bot does not offer '{name}'.") from None

    def _validated(self, name: str, request: Any) -> _Slot:
        slot = self._slot(name)
        if self._executor.dead:
            raise EngineDead()
        if slot.unavailable is not None:
            if time.monotonic() < slot.unavailable_until:
                raise slot.unavailable
            slot.unavailable = None  # its time is up: the next load tries again
        slot.task.validate(request)
        return slot

    @contextlib.contextmanager
    def _admitted(
        self, name: str, request: Any, reservation: Reservation | None
    ) -> Iterator[_Slot]:
        """The request's slot, counted in flight unless it comes under a reservation."""
        slot = self._validated(name, request)
        if reservation is not None:
            yield slot
            return
        if self._in_flight >= self._settings.max_in_flight:
            raise Overloaded(self._eta(slot))
        self._in_flight += 1
        try:
            yield slot
        finally:
            self._room_freed(1)

    async def _process(self, slot: _Slot, request: Any, stream: Stream[Any] | None) -> Outcome:
        started = time.monotonic()
        assert slot.batcher is not None
        with slot.batcher.arriving():
            prepared = await self._on_cpu(slot, slot.task.preprocess, request)
        try:
            raw, device_s = await slot.batcher.submit(_Work(prepared, stream))
        except asyncio.CancelledError:
            # The caller left. Still in line, the batcher drops it; already handed on (to a
            # remote replica), the task may still recall it.
            if isinstance(slot.task, RecallingTask):
                try:
                    slot.task.abandon(prepared)
                except Exception:  # the caller stays cancelled, whatever the recall did
                    logger.exception("%s: recalling a request failed", slot.name)
            raise
        value = await self._on_cpu(slot, slot.task.postprocess, raw)
        queue_s = max(0.0, time.monotonic() - started - device_s)
        metrics.QUEUE_WAIT.labels(slot.name).observe(queue_s)
        metrics.DEVICE_TIME.labels(slot.name).observe(device_s)
        return Outcome(value, queue_s, device_s)

    def _eta(self, slot: _Slot) -> float:
        wait = slot.batcher.eta_s() if slot.batcher is not None else 0.0
        if not slot.loaded:
            wait += self._ready_in(slot) or 0.0
        return wait

    def _ready_in(self, slot: _Slot) -> float | None:
        """Seconds until ``slot``'s model is loaded: its own load and every load the device
        does before it, by earlier load times; None when one of them was never timed."""
        if slot in self._loading:
            ahead = self._loading[: self._loading.index(slot) + 1]
        else:
            ahead = [*self._loading, slot]
        loads = [s.load_s for s in ahead]
        if any(seconds is None for seconds in loads):
            return None
        return sum(seconds for seconds in loads if seconds is not None)

    async def _on_cpu(self, slot: _Slot, fn: Callable[[Any], Any], arg: Any) -> Any:
        """Run a phase on the CPU pool; a bug's message never reaches the user as it is."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, arg)
        except ModelUnavailable as error:
            # Preprocessing loads the processor: the same failure as a load, remembered.
            self._remember(slot, error)
            raise
        except CaptionbotError:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closing and task is not None and not task.cancelling():
                # The pool dropped this work at shutdown; the caller itself was not cancelled.
                raise EngineDead("The bot is shutting down.") from None
            raise
        except Exception as exc:
            if self._closing:
                raise EngineDead("The bot is shutting down.") from exc
            raise self._failed(slot, exc) from exc

    @staticmethod
    def _failed(slot: _Slot, exc: Exception) -> InferenceFailed:
        logger.error("%s pre/post-processing failed", slot.name, exc_info=exc)
        return InferenceFailed(f"The {slot.name} step failed on this request; please try again.")

    def _make_batcher(self, slot: _Slot) -> Batcher[_Work, Any]:
        task = slot.task

        async def acquire() -> None:
            slot.in_use += 1
            try:
                await self.ensure_loaded(slot.name)
            except BaseException:
                slot.in_use -= 1
                raise
            slot.last_used = time.monotonic()

        def release() -> None:
            slot.in_use -= 1
            self._released.set()

        async def run(items: list[_Work]) -> tuple[Sequence[Any], float]:
            prepared = [item.prepared for item in items]
            streams = [item.stream for item in items]
            if slot.streaming and any(s is not None for s in streams):
                forward = lambda: task.forward_streaming(prepared, streams)  # type: ignore[attr-defined]  # noqa: E731
            else:
                forward = lambda: task.forward(prepared)  # noqa: E731
            try:
                return await self._executor.call(
                    forward,
                    priority=task.priority,
                    timeout_s=self._settings.forward_timeout_s,
                    label=f"{slot.name} forward of {len(items)}",
                    # Unmeasured yet: assumed short, so the first one is measured soon.
                    expected_s=(slot.batcher.times.mean_s if slot.batcher else None) or 0.0,
                )
            except Exception as exc:
                if not _out_of_memory(exc):
                    raise
                traceback.clear_frames(exc.__traceback__)
            # Out of device memory: a smaller batch may fit (other models grew, or inputs
            # are larger than the warm-up's). Halve it, and keep the smaller size.
            if len(items) == 1:
                raise InferenceFailed(
                    f"The {slot.name} model ran out of device memory on this request."
                )
            half = len(items) // 2
            slot.batch_size = min(slot.batch_size, half)
            logger.warning(
                "%s: a batch of %d ran out of device memory; batches of %d from now on",
                slot.name,
                len(items),
                slot.batch_size,
            )
            first, first_s = await run(items[:half])
            second, second_s = await run(items[half:])
            return [*first, *second], first_s + second_s

        return Batcher(
            slot.name,
            batch_key=lambda work: task.batch_key(work.prepared),
            batch_size=lambda: slot.batch_size,
            max_wait_s=task.batching.max_wait_ms / 1000,
            acquire=acquire,
            run=run,
            release=release,
        )

    async def _fetch(self, slot: _Slot) -> None:
        fetch = getattr(slot.task, "fetch", None)
        if fetch is None:
            return
        try:
            await asyncio.to_thread(fetch)
        except ModelUnavailable as error:
            self._remember(slot, error)
            raise

    async def _load(self, slot: _Slot) -> tuple[_Measured, float] | None:
        """Load on the device thread; None when the device ran out of memory."""
        try:
            return await self._executor.call(
                lambda: _load_and_measure(slot.task),
                priority=-1,
                timeout_s=self._settings.load_timeout_s,
                label=f"{slot.name} load",
                # Long work: on a CPU it runs where long forwards do, so the warm-up and
                # the batch sizing see the threads the real forwards will get.
                expected_s=slot.load_s or math.inf,
            )
        except (EngineDead, asyncio.CancelledError):
            raise
        except Exception as exc:
            if _out_of_memory(exc):
                logger.warning("loading %s ran out of device memory: %s", slot.name, exc)
                # The traceback's frames hold the half-built model; drop them so unload
                # and the retry really get that memory back.
                traceback.clear_frames(exc.__traceback__)
                del exc
                await self._unload(slot)
                return None
            # Whatever part of the model did load must not stay behind in memory.
            await self._unload(slot)
            if isinstance(exc, ModelUnavailable):
                raise
            logger.error("loading %s failed", slot.name, exc_info=exc)
            raise ModelUnavailable(
                f"The {slot.name} model could not be loaded.",
                f"{type(exc).__name__}: {exc}",
                _RETRY_UNKNOWN_S,
            ) from exc

    def _remember(self, slot: _Slot, error: ModelUnavailable) -> None:
        """Refuse the task at once until ``error`` may have passed, and tell the operator
        once, instead of asking the hub again (and logging again) on every request."""
        wait = error.retry_after_s
        slot.unavailable = error
        slot.unavailable_until = math.inf if wait is None else time.monotonic() + wait
        logger.error(
            "%s is unavailable: %s%s",
            slot.name,
            error.cause,
            " (nothing is tried again until a restart)" if wait is None else "",
        )

    async def _unload(self, slot: _Slot) -> None:
        slot.loaded = False
        metrics.MODEL_UNLOADS.labels(slot.name).inc()
        await self._executor.call(
            slot.task.unload, priority=-1, timeout_s=120, label=f"{slot.name} unload"
        )

    def _resident_bytes(self) -> int:
        return sum(s.memory_bytes or 0 for s in self._slots.values() if s.loaded)

    async def _make_room(self, for_slot: _Slot, needed: int) -> None:
        """Unload least recently used models until ``needed`` more bytes fit the budget."""
        if not self._budget:
            return
        while self._resident_bytes() + needed > self._budget:
            victim = self._least_recently_used(for_slot)
            if victim is None:
                if not self._evictable(for_slot, in_use_too=True):
                    raise TaskUnavailable(
                        f"The {for_slot.name} model does not fit in the memory budget "
                        "next to the models pinned in memory."
                    )
                # The only candidates are mid-batch; one of them will finish soon.
                self._released.clear()
                await self._released.wait()
                continue
            logger.info(
                "unloading %s (%.0f MB) to make room for %s",
                victim.name,
                (victim.memory_bytes or 0) / _MB,
                for_slot.name,
            )
            await self._unload(victim)

    def _least_recently_used(self, for_slot: _Slot) -> _Slot | None:
        return min(self._evictable(for_slot), key=lambda s: s.last_used, default=None)

    def _evictable(self, for_slot: _Slot, *, in_use_too: bool = False) -> list[_Slot]:
        return [
            s
            for s in self._slots.values()
            if s.loaded
            and s is not for_slot
            and (in_use_too or s.in_use == 0)
            and s.name not in self._settings.pinned
        ]


def _device_executor(
    device: str, on_dead: Callable[[str], None] | None, pin_threads: PinThreads | None
) -> Executor:
    """One device thread for a GPU; on a CPU, lanes that keep short forwards out of long
    ones' way (see ``CpuLanes``). The bot resolves ``auto`` before building the engine,
    which imports no torch to look for a GPU itself."""
    if device == "cpu":
        return CpuLanes(on_dead=on_dead, pin_threads=pin_threads)
    return DeviceThread(on_dead=on_dead, pin_threads=pin_threads)


def _read_load_times(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}


def _record_load_time(path: Path, key: str, seconds: float) -> None:
    times = _read_load_times(path)
    times[key] = round(seconds, 2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(times, indent=1, sort_keys=True), encoding="utf-8")
        staging.replace(path)
    except OSError:
        logger.warning("could not record load times in %s", path, exc_info=True)


@dataclass(frozen=True)
class _Measured:
    batch_size: int
    memory_bytes: int
    batch_s: float  # one warm-up forward of ``batch_size`` items


def _load_and_measure(task: AnyTask) -> _Measured:
    """On the device thread: load, warm up, and measure the batch size and model bytes."""
    task.load()
    memory = task.memory_bytes()  # before warm-up: activations are not the model's
    size, batch_s = measure_batch(task)
    return _Measured(size, memory, batch_s)


def measure_batch(task: AnyTask) -> tuple[int, float]:
    """Warm up with the largest batch that will be used, so out-of-memory shows now.

    With no configured batch size, time forwards of 1, 2, 4, ... items, in two passes
    (each size's better run counts), and keep the smallest size whose time per item is
    within ``_NEAR_BEST`` of the best seen: on a CPU
    a vision encoder gains nothing from batching while a decoder does, so the answer
    depends on device, precision and model and is measured rather than assumed. Gains can
    appear only at larger sizes (fp32 BLIP gains little at 2 and much at 8), so one flat
    step does not stop the search; a clearly worse one does.

    Returns the size and the seconds one forward of that size took (with a configured
    size, its only run, one-off costs included: an upper bound).
    """
    configured = task.batching.batch_size
    if configured is not None:
        # Halved until it fits: a device too small for the configured batch still serves.
        size = configured
        while True:
            try:
                started = time.perf_counter()
                _checked(task, task.sample(size))
                return size, time.perf_counter() - started
            except Exception as exc:
                if size == 1 or not _out_of_memory(exc):
                    raise
                logger.warning("%s: a batch of %d does not fit the device", task.name, size)
                traceback.clear_frames(exc.__traceback__)
                size //= 2
    _checked(task, task.sample(1))  # the first call pays one-off kernel and allocator costs
    timings = _first_pass(task)
    # Each size once more, a whole pass later, keeping its better run: a neighbour's burst
    # on a shared machine slows runs close together in time, rarely both runs of a size.
    # Not the size that ended the search, already run twice and the costliest.
    first_best = min(timings.values())
    for size, per_item in list(timings.items()):
        if per_item > first_best * _GIVE_UP:
            continue
        try:
            timings[size] = min(per_item, _time_per_item(task, size))
        except Exception as exc:
            if size == 1 or not _out_of_memory(exc):
                raise
            logger.warning("%s: a batch of %d no longer fits the device", task.name, size)
            traceback.clear_frames(exc.__traceback__)
            timings = {n: t for n, t in timings.items() if n < size}
            break
    best = min(timings.values())
    size = min(n for n, per_item in timings.items() if per_item <= best * _NEAR_BEST)
    logger.info(
        "%s: %s s per item by batch size; batches of %d",
        task.name,
        ", ".join(f"{n}: {per_item:.4f}" for n, per_item in timings.items()),
        size,
    )
    return size, timings[size] * size


def _first_pass(task: AnyTask) -> dict[int, float]:
    """Seconds per item for 1, 2, 4, ... items, up to the task's largest batch, the
    largest that fits the device, or the first size clearly worse than the best."""
    timings = {1: _time_per_item(task, 1)}
    size = 2
    while size <= task.batching.max_batch_size:
        try:
            timings[size] = _time_per_item(task, size)
            if timings[size] > min(timings.values()) * _GIVE_UP:
                # The first run of a size may pay one-off costs for its new shapes: run
                # it again before it ends the search.
                timings[size] = min(timings[size], _time_per_item(task, size))
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            # The largest batch that ran is the largest one used.
            logger.warning("%s: a batch of %d does not fit the device", task.name, size)
            traceback.clear_frames(exc.__traceback__)
            timings.pop(size, None)
            break
        if timings[size] > min(timings.values()) * _GIVE_UP:
            break
        size *= 2
    return timings


def _time_per_item(task: AnyTask, size: int) -> float:
    batch = task.sample(size)
    started = time.perf_counter()
    _checked(task, batch)
    return (time.perf_counter() - started) / size


def _out_of_memory(exc: BaseException) -> bool:
    """The device ran out of memory: torch's OutOfMemoryError (matched by name, as the
    engine imports no torch) or a task's own ``OutOfDeviceMemory``."""
    return isinstance(exc, OutOfDeviceMemory) or type(exc).__name__ == "OutOfMemoryError"


def _checked(task: AnyTask, batch: list[Any]) -> None:
    outputs = task.forward(batch)
    if len(outputs) != len(batch):
        raise InferenceFailed(
            f"{task.name} returned {len(outputs)} outputs for {len(batch)} inputs"
        )
