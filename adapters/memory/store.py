"""``core.ports.Store`` in dicts: nothing persists.

For runs that need no memory between starts (the command line, which works on files the
user already has) and for tests of the service. It passes the same contract suite as the
SQLite store (tests/test_store_contract.py), so behaviour proven against it holds for the
SQLite store too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from core.ports import (
    AnswerRecord,
    ChatRef,
    Forgotten,
    Job,
    Rating,
    ResultKey,
    StoredImage,
    UserRef,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class _ContextRow:
    sha256: str
    sender: UserRef
    at: datetime
    # Arrival order, which breaks ties between rows written in the same instant.
    seq: int
    answer: str | None


@dataclass
class MemoryStore:
    images: dict[str, tuple[bytes, StoredImage]] = field(default_factory=dict)
    owners: dict[str, set[UserRef]] = field(default_factory=dict)
    results: dict[ResultKey, str] = field(default_factory=dict)
    # (chat, message id, position) -> the image and who caused the row.
    context: dict[tuple[ChatRef, str, int], _ContextRow] = field(default_factory=dict)
    answers: dict[str, AnswerRecord] = field(default_factory=dict)
    # event id -> (job, finished); dicts keep insertion order, which breaks accepted ties.
    jobs: dict[str, tuple[Job, datetime | None]] = field(default_factory=dict)
    rated: dict[tuple[UserRef, str, str], Rating] = field(default_factory=dict)
    counts: dict[tuple[UserRef, str, date], int] = field(default_factory=dict)
    settings: dict[ChatRef, str] = field(default_factory=dict)
    forgotten: set[UserRef] = field(default_factory=set)
    closed: bool = False
    _seq: int = 0

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
        if key.sha256 in self.images:
            self.results[key] = value

    # -- chat context --------------------------------------------------------------------
    async def remember_image(
        self,
        chat: ChatRef,
        message_id: str,
        position: int,
        sha256: str,
        sender: UserRef,
        now: datetime,
        answer: str | None = None,
    ) -> None:
        _check_aware(now)
        self._seq += 1
        row = _ContextRow(sha256, sender, now, self._seq, answer)
        self.context[chat, message_id, position] = row

    async def last_image(self, chat: ChatRef) -> str | None:
        rows = [row for (where, _, _), row in self.context.items() if where == chat]
        newest = max(rows, key=lambda row: (row.at, row.seq), default=None)
        return None if newest is None else newest.sha256

    async def images_of_message(self, chat: ChatRef, message_id: str) -> dict[int, str]:
        found = {
            position: row.sha256
            for (where, message, position), row in self.context.items()
            if (where, message) == (chat, message_id)
        }
        return dict(sorted(found.items()))

    async def answer_of_message(self, chat: ChatRef, message_id: str) -> str | None:
        found = sorted(
            (position, row.answer)
            for (where, message, position), row in self.context.items()
            if (where, message) == (chat, message_id) and row.answer is not None
        )
        return found[0][1] if found else None

    # -- answers -------------------------------------------------------------------------
    async def put_answer(self, answer: AnswerRecord) -> None:
        _check_aware(answer.created)
        if answer.sha256 is not None and answer.sha256 not in self.images:
            return
        known = self.answers.get(answer.handle)
        if known is not None:
            answer = AnswerRecord(
                known.handle,
                known.chat,
                known.user,
                known.kind,
                known.sha256,
                answer.result,
                known.created,
            )
        self.answers[answer.handle] = answer

    async def get_answer(self, handle: str) -> AnswerRecord | None:
        return self.answers.get(handle)

    # -- job journal ---------------------------------------------------------------------
    async def begin_job(self, job: Job) -> bool:
        _check_aware(job.accepted)
        if job.event_id in self.jobs:
            return False
        self.jobs[job.event_id] = (job, None)
        return True

    async def update_job(self, event_id: str, payload: str) -> None:
        entry = self.jobs.get(event_id)
        if entry is not None and entry[1] is None:
            self.jobs[event_id] = (dataclasses.replace(entry[0], payload=payload), None)

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

    async def take_usage(self, user: UserRef, task: str, day: date, limit: int) -> bool:
        if limit < 0:
            raise ValueError("A usage limit cannot be negative.")
        key = (user, task, day)
        used = self.counts.get(key, 0)
        if limit and used >= limit:
            return False
        self.counts[key] = used + 1
        return True

    async def usage(self, user: UserRef, task: str, day: date) -> int:
        return self.counts.get((user, task, day), 0)

    async def get_chat_settings(self, chat: ChatRef) -> str | None:
        return self.settings.get(chat)

    async def put_chat_settings(self, chat: ChatRef, value: str) -> None:
        self.settings[chat] = value

    # -- privacy and retention -----------------------------------------------------------
    async def forget_user(self, user: UserRef) -> Forgotten:
        sent = [sha for sha, owners in self.owners.items() if user in owners]
        only_theirs = [sha for sha in sent if self.owners[sha] == {user}]
        for owners in self.owners.values():
            owners.discard(user)
        self.rated = {key: r for key, r in self.rated.items() if r.user != user}
        self.context = {key: row for key, row in self.context.items() if row.sender != user}
        self.answers = {h: a for h, a in self.answers.items() if a.user != user}
        for event, (job, finished) in list(self.jobs.items()):
            if job.user != user:
                continue
            if finished is None:
                del self.jobs[event]
            else:
                # An answered event keeps only its id, so a redelivery is still refused.
                scrubbed = dataclasses.replace(job, user=UserRef("", ""), payload="{}")
                self.jobs[event] = (scrubbed, finished)
        self.forgotten.add(user)
        freed = sum(self.images[sha][1].size for sha in only_theirs)
        results = self._delete_images(only_theirs)
        return Forgotten(
            images=len(sent), deleted=len(only_theirs), results=results, bytes_freed=freed
        )

    async def forgotten_users(self) -> frozenset[UserRef]:
        return frozenset(self.forgotten)

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
        self.context = {k: row for k, row in self.context.items() if row.sha256 not in gone}
        self.answers = {h: a for h, a in self.answers.items() if a.sha256 not in gone}
        self.rated = {k: r for k, r in self.rated.items() if r.sha256 not in gone}
        return before - len(self.results)

    # -- exports -------------------------------------------------------------------------
    async def ratings_of_tasks(self, tasks: Collection[str]) -> list[Rating]:
        found = [r for r in self.rated.values() if r.task in tasks]
        return sorted(
            found, key=lambda r: (r.at, r.user.platform, r.user.user_id, r.sha256, r.task)
        )

    async def answers_about(self, sha256: str, user: UserRef) -> list[AnswerRecord]:
        # Dicts keep insertion order, which breaks ties between answers of one instant.
        found = [a for a in self.answers.values() if (a.sha256, a.user) == (sha256, user)]
        return sorted(found, key=lambda a: a.created)

    async def results_of(self, sha256: str, task: str) -> dict[ResultKey, str]:
        return {k: v for k, v in self.results.items() if (k.sha256, k.task) == (sha256, task)}

    async def close(self) -> None:
        self.closed = True


def _check_aware(moment: datetime) -> None:
    if moment.tzinfo is None:
        raise ValueError("Times given to the store must be timezone-aware.")
