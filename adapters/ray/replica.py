"""What runs on the Ray cluster: one Ray Serve deployment per model task.

A replica loads its task's model once, measures the batch size that pays on its device
(as the local engine does), and from then on takes requests one by one: it preprocesses
each, batches the forwards with ``@serve.batch`` (grouped by the task's batch key), and
postprocesses each result. Streaming tasks (the social caption's drafts, Stable
Diffusion's steps) send their partials as they come, rendered here, where the tokenizer is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ray import serve

from core.engine import measure_batch
from core.executor import usable_cores
from core.tasks._runtime import pin_threads

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Ray Serve's batching decorator, untyped here: its stubs do not describe methods.
_batched: Any = serve.batch(max_batch_size=1)

# A request standing for the task's own sample input: the engine's warm-up.
WARM_UP = "captionbot:warm-up"
# How often a streaming batch hands out the newest partials.
_PARTIAL_EVERY_S = 0.1
_NOTHING = object()


@dataclass(frozen=True, slots=True)
class _Failed:
    """A forward's failure, carried to each of its own requests only: one batch of Ray's
    may hold several of the task's (one per batch key), and the others' results stand."""

    error: Exception

    def fresh(self) -> Exception:
        """The error to raise for one request: the same object for each of the group's
        requests, without the tracebacks of the others' raises (the forward's own was
        logged once, where it failed)."""
        return self.error.with_traceback(None)


@dataclass(slots=True)
class _Item:
    prepared: Any
    # Set when the caller left: the forward stops for it at its next step.
    cancelled: bool = False


class _ReplicaStream:
    """The forward's side of core's ``Stream``: ``publish`` from the forward's thread,
    ``cancelled`` read between steps; the batch takes the newest value now and then."""

    def __init__(self, item: _Item) -> None:
        self._item = item
        self._lock = threading.Lock()
        self._latest: object = _NOTHING

    @property
    def cancelled(self) -> bool:
        return self._item.cancelled

    def publish(self, value: object) -> None:
        with self._lock:
            self._latest = value

    def take(self) -> object:
        with self._lock:
            value, self._latest = self._latest, _NOTHING
        return value


class TaskReplica:
    """One replica of one task. Ray Serve builds it on a worker from the bot's recipe for
    the task (its class and settings).

    As in the local engine (``core.executor.CpuLanes``), the model's load and forwards run
    on one thread with all of the replica's math threads, and preparing and finishing
    requests on threads with one each: several multi-threaded OpenMP teams in a process
    make each of them slower, and the default thread pool would give each of its threads
    one.
    """

    def __init__(self, make: Callable[[], Any], memory_budget_bytes: int) -> None:
        self._device = concurrent.futures.ThreadPoolExecutor(
            1, "captionbot-device", initializer=pin_threads, initargs=(_replica_threads(),)
        )
        self._cpu = concurrent.futures.ThreadPoolExecutor(
            thread_name_prefix="captionbot-cpu", initializer=pin_threads, initargs=(1,)
        )
        self._task = task = make()
        self._device.submit(task.load).result()
        self._memory = task.memory_bytes()
        if memory_budget_bytes and self._memory > memory_budget_bytes:
            self._device.submit(task.unload).result()
            # A plain error: Ray reports a failed replica's message as text to the bot.
            raise RuntimeError(
                f"the {task.name} model takes {self._memory / 2**20:.0f} MB, more than the "
                f"{memory_budget_bytes / 2**20:.0f} MB ray.{task.name}.memory_budget_mb allows"
            )
        self._batch_size, _ = self._device.submit(measure_batch, task).result()
        wait_s = task.batching.max_wait_ms / 1000
        for batched in (self._forward, self._forward_streaming):
            batched.set_max_batch_size(self._batch_size)
            batched.set_batch_wait_timeout_s(wait_s)

    async def info(self) -> dict[str, int]:
        """What the bot's engine shows and sizes its own batches by, and the math threads
        the forwards run with."""
        import torch

        threads = await self._on(self._device, torch.get_num_threads)
        return {"batch_size": self._batch_size, "memory_bytes": self._memory, "threads": threads}

    async def _on(self, pool: concurrent.futures.Executor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def run(self, request: Any) -> tuple[Any, float]:
        """The result of one request and the seconds its batch's forward took."""
        item = _Item(await self._on(self._cpu, self._prepare, request))
        raw, seconds = await self._forward(item)
        if isinstance(raw, _Failed):
            raise raw.fresh()
        return await self._on(self._cpu, self._task.postprocess, raw), seconds

    async def stream(self, request: Any) -> AsyncIterator[tuple[str, Any, float]]:
        """``("partial", rendered, 0)`` now and then, then ``("done", result, seconds)``."""
        item = _Item(await self._on(self._cpu, self._prepare, request))
        try:
            # Ray Serve streams a batched generator only through a plain one like this.
            async for event in self._forward_streaming(item):
                if event is None:
                    continue
                kind, value, _seconds = event
                if kind == "done" and isinstance(value, _Failed):
                    raise value.fresh()
                if kind == "done":
                    value = await self._on(self._cpu, self._task.postprocess, value)
                    event = (kind, value, _seconds)
                yield event
        finally:
            item.cancelled = True

    def _prepare(self, request: Any) -> Any:
        if request == WARM_UP:
            return self._task.sample(1)[0]
        return self._task.preprocess(request)

    @_batched  # type: ignore[untyped-decorator]
    async def _forward(self, items: list[_Item]) -> list[tuple[Any, float]]:
        return await self._on(self._device, self._grouped, items)

    def _groups(self, items: Sequence[_Item]) -> list[list[int]]:
        """Indices of ``items`` by batch key: one forward each, as the local batcher does."""
        groups: dict[Any, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(self._task.batch_key(item.prepared), []).append(index)
        return list(groups.values())

    def _grouped(self, items: Sequence[_Item]) -> list[tuple[Any, float]]:
        results: list[tuple[Any, float]] = [(None, 0.0)] * len(items)
        for indices in self._groups(items):
            started = time.perf_counter()
            try:
                outputs = _counted(
                    indices, self._task.forward([items[i].prepared for i in indices])
                )
            except Exception as exc:
                outputs = [self._failed(exc)] * len(indices)
            seconds = time.perf_counter() - started
            for index, output in zip(indices, outputs, strict=True):
                results[index] = (output, seconds)
        return results

    @_batched  # type: ignore[untyped-decorator]
    async def _forward_streaming(
        self, items: list[_Item]
    ) -> AsyncIterator[list[tuple[str, Any, float] | None]]:
        streams = [_ReplicaStream(item) for item in items]
        done: list[tuple[str, Any, float] | None] = [None] * len(items)
        for indices in self._groups(items):
            started = time.perf_counter()
            work = asyncio.ensure_future(
                self._on(
                    self._device,
                    self._task.forward_streaming,
                    [items[i].prepared for i in indices],
                    [streams[i] for i in indices],
                )
            )
            while not work.done():
                await asyncio.wait([work], timeout=_PARTIAL_EVERY_S)
                yield [
                    self._partial(streams[i]) if i in indices else None for i in range(len(items))
                ]
            seconds = time.perf_counter() - started
            try:
                outputs = _counted(indices, work.result())
            except Exception as exc:
                outputs = [self._failed(exc)] * len(indices)
            for index, raw in zip(indices, outputs, strict=True):
                done[index] = ("done", raw, seconds)
        yield done

    def _failed(self, exc: Exception) -> _Failed:
        logger.error("%s: a forward failed", self._task.name, exc_info=exc)
        return _Failed(exc)

    def _partial(self, stream: _ReplicaStream) -> tuple[str, Any, float] | None:
        value = stream.take()
        if value is _NOTHING:
            return None
        return ("partial", self._task.render_partial(value), 0.0)


def _counted(indices: Sequence[int], outputs: Sequence[Any]) -> Sequence[Any]:
    """A forward's outputs, one per input. Otherwise an internal error, as in the local
    batcher: the user hears that the model failed, the operator reads the counts."""
    if len(outputs) != len(indices):
        raise RuntimeError(f"the forward returned {len(outputs)} outputs for {len(indices)} inputs")
    return outputs


def _replica_threads() -> int:
    """The math threads for the replica's forwards: OMP_NUM_THREADS, which Ray sets to the
    cores it reserved for the replica unless the operator set it, else every usable core."""
    setting = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        return max(1, int(setting))
    except ValueError:
        return usable_cores()
