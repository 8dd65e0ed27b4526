"""The schema, as ordered migrations.

Migration ``n`` (counting from 1) takes a database from ``PRAGMA user_version`` ``n - 1`` to
``n``. Never edit or reorder a migration that has shipped: databases in the field have
already run it. Change the schema by appending a migration.

Times are ISO 8601 text in UTC with microseconds (``2025-01-31T12:00:00.000000+00:00``):
fixed width, so text order is time order and the sqlite3 shell shows them readably.
"""

from __future__ import annotations

# Each migration is a tuple of single statements; they run in one transaction together
# with the bump of user_version (executescript would commit half-way).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1. The first schema.
    (
        # Image bytes live on disk under their sha256; a row exists once the file does.
        """
        CREATE TABLE images (
            sha256  TEXT PRIMARY KEY,
            size    INTEGER NOT NULL,
            created TEXT NOT NULL
        )
        """,
        "CREATE INDEX images_by_created ON images (created)",
        # Who sent an image; it stays while anyone who sent it has not asked to be forgotten.
        """
        CREATE TABLE image_owners (
            sha256     TEXT NOT NULL REFERENCES images (sha256) ON DELETE CASCADE,
            platform   TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            first_sent TEXT NOT NULL,
            PRIMARY KEY (sha256, platform, user_id)
        )
        """,
        "CREATE INDEX image_owners_by_user ON image_owners (platform, user_id)",
        # No foreign key to images: a result or a context row may name an image that is not
        # stored (yet or any more); deleting an image deletes them explicitly.
        """
        CREATE TABLE results (
            sha256  TEXT NOT NULL,
            task    TEXT NOT NULL,
            model   TEXT NOT NULL,
            params  TEXT NOT NULL,
            value   TEXT NOT NULL,
            created TEXT NOT NULL,
            PRIMARY KEY (sha256, task, model, params)
        )
        """,
        """
        CREATE TABLE chat_last_image (
            platform TEXT NOT NULL,
            chat_id  TEXT NOT NULL,
            sha256   TEXT NOT NULL,
            at       TEXT NOT NULL,
            PRIMARY KEY (platform, chat_id)
        )
        """,
        "CREATE INDEX chat_last_image_by_image ON chat_last_image (sha256)",
        """
        CREATE TABLE message_images (
            platform   TEXT NOT NULL,
            chat_id    TEXT NOT NULL,
            message_id TEXT NOT NULL,
            sha256     TEXT NOT NULL,
            at         TEXT NOT NULL,
            PRIMARY KEY (platform, chat_id, message_id)
        )
        """,
        "CREATE INDEX message_images_by_image ON message_images (sha256)",
        # The journal: a row is written before work starts; finished stays NULL until the
        # answer went out. The rowid breaks ties between jobs accepted in the same instant.
        """
        CREATE TABLE jobs (
            event_id      TEXT PRIMARY KEY,
            chat_platform TEXT NOT NULL,
            chat_id       TEXT NOT NULL,
            user_platform TEXT NOT NULL,
            user_id       TEXT NOT NULL,
            kind          TEXT NOT NULL,
            payload       TEXT NOT NULL,
            accepted      TEXT NOT NULL,
            finished      TEXT
        )
        """,
        "CREATE INDEX jobs_unfinished ON jobs (accepted) WHERE finished IS NULL",
        """
        CREATE TABLE ratings (
            platform TEXT NOT NULL,
            user_id  TEXT NOT NULL,
            sha256   TEXT NOT NULL,
            task     TEXT NOT NULL,
            score    INTEGER NOT NULL,
            at       TEXT NOT NULL,
            PRIMARY KEY (platform, user_id, sha256, task)
        )
        """,
        "CREATE INDEX ratings_by_result ON ratings (sha256, task)",
        # day is an ISO date (the service's UTC day).
        """
        CREATE TABLE usage (
            platform TEXT NOT NULL,
            user_id  TEXT NOT NULL,
            task     TEXT NOT NULL,
            day      TEXT NOT NULL,
            count    INTEGER NOT NULL,
            PRIMARY KEY (platform, user_id, task, day)
        )
        """,
        """
        CREATE TABLE chat_settings (
            platform TEXT NOT NULL,
            chat_id  TEXT NOT NULL,
            value    TEXT NOT NULL,
            PRIMARY KEY (platform, chat_id)
        )
        """,
    ),
    # 2. Several images per message, whose every context row knows who caused it (so forget
    #    can unlink a user from a chat even when someone else also sent the image), and
    #    answers with stable handles for buttons. The last image of a chat is now simply
    #    its newest context row.
    (
        """
        CREATE TABLE chat_images (
            platform        TEXT NOT NULL,
            chat_id         TEXT NOT NULL,
            message_id      TEXT NOT NULL,
            position        INTEGER NOT NULL,
            sha256          TEXT NOT NULL,
            sender_platform TEXT NOT NULL,
            sender_id       TEXT NOT NULL,
            at              TEXT NOT NULL,
            answer          TEXT,
            PRIMARY KEY (platform, chat_id, message_id, position)
        )
        """,
        "CREATE INDEX chat_images_newest ON chat_images (platform, chat_id, at)",
        "CREATE INDEX chat_images_by_image ON chat_images (sha256)",
        "CREATE INDEX chat_images_by_sender ON chat_images (sender_platform, sender_id)",
        # Version 1 did not record who sent a message: its image's first owner did.
        """
        INSERT INTO chat_images
        SELECT m.platform, m.chat_id, m.message_id, 0, m.sha256, o.platform, o.user_id, m.at,
               NULL
        FROM message_images AS m
        JOIN image_owners AS o ON o.sha256 = m.sha256
        WHERE o.first_sent = (SELECT MIN(first_sent) FROM image_owners WHERE sha256 = m.sha256)
        GROUP BY m.platform, m.chat_id, m.message_id
        """,
        # A last image without a message (the web playground's) keeps a row of its own.
        """
        INSERT OR IGNORE INTO chat_images
        SELECT c.platform, c.chat_id, 'v1-last-image', 0, c.sha256, o.platform, o.user_id, c.at,
               NULL
        FROM chat_last_image AS c
        JOIN image_owners AS o ON o.sha256 = c.sha256
        WHERE o.first_sent = (SELECT MIN(first_sent) FROM image_owners WHERE sha256 = c.sha256)
        GROUP BY c.platform, c.chat_id
        """,
        "DROP TABLE message_images",
        "DROP TABLE chat_last_image",
        """
        CREATE TABLE answers (
            handle        TEXT PRIMARY KEY,
            platform      TEXT NOT NULL,
            chat_id       TEXT NOT NULL,
            user_platform TEXT NOT NULL,
            user_id       TEXT NOT NULL,
            kind          TEXT NOT NULL,
            sha256        TEXT,
            result        TEXT NOT NULL,
            created       TEXT NOT NULL
        )
        """,
        "CREATE INDEX answers_by_user ON answers (user_platform, user_id)",
        "CREATE INDEX answers_by_image ON answers (sha256)",
        "ALTER TABLE ratings ADD COLUMN answer TEXT",
        "CREATE INDEX jobs_by_user ON jobs (user_platform, user_id)",
    ),
    # 3. Who asked to be forgotten: forgetting deletes their rows, but a user may go on
    #    using the bot afterwards, and exports of ratings must leave them out for good.
    (
        """
        CREATE TABLE forgotten_users (
            platform TEXT NOT NULL,
            user_id  TEXT NOT NULL,
            PRIMARY KEY (platform, user_id)
        ) WITHOUT ROWID
        """,
    ),
)
