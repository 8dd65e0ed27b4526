"""``core.ports.Store`` on SQLite (through aiosqlite, in WAL mode) and files on disk.

Open it with ``async with SqliteStore.open(db_path, images_dir) as store:`` or
``store = await SqliteStore.open(...)`` and later ``await store.close()``.

Invariants:

- One aiosqlite connection per store; its thread does all the SQL, so the event loop never
  waits on the database. An ``asyncio.Lock`` gives each method the connection to itself, so
  coroutines never interleave statements inside one another's transactions.
- Every write method is one ``BEGIN IMMEDIATE`` transaction. IMMEDIATE takes the write lock
  up front, so a second process waits on the busy timeout instead of failing half-way.
- Image files are written and deleted while that write lock is held. Otherwise a prune
  could delete a file just after a concurrent ``put_image`` saw it and kept only its row.
- A file is written to a temporary name, flushed to disk and renamed into place, so its
  path never holds a partial image; it is never rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Collection, Generator, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from adapters.sqlite import migrations
from core.errors import ConfigError
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
# SQLite's primary result codes for a database this process may not write (exceptions carry
# the extended code, whose low byte is the primary one).
_UNWRITABLE = frozenset({sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN})


class SqliteStore:
    """The bot's memory: SQLite rows plus content-addressed image files."""

    def __init__(self, db: aiosqlite.Connection, images_dir: Path) -> None:
        # Use ``SqliteStore.open``: it configures the connection and migrates the schema.
        self._db = db
        self._images_dir = images_dir
        self._lock = asyncio.Lock()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    def open(
        cls, db_path: Path | str, images_dir: Path | str, *, busy_timeout_s: float = 5.0
    ) -> _Opening:
        """Open (creating and migrating as needed) the database and the image folder.

        Await the result for a store, or use it in ``async with`` to close it on exit.
        Raises ``ConfigError`` for a database written by a newer captionbot, and for a
        folder, image folder or database this process cannot write.
        """
        return _Opening(Path(db_path), Path(images_dir), busy_timeout_s)

    @classmethod
    async def _open(cls, db_path: Path, images_dir: Path, busy_timeout_s: float) -> SqliteStore:
        # A store that cannot be written stops start-up here with one sentence naming the
        # path, rather than failing every request later (or, under a restart policy, looping
        # on tracebacks): the folders are made, a file is written in the images folder, and
        # _migrate writes to the database.
        await asyncio.to_thread(_prepare_folders, db_path.parent, images_dir)
        try:
            # isolation_level=None: the sqlite3 module opens no transactions of its own;
            # every transaction here is an explicit BEGIN IMMEDIATE.
            db = await aiosqlite.connect(db_path, isolation_level=None)
            try:
                await db.execute(f"PRAGMA busy_timeout = {round(busy_timeout_s * 1000)}")
                await db.execute("PRAGMA foreign_keys = ON")
                mode = await _scalar(db, "PRAGMA journal_mode = WAL")
                if mode != "wal":
                    raise ConfigError(
                        f"SQLite could not use WAL for {db_path} (journal mode {mode})."
                    )
                await _migrate(db, db_path)
            except BaseException:
                await db.close()
                raise
        except sqlite3.Error as exc:
            if exc.sqlite_errorcode & 0xFF not in _UNWRITABLE:
                raise
            raise ConfigError(
                f"Cannot write the store's database {db_path} ({exc}): the file and its folder "
                f"must be writable by the user the bot runs as (uid {os.getuid()})."
            ) from exc
        return cls(db, images_dir)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            await self._db.close()

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- images --------------------------------------------------------------------------
    async def put_image(self, data: bytes, owner: UserRef, now: datetime) -> StoredImage:
        sha256 = (await asyncio.to_thread(hashlib.sha256, data)).hexdigest()
        path = self._path(sha256)
        async with self._write() as db:
            await db.execute(
                "INSERT OR IGNORE INTO images (sha256, size, created) VALUES (?, ?, ?)",
                (sha256, len(data), _ts(now)),
            )
            await db.execute(
                """
                INSERT OR IGNORE INTO image_owners (sha256, platform, user_id, first_sent)
                VALUES (?, ?, ?, ?)
                """,
                (sha256, owner.platform, owner.user_id, _ts(now)),
            )
            row = await _one(db, "SELECT size, created FROM images WHERE sha256 = ?", (sha256,))
            # Inside the transaction: a failed write rolls the rows back with it.
            await asyncio.to_thread(_write_once, path, data)
        assert row is not None
        return StoredImage(sha256, row[0], _dt(row[1]))

    async def get_image(self, sha256: str) -> bytes | None:
        return await asyncio.to_thread(_read_if_present, self._path(sha256))

    # -- results cache -------------------------------------------------------------------
    async def get_result(self, key: ResultKey) -> str | None:
        async with self._read() as db:
            row = await _one(
                db,
                """
                SELECT value FROM results
                WHERE sha256 = ? AND task = ? AND model = ? AND params = ?
                """,
                (key.sha256, key.task, key.model, key.params),
            )
        return None if row is None else str(row[0])

    async def put_result(self, key: ResultKey, value: str, now: datetime) -> None:
        async with self._write() as db:
            # Only for a stored image: a result finished after its image was deleted would
            # otherwise belong to nothing that forget or retention could ever delete.
            await db.execute(
                """
                INSERT INTO results (sha256, task, model, params, value, created)
                SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM images WHERE sha256 = ?)
                ON CONFLICT (sha256, task, model, params)
                DO UPDATE SET value = excluded.value, created = excluded.created
                """,
                (key.sha256, key.task, key.model, key.params, value, _ts(now), key.sha256),
            )

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
        async with self._write() as db:
            await db.execute(
                """
                INSERT INTO chat_images (platform, chat_id, message_id, position, sha256,
                                         sender_platform, sender_id, at, answer)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (platform, chat_id, message_id, position)
                DO UPDATE SET sha256 = excluded.sha256, sender_platform = excluded.sender_platform,
                              sender_id = excluded.sender_id, at = excluded.at,
                              answer = excluded.answer
                """,
                (
                    chat.platform,
                    chat.chat_id,
                    message_id,
                    position,
                    sha256,
                    sender.platform,
                    sender.user_id,
                    _ts(now),
                    answer,
                ),
            )

    async def last_image(self, chat: ChatRef) -> str | None:
        async with self._read() as db:
            row = await _one(
                db,
                """
                SELECT sha256 FROM chat_images WHERE platform = ? AND chat_id = ?
                ORDER BY at DESC, rowid DESC LIMIT 1
                """,
                (chat.platform, chat.chat_id),
            )
        return None if row is None else str(row[0])

    async def images_of_message(self, chat: ChatRef, message_id: str) -> dict[int, str]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                """
                SELECT position, sha256 FROM chat_images
                WHERE platform = ? AND chat_id = ? AND message_id = ?
                ORDER BY position
                """,
                (chat.platform, chat.chat_id, message_id),
            )
        return {int(row[0]): str(row[1]) for row in rows}

    async def answer_of_message(self, chat: ChatRef, message_id: str) -> str | None:
        async with self._read() as db:
            row = await _one(
                db,
                """
                SELECT answer FROM chat_images
                WHERE platform = ? AND chat_id = ? AND message_id = ? AND answer IS NOT NULL
                ORDER BY position LIMIT 1
                """,
                (chat.platform, chat.chat_id, message_id),
            )
        return None if row is None else str(row[0])

    # -- answers -------------------------------------------------------------------------
    async def put_answer(self, answer: AnswerRecord) -> None:
        async with self._write() as db:
            await db.execute(
                """
                INSERT INTO answers (handle, platform, chat_id, user_platform, user_id, kind,
                                     sha256, result, created)
                SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?
                WHERE ?10 IS NULL OR EXISTS (SELECT 1 FROM images WHERE sha256 = ?10)
                ON CONFLICT (handle) DO UPDATE SET result = excluded.result
                """,
                (
                    answer.handle,
                    answer.chat.platform,
                    answer.chat.chat_id,
                    answer.user.platform,
                    answer.user.user_id,
                    answer.kind,
                    answer.sha256,
                    answer.result,
                    _ts(answer.created),
                    answer.sha256,
                ),
            )

    async def get_answer(self, handle: str) -> AnswerRecord | None:
        async with self._read() as db:
            row = await _one(
                db,
                """
                SELECT platform, chat_id, user_platform, user_id, kind, sha256, result, created
                FROM answers WHERE handle = ?
                """,
                (handle,),
            )
        if row is None:
            return None
        return AnswerRecord(
            handle=handle,
            chat=ChatRef(row[0], row[1]),
            user=UserRef(row[2], row[3]),
            kind=row[4],
            sha256=row[5],
            result=row[6],
            created=_dt(row[7]),
        )

    # -- job journal ---------------------------------------------------------------------
    async def begin_job(self, job: Job) -> bool:
        async with self._write() as db:
            cursor = await db.execute(
                """
                INSERT OR IGNORE INTO jobs (event_id, chat_platform, chat_id, user_platform,
                                            user_id, kind, payload, accepted)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    job.event_id,
                    job.chat.platform,
                    job.chat.chat_id,
                    job.user.platform,
                    job.user.user_id,
                    job.kind,
                    job.payload,
                    _ts(job.accepted),
                ),
            )
            # rowcount is sqlite3_changes(): 0 when the event id was already journalled.
            return cursor.rowcount == 1

    async def update_job(self, event_id: str, payload: str) -> None:
        async with self._write() as db:
            await db.execute(
                "UPDATE jobs SET payload = ? WHERE event_id = ? AND finished IS NULL",
                (payload, event_id),
            )

    async def finish_job(self, event_id: str, now: datetime) -> None:
        async with self._write() as db:
            await db.execute(
                "UPDATE jobs SET finished = ? WHERE event_id = ? AND finished IS NULL",
                (_ts(now), event_id),
            )

    async def unfinished_jobs(self) -> list[Job]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                """
                SELECT event_id, chat_platform, chat_id, user_platform, user_id, kind, payload,
                       accepted
                FROM jobs
                WHERE finished IS NULL
                ORDER BY accepted, rowid
                """
            )
        return [
            Job(
                event_id=row[0],
                chat=ChatRef(row[1], row[2]),
                user=UserRef(row[3], row[4]),
                kind=row[5],
                payload=row[6],
                accepted=_dt(row[7]),
            )
            for row in rows
        ]

    # -- feedback, usage, settings -------------------------------------------------------
    async def rate(self, rating: Rating) -> None:
        async with self._write() as db:
            await db.execute(
                """
                INSERT INTO ratings (platform, user_id, sha256, task, score, at, answer)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (platform, user_id, sha256, task)
                DO UPDATE SET score = excluded.score, at = excluded.at, answer = excluded.answer
                """,
                (
                    rating.user.platform,
                    rating.user.user_id,
                    rating.sha256,
                    rating.task,
                    rating.score,
                    _ts(rating.at),
                    rating.answer,
                ),
            )

    async def ratings(self, sha256: str, task: str) -> list[Rating]:
        """Every user's current rating of ``task`` on ``sha256``, oldest first.

        Not part of ``core.ports.Store`` (nothing in the core reads ratings yet); the contract
        tests use it, and MemoryStore has the same method.
        """
        async with self._read() as db:
            rows = await db.execute_fetchall(
                """
                SELECT platform, user_id, score, at, answer FROM ratings
                WHERE sha256 = ? AND task = ?
                ORDER BY at, platform, user_id
                """,
                (sha256, task),
            )
        return [
            Rating(UserRef(row[0], row[1]), sha256, task, row[2], _dt(row[3]), row[4])
            for row in rows
        ]

    async def take_usage(self, user: UserRef, task: str, day: date, limit: int) -> bool:
        if limit < 0:
            raise ValueError("A usage limit cannot be negative.")
        async with self._write() as db:
            # One statement: the conditional update cannot race another request's count.
            row = await _one(
                db,
                """
                INSERT INTO usage (platform, user_id, task, day, count) VALUES (?, ?, ?, ?, 1)
                ON CONFLICT (platform, user_id, task, day) DO UPDATE SET count = count + 1
                WHERE ? = 0 OR count < ?
                RETURNING count
                """,
                (user.platform, user.user_id, task, day.isoformat(), limit, limit),
            )
        return row is not None

    async def usage(self, user: UserRef, task: str, day: date) -> int:
        async with self._read() as db:
            row = await _one(
                db,
                """
                SELECT count FROM usage
                WHERE platform = ? AND user_id = ? AND task = ? AND day = ?
                """,
                (user.platform, user.user_id, task, day.isoformat()),
            )
        return 0 if row is None else int(row[0])

    async def get_chat_settings(self, chat: ChatRef) -> str | None:
        async with self._read() as db:
            row = await _one(
                db,
                "SELECT value FROM chat_settings WHERE platform = ? AND chat_id = ?",
                (chat.platform, chat.chat_id),
            )
        return None if row is None else str(row[0])

    async def put_chat_settings(self, chat: ChatRef, value: str) -> None:
        async with self._write() as db:
            await db.execute(
                """
                INSERT INTO chat_settings (platform, chat_id, value) VALUES (?, ?, ?)
                ON CONFLICT (platform, chat_id) DO UPDATE SET value = excluded.value
                """,
                (chat.platform, chat.chat_id, value),
            )

    # -- privacy and retention -----------------------------------------------------------
    async def forget_user(self, user: UserRef) -> Forgotten:
        who = (user.platform, user.user_id)
        async with self._write() as db:
            sent = list(
                await db.execute_fetchall(
                    "SELECT sha256 FROM image_owners WHERE platform = ? AND user_id = ?", who
                )
            )
            only_theirs = await db.execute_fetchall(
                """
                SELECT images.sha256, images.size
                FROM images JOIN image_owners AS mine USING (sha256)
                WHERE mine.platform = ? AND mine.user_id = ?
                  AND NOT EXISTS (
                      SELECT 1 FROM image_owners AS other
                      WHERE other.sha256 = mine.sha256
                        AND NOT (other.platform = ? AND other.user_id = ?)
                  )
                """,
                who + who,
            )
            for statement in (
                "DELETE FROM image_owners WHERE platform = ? AND user_id = ?",
                "DELETE FROM ratings WHERE platform = ? AND user_id = ?",
                "DELETE FROM chat_images WHERE sender_platform = ? AND sender_id = ?",
                "DELETE FROM answers WHERE user_platform = ? AND user_id = ?",
                "DELETE FROM jobs WHERE user_platform = ? AND user_id = ? AND finished IS NULL",
                # An answered event keeps only its id, so a redelivery is still refused.
                """
                UPDATE jobs SET user_platform = '', user_id = '', payload = '{}'
                WHERE user_platform = ? AND user_id = ?
                """,
            ):
                await db.execute(statement, who)
            await db.execute(
                "INSERT OR IGNORE INTO forgotten_users (platform, user_id) VALUES (?, ?)", who
            )
            doomed = [(str(sha256), int(size)) for sha256, size in only_theirs]
            results = await self._delete_images(db, doomed)
        return Forgotten(
            images=len(sent),
            deleted=len(doomed),
            results=results,
            bytes_freed=sum(size for _, size in doomed),
        )

    async def forgotten_users(self) -> frozenset[UserRef]:
        async with self._read() as db:
            rows = await db.execute_fetchall("SELECT platform, user_id FROM forgotten_users")
        return frozenset(UserRef(row[0], row[1]) for row in rows)

    async def prune(self, now: datetime, max_age_days: float, max_total_bytes: int) -> int:
        """See ``core.ports.Store.prune``; a limit of 0 means no limit of that kind."""
        if max_age_days < 0 or max_total_bytes < 0:
            raise ValueError("Retention limits cannot be negative.")
        deleted = 0
        async with self._write() as db:
            if max_age_days > 0:
                cutoff = _ts(now - timedelta(days=max_age_days))
                too_old = list(
                    await db.execute_fetchall(
                        "SELECT sha256, size FROM images WHERE created < ?", (cutoff,)
                    )
                )
                await self._delete_images(db, too_old)
                deleted += len(too_old)
            if max_total_bytes > 0:
                # Keep the newest images whose sizes, summed from the newest down, fit.
                too_many = list(
                    await db.execute_fetchall(
                        """
                    SELECT sha256, size FROM (
                        SELECT sha256, size,
                               SUM(size) OVER (ORDER BY created DESC, sha256 DESC) AS kept_bytes
                        FROM images
                    )
                    WHERE kept_bytes > ?
                    """,
                        (max_total_bytes,),
                    )
                )
                await self._delete_images(db, too_many)
                deleted += len(too_many)
        return deleted

    async def _delete_images(
        self, db: aiosqlite.Connection, images: Iterable[Sequence[Any]]
    ) -> int:
        """Delete images (rows, files, their results and the context pointing at them)
        inside the caller's transaction; return how many results went with them."""
        shas = [(str(image[0]),) for image in images]
        if not shas:
            return 0
        results = await db.executemany("DELETE FROM results WHERE sha256 = ?", shas)
        await db.executemany("DELETE FROM chat_images WHERE sha256 = ?", shas)
        await db.executemany("DELETE FROM answers WHERE sha256 = ?", shas)
        await db.executemany("DELETE FROM ratings WHERE sha256 = ?", shas)
        # image_owners rows go by ON DELETE CASCADE.
        await db.executemany("DELETE FROM images WHERE sha256 = ?", shas)
        await asyncio.to_thread(_unlink_all, [self._path(sha) for (sha,) in shas])
        return results.rowcount

    # -- exports -------------------------------------------------------------------------
    async def ratings_of_tasks(self, tasks: Collection[str]) -> list[Rating]:
        wanted = list(tasks)
        async with self._read() as db:
            rows = await db.execute_fetchall(
                f"""
                SELECT platform, user_id, sha256, task, score, at, answer FROM ratings
                WHERE task IN ({", ".join("?" * len(wanted))})
                ORDER BY at, platform, user_id, sha256, task
                """,
                wanted,
            )
        return [
            Rating(UserRef(row[0], row[1]), row[2], row[3], row[4], _dt(row[5]), row[6])
            for row in rows
        ]

    async def answers_about(self, sha256: str, user: UserRef) -> list[AnswerRecord]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                """
                SELECT handle, platform, chat_id, kind, result, created FROM answers
                WHERE sha256 = ? AND user_platform = ? AND user_id = ?
                ORDER BY created, rowid
                """,
                (sha256, user.platform, user.user_id),
            )
        return [
            AnswerRecord(row[0], ChatRef(row[1], row[2]), user, row[3], sha256, row[4], _dt(row[5]))
            for row in rows
        ]

    async def results_of(self, sha256: str, task: str) -> dict[ResultKey, str]:
        async with self._read() as db:
            rows = await db.execute_fetchall(
                "SELECT model, params, value FROM results WHERE sha256 = ? AND task = ?",
                (sha256, task),
            )
        return {ResultKey(sha256, task, row[0], row[1]): str(row[2]) for row in rows}

    # -- plumbing ------------------------------------------------------------------------
    def _path(self, sha256: str) -> Path:
        # The name becomes a path: anything but a hex digest could climb out of images_dir.
        if not _SHA256.fullmatch(sha256):
            raise ValueError("Not a sha256 hex digest.")
        return self._images_dir / sha256[:2] / sha256[2:]

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            yield self._db

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.commit()
            except BaseException:
                # Queued behind whatever already reached the connection's thread (even a
                # BEGIN whose await was cancelled), and a no-op outside a transaction.
                await self._db.rollback()
                raise


