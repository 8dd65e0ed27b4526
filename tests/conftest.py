"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the session, so each ``tiny/`` model is built once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the module, then restore the setting.

    Tiny models gain nothing from a second thread, and when another process holds one of
    the two cores, every op waits on the descheduled thread: a 0.03 s generate took 8 s.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
