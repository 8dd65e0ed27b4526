"""An in-memory store: ``core.ports.Store`` for runs that keep nothing between starts."""

from adapters.memory.store import MemoryStore

__all__ = ["MemoryStore"]
