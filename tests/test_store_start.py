"""A store the bot cannot write is refused when it opens, in one sentence naming the path.

The suite runs as root, and permission bits do not stop root, so these stores fail for
reasons root meets too: a folder under a regular file, a database path that is a folder,
and, where this process may mount, a read-only bind mount (what a root-owned folder is to
the Docker image's uid 1000).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from adapters.sqlite import SqliteStore
from core.errors import ConfigError
from core.ports import UserRef

ROOT = Path(__file__).resolve().parents[1]
UID = f"uid {os.getuid()}"


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and message.count(". ") == 0


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """Makes a file or folder read-only in place, by a read-only bind mount over itself."""
    mounted: list[Path] = []

    def bind(path: Path) -> None:
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        done = subprocess.run(
            ["mount", "--bind", "-o", "ro", str(path), str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"this process cannot bind-mount read-only: {done.stderr.strip()}")
        mounted.append(path)

    yield bind
    for path in reversed(mounted):
        # Lazy: detached at once even if something still holds a file open under it, so a
        # leftover mount can never break the temporary folders' cleanup.
        subprocess.run(["umount", "--lazy", str(path)], check=True)


async def test_a_database_folder_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file where the data folder should be")

    with pytest.raises(ConfigError) as refused:
        async with SqliteStore.open(tmp_path / "data" / "bot.db", tmp_path / "images"):
            pass

    message = str(refused.value)
    assert message.startswith(f"Cannot create the store's folder {tmp_path / 'data'} ")
    assert "(file exists)" in message
    assert UID in message
    assert one_sentence(message)


async def test_an_images_folder_under_a_file_is_named_before_the_database_is_made(
    tmp_path: Path,
) -> None:
    (tmp_path / "data").write_text("a file where the data folder should be")

    with pytest.raises(ConfigError) as refused:
        async with SqliteStore.open(tmp_path / "bot.db", tmp_path / "data" / "images"):
            pass

    message = str(refused.value)
    assert message.startswith(f"Cannot create the store's folder {tmp_path / 'data' / 'images'} ")
    assert "(not a directory)" in message
    assert UID in message
    assert one_sentence(message)
    assert not (tmp_path / "bot.db").exists()


async def test_a_database_path_that_is_a_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "bot.db").mkdir()

    with pytest.raises(ConfigError) as refused:
        async with SqliteStore.open(tmp_path / "bot.db", tmp_path / "images"):
            pass

    message = str(refused.value)
    assert message.startswith(f"Cannot write the store's database {tmp_path / 'bot.db'} ")
    assert UID in message
    assert one_sentence(message)


async def test_a_read_only_images_folder_is_refused_at_open_not_at_the_first_image(
    tmp_path: Path, read_only: Callable[[Path], None]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    read_only(images)

    with pytest.raises(ConfigError) as refused:
        async with SqliteStore.open(tmp_path / "bot.db", images):
            pass

    message = str(refused.value)
    assert message.startswith(f"Cannot write the store's folder {images} (read-only file system)")
    assert UID in message
    assert one_sentence(message)


async def test_a_read_only_database_is_refused_at_open(
    tmp_path: Path, read_only: Callable[[Path], None]
) -> None:
    db = tmp_path / "bot.db"
    async with SqliteStore.open(db, tmp_path / "images") as store:
        await store.put_image(b"cat", UserRef("web", "alice"), datetime.now(UTC))
    # The folder stays writable (SQLite's -wal and -shm files), only the database is not:
    # BEGIN IMMEDIATE still succeeds on it, a page write does not.
    read_only(db)

    with pytest.raises(ConfigError) as refused:
        async with SqliteStore.open(db, tmp_path / "images"):
            pass

    message = str(refused.value)
    assert message.startswith(f"Cannot write the store's database {db} ")
    assert "readonly" in message
    assert UID in message
    assert one_sentence(message)


def test_bot_run_with_a_store_it_cannot_write_says_so_in_one_line_and_exits_2(
    tmp_path: Path,
) -> None:
    (tmp_path / "data").write_text("a file where the data folder should be")
    config = tmp_path / "config.toml"
    config.write_text(
        'profile = "cpu"\n'
        '[engine]\ndevice = "cpu"\nmodel_cache = "models"\n'
        '[store]\ndatabase = "data/bot.sqlite3"\nimages_dir = "data/images"\n'
        "[web]\nport = 0\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    environment["PYTHONPATH"] = str(ROOT)

    done = subprocess.run(
        [sys.executable, "-m", "bot", "run", "--config", str(config)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 2, done.stderr[-3000:]
    # Start-up logs a line per task at INFO before the store opens; nothing else may come.
    info = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ")
    said = [line for line in done.stderr.splitlines() if not info.match(line)]
    assert said == [
        f"configuration error: Cannot create the store's folder {tmp_path / 'data'} "
        "(file exists): it and the folder above it must be folders that the user the "
        f"bot runs as ({UID}) can write to."
    ]
    assert done.stdout == ""
