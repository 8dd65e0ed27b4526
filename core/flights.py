"""Identical work in flight runs once: later callers wait for the first one's result.

Ten people posting the same new image at once cost one caption and one OCR run, not ten:
the results cache only helps once a result exists, and this covers the time before. The
work runs in a task of its own, so a caller who leaves does not cancel it for the others;
when the last caller has left, the work is cancelled (and so is its engine request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[Any]
    waiters: int = 0


class Flights:
    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._flights

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        """``work()``'s result, shared with every concurrent caller of the same ``key``."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(asyncio.ensure_future(work()))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda _: self._land(key, flight))
        flight.waiters += 1
        try:
            # shield: this caller's cancellation must not cancel the others' work.
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()
                self._land(key, flight)

    def _land(self, key: Hashable, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if flight.task.done() and not flight.task.cancelled():
            # Retrieved here, so a failure nobody waited for any more is not "never retrieved".
            with contextlib.suppress(BaseException):
                flight.task.exception()
