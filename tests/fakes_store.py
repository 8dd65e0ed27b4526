"""MemoryStore: ``core.ports.Store`` in dicts, for tests of the service layer.

It passes the same contract suite as the SQLite store (tests/test_store_contract.py), so a
service test that passes against it says something about production. Nothing persists.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from core.ports import ChatRef, Forgotten, Job, Rating, ResultKey, StoredImage, UserRef

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class MemoryStore:
    images: dict[str, tuple[bytes, StoredImage]] = field(default_factory=dict)
    owners: dict[str, set[UserRef]] = field(default_factory=dict)
    results: dict[ResultKey, str] = field(default_factory=dict)
    last: dict[ChatRef, str] = field(default_factory=dict)
    messages: dict[tuple[ChatRef, str], str] = field(default_factory=dict)
    # event id -> (job, finished); dicts keep insertion order, which breaks accepted ties.
    jobs: dict[str, tuple[Job, datetime | None]] = field(default_factory=dict)
    rated: dict[tuple[UserRef, str, str], Rating] = field(default_factory=dict)
    counts: dict[tuple[UserRef, str, date], int] = field(default_factory=dict)
    settings: dict[ChatRef, str] = field(default_factory=dict)
    closed: bool = False

    # -- images --------------------------------------------------------------------------
    async def put_image(self, data: bytes, owner: UserRef, now: datetime) -> StoredImage:
        _check_aware(now)
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 not in self.images:
            self.images[sha256] = (bytes(data), StoredImage(sha256, len(data), now))
        self.owners.setdefault(sha256, set()).add(owner)
        return self.images[sha256][1]

    async def get_image(self, sha256: str) -> bytes | None:
        if not _SHA256.fullmatch(sha256):
            raise ValueError("Not a sha256 hex digest.")
        stored = self.images.get(sha256)
        return None if stored is None else stored[0]

    # -- results cache -------------------------------------------------------------------
    async def get_result(self, key: ResultKey) -> str | None:
        return self.results.get(key)

    async def put_result(self, key: ResultKey, value: str, now: datetime) -> None:
        _check_aware(now)
        self.results[key] = value

    # -- chat context --------------------------------------------------------------------
    async def remember_image(
        self, chat: ChatRef, message_id: str | None, sha256: str, now: datetime
    ) -> None:
        _check_aware(now)
        self.last[chat] = sha256
        if message_id is not None:
            self.messages[chat, message_id] = sha256

    async def last_image(self, chat: ChatRef) -> str | None:
        return self.last.get(chat)

    async def image_of_message(self, chat: ChatRef, message_id: str) -> str | None:
        return self.messages.get((chat, message_id))

    # -- job journal ---------------------------------------------------------------------
    async def begin_job(self, job: Job) -> bool:
        _check_aware(job.accepted)
        if job.event_id in self.jobs:
            return False
        self.jobs[job.event_id] = (job, None)
        return True

    async def finish_job(self, event_id: str, now: datetime) -> None:
        _check_aware(now)
        entry = self.jobs.get(event_id)
        if entry is not None and entry[1] is None:
            self.jobs[event_id] = (entry[0], now)

    async def unfinished_jobs(self) -> list[Job]:
        waiting = [job for job, finished in self.jobs.values() if finished is None]
        return sorted(waiting, key=lambda job: job.accepted)  # stable: ties keep arrival

    # -- feedback, usage, settings -------------------------------------------------------
    async def rate(self, rating: Rating) -> None:
        _check_aware(rating.at)
        self.rated[rating.user, rating.sha256, rating.task] = rating

    async def ratings(self, sha256: str, task: str) -> list[Rating]:
        """Every user's current rating of ``task`` on ``sha256``, oldest first (as SqliteStore)."""
        found = [r for r in self.rated.values() if (r.sha256, r.task) == (sha256, task)]
        return sorted(found, key=lambda r: (r.at, r.user.platform, r.user.user_id))

    async def add_usage(self, user: UserRef, task: str, day: date) -> int:
        key = (user, task, day)
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    async def usage(self, user: UserRef, task: str, day: date) -> int:
        return self.counts.get((user, task, day), 0)

    async def get_chat_settings(self, chat: ChatRef) -> str | None:
        return self.settings.get(chat)

    async def put_chat_settings(self, chat: ChatRef, value: str) -> None:
        self.settings[chat] = value

    # -- privacy and retention -----------------------------------------------------------
    async def forget_user(self, user: UserRef) -> Forgotten:
        only_theirs = [sha for sha, owners in self.owners.items() if owners == {user}]
        for owners in self.owners.values():
            owners.discard(user)
        self.rated = {key: r for key, r in self.rated.items() if r.user != user}
        freed = sum(self.images[sha][1].size for sha in only_theirs)
        results = self._delete_images(only_theirs)
        return Forgotten(images=len(only_theirs), results=results, bytes_freed=freed)

    async def prune(self, now: datetime, max_age_days: float, max_total_bytes: int) -> int:
        """See ``core.ports.Store.prune``; a limit of 0 means no limit of that kind."""
        _check_aware(now)
        if max_age_days < 0 or max_total_bytes < 0:
            raise ValueError("Retention limits cannot be negative.")
        doomed: list[str] = []
        if max_age_days > 0:
            cutoff = now - timedelta(days=max_age_days)
            doomed = [sha for sha, (_, s) in self.images.items() if s.created < cutoff]
            self._delete_images(doomed)
        if max_total_bytes > 0:
            newest_first = sorted(
                (stored for _, stored in self.images.values()),
                key=lambda s: (s.created, s.sha256),
                reverse=True,
            )
            kept_bytes = 0
            too_many = []
            for stored in newest_first:
                kept_bytes += stored.size
                if kept_bytes > max_total_bytes:
                    too_many.append(stored.sha256)
            self._delete_images(too_many)
            doomed += too_many
        return len(doomed)

    def _delete_images(self, shas: list[str]) -> int:
        gone = set(shas)
        for sha in gone:
            del self.images[sha]
            self.owners.pop(sha, None)
        before = len(self.results)
        self.results = {k: v for k, v in self.results.items() if k.sha256 not in gone}
        self.last = {k: v for k, v in self.last.items() if v not in gone}
        self.messages = {k: v for k, v in self.messages.items() if v not in gone}
        return before - len(self.results)

    async def close(self) -> None:
        self.closed = True


def _check_aware(moment: datetime) -> None:
    if moment.tzinfo is None:
        raise ValueError("Times given to the store must be timezone-aware.")