class _Opening:
    """What ``SqliteStore.open`` returns: awaitable, and an async context manager."""

    def __init__(self, db_path: Path, images_dir: Path, busy_timeout_s: float) -> None:
        self._args = (db_path, images_dir, busy_timeout_s)
        self._store: SqliteStore | None = None

    def __await__(self) -> Generator[Any, None, SqliteStore]:
        return SqliteStore._open(*self._args).__await__()

    async def __aenter__(self) -> SqliteStore:
        self._store = await self
        return self._store

    async def __aexit__(self, *exc_info: object) -> None:
        if self._store is not None:
            await self._store.close()


async def _migrate(db: aiosqlite.Connection, db_path: Path) -> None:
    """Run the pending migrations, each in its own transaction.

    The version is read inside each transaction, so two processes opening one new database
    at once do not both run a migration.
    """
    known = len(migrations.MIGRATIONS)
    while True:
        await db.execute("BEGIN IMMEDIATE")
        try:
            version = int(await _scalar(db, "PRAGMA user_version"))
            if version > known:
                raise ConfigError(
                    f"The database {db_path} has schema version {version}, but this captionbot "
                    f"knows versions up to {known}; upgrade captionbot or use another database."
                )
            if version == known:
                # Rewriting the version (then rolling back) proves the file takes writes:
                # BEGIN IMMEDIATE alone succeeds on a read-only database.
                await db.execute(f"PRAGMA user_version = {version}")
                await db.rollback()
                return
            for statement in migrations.MIGRATIONS[version]:
                await db.execute(statement)
            # PRAGMA takes no parameters; version + 1 is an int we computed.
            await db.execute(f"PRAGMA user_version = {version + 1}")
            await db.commit()
        except BaseException:
            await db.rollback()
            raise


