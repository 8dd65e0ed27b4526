"""A latest-value channel from the device thread to one waiting caller.

``publish`` may be called from any thread and replaces whatever the caller has not read
yet: a slow reader sees the newest state (the text so far, step 12 of 20), never a backlog.
``cancel`` is called on the event loop when the caller goes away; the device side polls
``cancelled`` between steps and stops early.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Generic, TypeVar

T = TypeVar("T")

_NOTHING = object()


class Stream(Generic[T]):
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._latest: object = _NOTHING
        self._changed = asyncio.Event()
        self._cancelled = threading.Event()
        self._closed = False

    @property
    def cancelled(self) -> bool:
        """True once the caller went away; safe to read from any thread."""
        return self._cancelled.is_set()

    def publish(self, value: T) -> None:
        """Offer the newest partial result; any thread."""
        with self._lock:
            self._latest = value
        with contextlib.suppress(RuntimeError):  # the loop closed while the device ran
            self._loop.call_soon_threadsafe(self._changed.set)

    def cancel(self) -> None:
        self._cancelled.set()
        self.close()

    def close(self) -> None:
        """No more values will come; wakes the reader. Event loop only."""
        self._closed = True
        self._changed.set()

    async def next(self) -> T | None:
        """The newest unread value, waiting for one; None once closed with nothing unread."""
        while True:
            with self._lock:
                value, self._latest = self._latest, _NOTHING
            if value is not _NOTHING:
                return value  # type: ignore[return-value]
            if self._closed:
                return None
            self._changed.clear()
            await self._changed.wait()
