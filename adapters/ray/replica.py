"""What runs on the Ray cluster: one Ray Serve deployment per model task.

A replica loads its task's model once, measures the batch size that pays on its device
(as the local engine does), and from then on takes requests one by one: it preprocesses
each, batches the forwards with ``@serve.batch`` (grouped by the task's batch key), and
postprocesses each result. Streaming tasks (the social caption's drafts, Stable
Diffusion's steps) send their partials as they come, rendered here, where the tokenizer is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve

from core.engine import measure_batch

# Ray Serve's batching decorator, untyped here: its stubs do not describe methods.
_batched: Any = serve.batch(max_batch_size=1)

# A request standing for the task's own sample input: the engine's warm-up.
WARM_UP = "captionbot:warm-up"
# How often a streaming batch hands out the newest partials.
_PARTIAL_EVERY_S = 0.1
_NOTHING = object()


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
    the task (its class and settings)."""

    def __init__(self, make: Callable[[], Any], memory_budget_bytes: int) -> None:
        self._task = task = make()
        task.load()
        self._memory = task.memory_bytes()
        if memory_budget_bytes and self._memory > memory_budget_bytes:
            task.unload()
            # A plain error: Ray reports a failed replica's message as text to the bot.
            raise RuntimeError(
                f"the {task.name} model takes {self._memory / 2**20:.0f} MB, more than the "
                f"{memory_budget_bytes / 2**20:.0f} MB ray.{task.name}.memory_budget_mb allows"
            )
        self._batch_size, _ = measure_batch(task)
        wait_s = task.batching.max_wait_ms / 1000
        for batched in (self._forward, self._forward_streaming):
            batched.set_max_batch_size(self._batch_size)
            batched.set_batch_wait_timeout_s(wait_s)

    def info(self) -> dict[str, int]:
        """What the bot's engine shows and sizes its own batches by."""
        return {"batch_size": self._batch_size, "memory_bytes": self._memory}

    async def run(self, request: Any) -> tuple[Any, float]:
        """The result of one request and the seconds its batch's forward took."""
        item = _Item(await asyncio.to_thread(self._prepare, request))
        raw, seconds = await self._forward(item)
        return await asyncio.to_thread(self._task.postprocess, raw), seconds

    async def stream(self, request: Any) -> AsyncIterator[tuple[str, Any, float]]:
        """``("partial", rendered, 0)`` now and then, then ``("done", result, seconds)``."""
        item = _Item(await asyncio.to_thread(self._prepare, request))
        try:
            # Ray Serve streams a batched generator only through a plain one like this.
            async for event in self._forward_streaming(item):
                if event is not None:
                    yield event
        finally:
            item.cancelled = True

    def _prepare(self, request: Any) -> Any:
        if request == WARM_UP:
            return self._task.sample(1)[0]
        return self._task.preprocess(request)

    @_batched  # type: ignore[untyped-decorator]
    async def _forward(self, items: list[_Item]) -> list[tuple[Any, float]]:
        return await asyncio.to_thread(self._grouped, items)

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
            outputs = self._task.forward([items[i].prepared for i in indices])
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
                asyncio.to_thread(
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
            for index, raw in zip(indices, work.result(), strict=True):
                value = await asyncio.to_thread(self._task.postprocess, raw)
                done[index] = ("done", value, seconds)
        yield done

    def _partial(self, stream: _ReplicaStream) -> tuple[str, Any, float] | None:
        value = stream.take()
        if value is _NOTHING:
            return None
        return ("partial", self._task.render_partial(value), 0.0)
