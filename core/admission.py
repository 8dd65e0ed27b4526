"""Who may start work now: requests at once per user, and daily quotas per use case.

Both checks count only admitted work. The in-flight check and count happen with no await
between them, so requests that arrive at the same moment cannot all slip through; the
quota check and count are one statement in the store, for the same reason across
processes. A request refused for any reason (a bad image, an unknown reply, a full queue)
is refused before its quota is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from core import metrics
from core.errors import LimitReached
from core.ports import Store, UserRef
from core.settings import ServiceSettings

# Use cases that have a daily quota, as a refusal names one of them, and more of them.
QUOTA_NAMES = {
    "describe": ("image description", "image descriptions"),
    "ask": ("question", "questions"),
    "write": ("social caption", "social captions"),
    "reimagine": ("new image", "new images"),
}


@dataclass(frozen=True, slots=True)
class UsageLine:
    """How much of one daily quota a user has used; ``limit`` 0 means no limit."""

    use_case: str
    used: int
    limit: int

    @property
    def left(self) -> int | None:
        return None if not self.limit else max(0, self.limit - self.used)


class Admission:
    def __init__(
        self,
        settings: ServiceSettings,
        store: Store,
        clock: Callable[[], datetime],
        busy_for_s: Callable[[], float],
    ) -> None:
        """``busy_for_s()`` guesses how long until a running request ends, for the
        "requests at once" refusal's retry time."""
        self._settings = settings
        self._store = store
        self._clock = clock
        self._busy_for_s = busy_for_s
        self._quotas = {
            "describe": settings.daily_describe,
            "ask": settings.daily_ask,
            "write": settings.daily_write,
            "reimagine": settings.daily_reimagine,
        }
        self._in_flight: dict[UserRef, int] = {}

    def is_admin(self, user: UserRef) -> bool:
        return f"{user.platform}:{user.user_id}" in self._settings.admins

    def running(self, user: UserRef) -> int:
        return self._in_flight.get(user, 0)

    def enter(self, user: UserRef) -> Callable[[], None]:
        """Take one of ``user``'s slots for requests at once; call the result to give it
        back (once). Raises ``LimitReached`` when all are taken. Admins have no limit."""
        running = self._in_flight.get(user, 0)
        limit = self._settings.per_user_in_flight
        if limit and running >= limit and not self.is_admin(user):
            metrics.QUOTA_REFUSALS.labels("in_flight").inc()
            raise LimitReached(
                f"You already have {running} requests running; wait for one to finish.",
                self._busy_for_s() or 5.0,
            )
        self._in_flight[user] = running + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._in_flight[user] - 1
            if left:
                self._in_flight[user] = left
            else:
                del self._in_flight[user]

        return release

    async def take(self, user: UserRef, use_case: str) -> None:
        """Count one use of ``use_case`` today; ``LimitReached`` when the quota is used up."""
        refusal = await self.try_take(user, use_case)
        if refusal is not None:
            raise refusal

    async def try_take(self, user: UserRef, use_case: str) -> LimitReached | None:
        """Like ``take``, but returns the refusal instead of raising it."""
        limit = self._quotas[use_case]
        if self.is_admin(user):
            limit = 0  # counted, so /usage stays true, but never refused
        now = self._clock()
        if await self._store.take_usage(user, use_case, now.date(), limit):
            return None
        midnight = datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC)
        one, many = QUOTA_NAMES[use_case]
        metrics.QUOTA_REFUSALS.labels(use_case).inc()
        return LimitReached(
            f"You have reached today's limit of {limit} {one if limit == 1 else many}; "
            "the count starts again at midnight UTC.",
            (midnight - now).total_seconds(),
        )

    async def usage(self, user: UserRef) -> tuple[UsageLine, ...]:
        today = self._clock().date()
        exempt = self.is_admin(user)
        lines = []
        for use_case, limit in self._quotas.items():
            used = await self._store.usage(user, use_case, today)
            lines.append(UsageLine(use_case, used, 0 if exempt else limit))
        return tuple(lines)
