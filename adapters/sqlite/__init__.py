"""The SQLite store: ``core.ports.Store`` on aiosqlite (WAL) plus image files on disk."""

from adapters.sqlite.store import SqliteStore

__all__ = ["SqliteStore"]
