"""What the core needs from the outside world, as protocols adapters implement.

``Store`` is the bot's memory. ``adapters/sqlite`` implements it with aiosqlite; the tests
run one contract suite against it and an in-memory fake. Every method is a coroutine and
every write is one transaction: a crash leaves either all of a write or none of it.
Times are timezone-aware (UTC).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ChatRef:
    """A conversation on one platform: a Telegram chat, a Discord channel, a web session."""

    platform: str
    chat_id: str


@dataclass(frozen=True, slots=True)
class UserRef:
    platform: str
    user_id: str


@dataclass(frozen=True, slots=True)
class StoredImage:
    sha256: str
    size: int
    created: datetime


@dataclass(frozen=True, slots=True)
class ResultKey:
    """A result is reusable when image, task, model and parameters are all the same."""

    sha256: str
    task: str
    model: str
    params: str  # canonical JSON of the parameters that change the result


@dataclass(frozen=True, slots=True)
class Job:
    """An accepted platform event, journalled before work starts."""

    event_id: str  # the platform's own id for the event, e.g. "telegram:update:123"
    chat: ChatRef
    user: UserRef
    kind: str  # describe, ask, reimagine, ...
    payload: str  # JSON the adapter needs to redo and answer the job
    accepted: datetime


@dataclass(frozen=True, slots=True)
class Rating:
    user: UserRef
    sha256: str
    task: str
    score: int  # +1 or -1
    at: datetime
    # The answer rated, when the rating came from its button (its exact text is there).
    answer: str | None = None


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    """One answer the bot gave, reachable by a short handle from its buttons and replies.

    The handle survives restarts: a button pressed a week later still finds the image and
    the result it was shown under.
    """

    handle: str
    chat: ChatRef
    user: UserRef  # who asked
    kind: str  # describe, caption, ocr, tags, write, ask, reimagine
    sha256: str | None  # the image it is about; None for an image made from text alone
    result: str  # JSON of what the answer showed
    created: datetime


@dataclass(frozen=True, slots=True)
class Forgotten:
    # Images the user had sent; none is reachable from their chats any more.
    images: int
    # Of those, the ones only they had sent, deleted with their files and results.
    deleted: int
    results: int
    bytes_freed: int


@dataclass(frozen=True, slots=True)
class FetchedImage:
    """An image downloaded from a link, not yet decoded or checked as an image."""

    data: bytes
    # A short file name for messages: from Content-Disposition or the URL's last segment.
    name: str
    # The address the bytes finally came from, after redirects.
    url: str


class ImageFetcher(Protocol):
    """Downloads the image behind an http(s) link a user sent instead of a file."""

    async def fetch(self, url: str, max_bytes: int) -> FetchedImage:
        """Download ``url``; ``InvalidRequest`` with one sentence for anything refused:
        another scheme, a private or loopback address (unless allow-listed), too many
        redirects, more than ``max_bytes``, too slow, or an error answer."""
        ...


class Store(Protocol):
    # -- images (content-addressed files on disk) ---------------------------------------
    async def put_image(self, data: bytes, owner: UserRef, now: datetime) -> StoredImage:
        """Keep ``data`` under its sha256 (once) and record that ``owner`` sent it."""

    async def get_image(self, sha256: str) -> bytes | None: ...

    # -- results cache -------------------------------------------------------------------
    async def get_result(self, key: ResultKey) -> str | None:
        """The cached result's JSON, or None."""

    async def put_result(self, key: ResultKey, value: str, now: datetime) -> None:
        """Keep a result of a stored image; nothing when the image is no longer stored
        (deleted by forget or retention while it was being computed)."""

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
        """Record that ``message_id`` carries ``sha256`` as its image number ``position``
        (0 for the first), on behalf of ``sender``. The bot's own answers are recorded too,
        on behalf of whoever asked and with the ``answer``'s handle, so replies to them
        resolve to the image and the answer. The newest record of a chat is its last
        image."""

    async def last_image(self, chat: ChatRef) -> str | None: ...

    async def images_of_message(self, chat: ChatRef, message_id: str) -> dict[int, str]:
        """The images a message carries, by position (a position may be missing: an image
        that was refused); empty for a message not recorded."""

    async def answer_of_message(self, chat: ChatRef, message_id: str) -> str | None:
        """The handle of the answer a bot's message showed; None for any other message."""

    # -- answers -------------------------------------------------------------------------
    async def put_answer(self, answer: AnswerRecord) -> None:
        """Record an answer; a handle is unique (a second put replaces the result).
        Nothing when the image it is about is no longer stored."""

    async def get_answer(self, handle: str) -> AnswerRecord | None: ...

    # -- job journal ---------------------------------------------------------------------
    async def begin_job(self, job: Job) -> bool:
        """Journal ``job``; False when its event id was seen before (never answer twice)."""

    async def update_job(self, event_id: str, payload: str) -> None:
        """Replace an unfinished job's payload (say, with the images it has stored since)."""

    async def finish_job(self, event_id: str, now: datetime) -> None: ...

    async def unfinished_jobs(self) -> list[Job]:
        """Accepted but unanswered jobs, oldest first, for recovery after a restart."""

    # -- feedback, usage, settings -------------------------------------------------------
    async def rate(self, rating: Rating) -> None:
        """Record a rating; a user's later rating of the same result replaces theirs."""

    async def ratings(self, sha256: str, task: str) -> list[Rating]: ...

    async def take_usage(self, user: UserRef, task: str, day: date, limit: int) -> bool:
        """Count one use unless ``limit`` uses were already counted (0: no limit); False
        when the limit is reached. Checking and counting are one atomic step."""

    async def usage(self, user: UserRef, task: str, day: date) -> int: ...

    async def get_chat_settings(self, chat: ChatRef) -> str | None:
        """The chat's settings as JSON, or None for the defaults."""

    async def put_chat_settings(self, chat: ChatRef, value: str) -> None: ...

    # -- privacy and retention -----------------------------------------------------------
    async def forget_user(self, user: UserRef) -> Forgotten:
        """Unlink ``user`` from everything: every chat-context row they caused (their
        messages and the bot's answers to them), their answers, ratings and journalled
        jobs; images only they sent are deleted with their files and results. Usage counts
        stay, so forgetting does not reset a quota. The user is recorded as forgotten
        (``forgotten_users``), in the same transaction."""

    async def forgotten_users(self) -> frozenset[UserRef]:
        """Everyone ``forget_user`` was ever called for. Exports leave them out for good:
        what they do after forgetting too."""

    async def prune(self, now: datetime, max_age_days: float, max_total_bytes: int) -> int:
        """Delete images older than the age limit, then the oldest until the total fits;
        their results go with them. 0 means no limit. Returns how many were deleted."""

    # -- exports (read-only; the running bot never calls these) ---------------------------
    async def ratings_of_tasks(self, tasks: Collection[str]) -> list[Rating]:
        """Every user's current rating of a result of one of ``tasks``, oldest first."""

    async def answers_about(self, sha256: str, user: UserRef) -> list[AnswerRecord]:
        """The answers ``user`` asked for about the image ``sha256``, oldest first."""

    async def results_of(self, sha256: str, task: str) -> dict[ResultKey, str]:
        """Every cached result of ``task`` on the image ``sha256``, whatever the model and
        parameters (a result's parameters say what the model was given)."""

    async def close(self) -> None: ...
