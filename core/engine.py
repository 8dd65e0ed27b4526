"""The inference engine: admission, pre/post-processing off the loop, batching, residency."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from core.batching import Batcher
from core.errors import EngineDead, InferenceFailed, Overloaded, TaskUnavailable
from core.executor import DeviceThread, Executor
from core.settings import EngineSettings
from core.task import Task
from core.types import EngineStats, TaskStats

logger = logging.getLogger(__name__)

AnyTask = Task[Any, Any, Any, Any]

# A larger batch must beat the smaller ones' time per item by more than this to be worth
# the extra wait for the first caller in it.
_NEAR_BEST = 1.05
# Stop measuring once a batch size is this much slower per item than the best so far.
_GIVE_UP = 1.25


@dataclass(frozen=True, slots=True)
class Outcome:
    """A result with the timings an adapter logs."""

    value: Any
    queue_s: float
    device_s: float


class _Slot:
    """A task with its batcher and residency state."""

    def __init__(self, task: AnyTask) -> None:
        self.task = task
        self.loaded = False
        self.batch_size = task.batching.batch_size or 1
        self.load_lock = asyncio.Lock()
        self.batcher: Batcher[Any, Any] | None = None


class Engine:
    """Runs tasks on one device thread; use as ``async with Engine(...) as engine``."""

    def __init__(
        self,
        tasks: Mapping[str, AnyTask],
        settings: EngineSettings,
        executor: Executor | None = None,
    ) -> None:
        self._settings = settings
        self._slots = {name: _Slot(task) for name, task in tasks.items()}
        self._own_executor = executor is None
        self._executor: Executor = executor if executor is not None else DeviceThread()
        self._cpu: ThreadPoolExecutor | None = None
        self._in_flight = 0

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
        if self._own_executor:
            assert isinstance(self._executor, DeviceThread)
            self._executor.start()
        self._cpu = ThreadPoolExecutor(
            self._settings.cpu_workers, thread_name_prefix="captionbot-cpu"
        )
        for name, slot in self._slots.items():
            slot.batcher = self._make_batcher(name, slot)
            slot.batcher.start()
        if self._settings.preload:
            for name in self._slots:
                await self.ensure_loaded(name)

    async def aclose(self) -> None:
        for slot in self._slots.values():
            if slot.batcher is not None:
                await slot.batcher.aclose()
        if self._own_executor and not self._executor.dead:
            for slot in self._slots.values():
                if slot.loaded:
                    await self._executor.call(
                        slot.task.unload,
                        priority=-1,
                        timeout_s=60,
                        label=f"{slot.task.name} unload",
                    )
                    slot.loaded = False
        await self._executor.aclose()
        if self._cpu is not None:
            self._cpu.shutdown(wait=False, cancel_futures=True)

    # -- requests ----------------------------------------------------------------------

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def task(self, name: str) -> AnyTask:
        return self._slot(name).task

    async def run(self, name: str, request: Any) -> Outcome:
        """Validate, preprocess, batch, forward and postprocess one request."""
        slot = self._slot(name)
        if self._executor.dead:
            raise EngineDead()
        slot.task.validate(request)
        if self._in_flight >= self._settings.max_in_flight:
            raise Overloaded(self._eta(slot))
        self._in_flight += 1
        try:
            started = time.monotonic()
            prepared = await self._on_cpu(slot.task.preprocess, request)
            assert slot.batcher is not None
            raw, device_s = await slot.batcher.submit(prepared)
            value = await self._on_cpu(slot.task.postprocess, raw)
            queue_s = max(0.0, time.monotonic() - started - device_s)
            return Outcome(value, queue_s, device_s)
        finally:
            self._in_flight -= 1

    async def ensure_loaded(self, name: str) -> None:
        """Load, warm up and size the batches of a task's model, once."""
        slot = self._slot(name)
        if slot.loaded:
            return
        async with slot.load_lock:
            if slot.loaded:
                return
            try:
                size, seconds = await self._executor.call(
                    lambda: _load_and_measure(slot.task),
                    priority=-1,
                    timeout_s=self._settings.load_timeout_s,
                    label=f"{name} load",
                )
            except (EngineDead, asyncio.CancelledError):
                raise
            except Exception as exc:
                logger.exception("loading %s failed", name)
                raise TaskUnavailable(f"The {name} model could not be loaded.") from exc
            slot.batch_size = size
            slot.loaded = True
            logger.info(
                "%s ready in %.1f s: %s, batch size %d", name, seconds, slot.task.describe(), size
            )

    def stats(self) -> EngineStats:
        tasks = tuple(
            TaskStats(
                name=name,
                loaded=slot.loaded,
                queued=slot.batcher.queued if slot.batcher else 0,
                batch_size=slot.batch_size,
                mean_batch_s=slot.batcher.times.mean_s if slot.batcher else None,
                eta_s=self._eta(slot),
            )
            for name, slot in self._slots.items()
        )
        return EngineStats(
            self._in_flight, self._settings.max_in_flight, self._executor.dead, tasks
        )

    def batch_size(self, name: str) -> int:
        return self._slot(name).batch_size

    # -- internals ---------------------------------------------------------------------

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise TaskUnavailable(f"This bot does not offer '{name}'.") from None

    def _eta(self, slot: _Slot) -> float:
        return slot.batcher.eta_s() if slot.batcher is not None else 0.0

    async def _on_cpu(self, fn: Any, arg: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, arg)

    def _make_batcher(self, name: str, slot: _Slot) -> Batcher[Any, Any]:
        task = slot.task

        async def before_batch() -> None:
            await self.ensure_loaded(name)

        return Batcher(
            name,
            executor=self._executor,
            forward=task.forward,
            batch_key=task.batch_key,
            batch_size=lambda: slot.batch_size,
            max_wait_s=task.batching.max_wait_ms / 1000,
            priority=task.priority,
            timeout_s=self._settings.forward_timeout_s,
            before_batch=before_batch,
        )


def _load_and_measure(task: AnyTask) -> int:
    """On the device thread: load, then warm up with the largest batch that will be used.

    With no configured batch size, time forwards of 1, 2, 4, ... items and keep the
    smallest size whose time per item is within ``_NEAR_BEST`` of the best seen: on a CPU
    a vision encoder gains nothing from batching while a decoder does, so the answer
    depends on device, precision and model and is measured rather than assumed. Gains can
    appear only at larger sizes (fp32 BLIP gains little at 2 and much at 8), so one flat
    step does not stop the search; a clearly worse one does.
    """
    task.load()
    configured = task.batching.batch_size
    if configured is not None:
        _checked(task, task.sample(configured))
        return configured
    _checked(task, task.sample(1))  # the first call pays one-off kernel and allocator costs
    timings: dict[int, float] = {}
    size = 1
    while size <= task.batching.max_batch_size:
        timings[size] = _time_per_item(task, size)
        logger.info("%s: batch of %d takes %.4f s per item", task.name, size, timings[size])
        if timings[size] > min(timings.values()) * _GIVE_UP:
            break
        size *= 2
    best = min(timings.values())
    return min(n for n, per_item in timings.items() if per_item <= best * _NEAR_BEST)


def _time_per_item(task: AnyTask, size: int) -> float:
    # The best of two runs: a neighbour process stealing a core should not shrink the batch.
    batch = task.sample(size)
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        _checked(task, batch)
        best = min(best, time.perf_counter() - started)
    return best / size


def _checked(task: AnyTask, batch: list[Any]) -> None:
    outputs = task.forward(batch)
    if len(outputs) != len(batch):
        raise InferenceFailed(
            f"{task.name} returned {len(outputs)} outputs for {len(batch)} inputs"
        )