async def _one(
    db: aiosqlite.Connection, sql: str, parameters: Sequence[Any] = ()
) -> tuple[Any, ...] | None:
    async with db.execute(sql, parameters) as cursor:
        row = await cursor.fetchone()
    return None if row is None else tuple(row)


async def _scalar(db: aiosqlite.Connection, sql: str) -> Any:
    row = await _one(db, sql)
    assert row is not None
    return row[0]


def _ts(moment: datetime) -> str:
    # Naive datetimes have no defined order against aware ones; refuse them at the edge.
    if moment.tzinfo is None:
        raise ValueError("Times given to the store must be timezone-aware.")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


# -- file IO; these run in worker threads ------------------------------------------------
def _prepare_folders(db_folder: Path, images_dir: Path) -> None:
    """Make the store's folders and create and delete a file among the images."""
    uid = os.getuid()
    for folder in (db_folder, images_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # The path that failed may be an ancestor that mkdir(parents=True) tried to make.
            failed = exc.filename or folder
            raise ConfigError(
                f"Cannot create the store's folder {failed} ({_reason(exc)}): it and the "
                f"folder above it must be folders that the user the bot runs as (uid {uid}) "
                "can write to."
            ) from exc
    try:
        fd, probe = tempfile.mkstemp(dir=images_dir, prefix=".probe-")
        os.close(fd)
        Path(probe).unlink()
    except OSError as exc:
        raise ConfigError(
            f"Cannot write the store's folder {images_dir} ({_reason(exc)}): it must be "
            f"writable by the user the bot runs as (uid {uid})."
        ) from exc


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _write_once(path: Path, data: bytes) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        Path(temp).replace(path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _read_if_present(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
