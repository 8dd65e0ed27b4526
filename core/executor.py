"""The device thread: the only thread that touches the model device.

Work arrives as closures with a priority. Results go back to the event loop with
``call_soon_threadsafe``; a caller that went away is skipped, never set twice. A watchdog on
the event loop marks the executor dead when a job outlives its limit: the stuck thread cannot
be interrupted, so every waiter and every later call gets ``EngineDead``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from core.errors import EngineDead

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Limits the calling thread's math library (torch's OpenMP team) to so many threads; the
# bot injects torch's, as the engine imports no torch.
PinThreads = Callable[[int], None]


class Executor(Protocol):
    """Where device work runs; a Ray backend can implement the same interface."""

    @property
    def dead(self) -> bool: ...

    async def call(
        self,
        fn: Callable[[], T],
        *,
        priority: int,
        timeout_s: float,
        label: str,
        expected_s: float = 0.0,
    ) -> tuple[T, float]:
        """Run ``fn`` on the device; return its value and the seconds it ran."""
        ...

    async def aclose(self) -> None: ...


@dataclass(order=True)
class _Job:
    priority: int
    # Among equal priorities, the shortest expected forward first: a caption that takes
    # hundredths of a second does not wait behind seconds of OCR (or, on a GPU, the other
    # way round), whichever the device makes the short one.
    expected_s: float
    seq: int
    fn: Callable[[], Any] = field(compare=False)
    future: asyncio.Future[tuple[Any, float]] = field(compare=False)
    timeout_s: float = field(compare=False)
    label: str = field(compare=False)


_STOP = _Job(
    priority=1 << 30,
    expected_s=0.0,
    seq=1 << 62,
    fn=lambda: None,
    future=None,  # type: ignore[arg-type]
    timeout_s=0,
    label="stop",
)


class DeviceThread:
    """A single worker thread with a priority queue and a watchdog."""

    def __init__(
        self,
        on_dead: Callable[[str], None] | None = None,
        name: str = "captionbot-device",
        pin_threads: PinThreads | None = None,
        threads: Callable[[], int] = lambda: usable_cores(),
    ) -> None:
        """With ``pin_threads``, the new thread first pins its math to ``threads()``
        threads (every usable core unless told otherwise): left alone, torch would give it
        the count last set anywhere in the process, by then the CPU pool's one."""
        self._name = name
        self._pin_threads = pin_threads
        self._threads = threads
        self._queue: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._current: tuple[_Job, float] | None = None
        self._dead_reason: str | None = None
        self._closed = False
        self._on_dead = on_dead

    @property
    def dead(self) -> bool:
        return self._dead_reason is not None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._watchdog = self._loop.create_task(self._watch(), name=f"{self._name}-watchdog")

    async def call(
        self,
        fn: Callable[[], T],
        *,
        priority: int,
        timeout_s: float,
        label: str,
        expected_s: float = 0.0,
    ) -> tuple[T, float]:
        if self._dead_reason is not None or self._closed:
            raise EngineDead()
        if self._loop is None:
            raise RuntimeError("DeviceThread.start() was not called")
        future: asyncio.Future[tuple[Any, float]] = self._loop.create_future()
        job = _Job(priority, expected_s, next(self._seq), fn, future, timeout_s, label)
        self._queue.put(job)
        value, seconds = await future
        return value, seconds

    async def aclose(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            if not self.dead:
                # Waiting here is short: the queue is drained by then (callers are gone).
                await asyncio.to_thread(self._thread.join, 30)
        self._fail_queued(EngineDead("The bot is shutting down."))

    # -- device thread -------------------------------------------------------------------

    def _run(self) -> None:
        if self._pin_threads is not None:
            self._pin_threads(self._threads())
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._dead_reason is not None:
                # Declared dead while this job waited: its caller must hear it, not hang.
                self._deliver(job, None, EngineDead())
                continue
            if job.future.cancelled():
                continue
            started = time.monotonic()
            self._current = (job, started)
            try:
                value = job.fn()
            except BaseException as exc:  # every failure goes to its caller, even SystemExit
                self._deliver(job, None, exc)
            else:
                self._deliver(job, (value, time.monotonic() - started), None)
            finally:
                self._current = None

    def _deliver(
        self, job: _Job, value: tuple[Any, float] | None, exc: BaseException | None
    ) -> None:
        assert self._loop is not None

        def settle() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(value)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # the loop closed while the job ran
            self._loop.call_soon_threadsafe(settle)

    # -- watchdog (event loop) -------------------------------------------------------------

    async def _watch(self) -> None:
        while self._dead_reason is None:
            await asyncio.sleep(0.2)
            current = self._current
            if current is None:
                continue
            job, started = current
            if time.monotonic() - started > job.timeout_s:
                self._die(f"{job.label} ran longer than its {job.timeout_s:.0f} s limit")

    def _die(self, reason: str) -> None:
        self._dead_reason = reason
        logger.critical("device thread is dead: %s", reason)
        current = self._current
        if current is not None and not current[0].future.done():
            current[0].future.set_exception(EngineDead())
        self._fail_queued(EngineDead())
        if self._on_dead is not None:
            self._on_dead(reason)

    def _fail_queued(self, error: EngineDead) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and not job.future.done():
                job.future.set_exception(error)


class CpuLanes:
    """The executor when the device is the CPU: a second thread for long forwards.

    On a GPU one thread must own the device and a short forward waits for the running one.
    On a CPU the "device" is the cores every thread shares, and nothing is gained by making
    a caption (hundredths of a second) wait out a text-in-image forward (seconds): forwards
    expected to take ``long_s`` or more run on a lane of their own, and everything else
    (short forwards, loads, unloads) keeps going beside them, sharing the cores. A task's
    load never meets its own forward, as the engine loads before a task's first batch and
    unloads only tasks with no batch in flight.

    With ``pin_threads``, the long lane's math runs on every usable core and the short
    lane's on one. Two full OpenMP teams in one process make GNU OpenMP stop spinning
    between parallel regions (it counts more threads than cores), and each of the
    thousands of small regions in a decoding forward then waits on a futex: measured
    here, 12-16% off a BLIP forward with two idle teams beside it, nothing with one-thread
    ones. A short forward loses little on one thread; callers send loads here as long
    work, so warm-up and batch sizing see the threads real forwards get.
    """

    def __init__(
        self,
        on_dead: Callable[[str], None] | None = None,
        long_s: float = 0.5,
        pin_threads: PinThreads | None = None,
    ) -> None:
        self._on_dead = on_dead
        self._long_s = long_s
        self._short = DeviceThread(
            self._lane_died, "captionbot-device", pin_threads, threads=lambda: 1
        )
        self._long = DeviceThread(self._lane_died, "captionbot-device-long", pin_threads)
        self._told = False

    @property
    def dead(self) -> bool:
        return self._short.dead or self._long.dead

    def start(self) -> None:
        self._short.start()
        self._long.start()

    async def call(
        self,
        fn: Callable[[], T],
        *,
        priority: int,
        timeout_s: float,
        label: str,
        expected_s: float = 0.0,
    ) -> tuple[T, float]:
        if self.dead:
            raise EngineDead()
        lane = self._long if expected_s >= self._long_s else self._short
        return await lane.call(
            fn, priority=priority, timeout_s=timeout_s, label=label, expected_s=expected_s
        )

    async def aclose(self) -> None:
        await asyncio.gather(self._short.aclose(), self._long.aclose())

    def _lane_died(self, reason: str) -> None:
        # Both lanes serve one engine: the first death is the engine's, told once.
        if not self._told:
            self._told = True
            if self._on_dead is not None:
                self._on_dead(reason)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota
    (``docker run --cpus``), which neither the OS core count nor OpenMP's default sees."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time per period the cgroup allows; None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text(encoding="ascii").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text(encoding="ascii"))
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 else quota_us / period_us
