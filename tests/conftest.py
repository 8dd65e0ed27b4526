"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.backends import BACKENDS

if TYPE_CHECKING:
    from adapters.ray import RayBackend


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


@pytest.fixture(scope="module")
def ray_backend() -> Iterator[RayBackend]:
    """A local Ray (2 CPUs) for the module, started by the backend itself as the bot starts
    it when ``[ray] address`` is empty; about 5 s. Each test takes its deployments down."""
    from adapters.ray import RayBackend
    from core.settings import EngineSettings, RaySettings

    backend = RayBackend(RaySettings(num_cpus=2), EngineSettings())
    backend.start()
    yield backend
    backend.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each executor backend in turn (see ``tests.backends``); "ray" starts the module's
    local Ray."""
    if request.param == "ray":
        pytest.importorskip("ray", reason="Ray is the optional extra '.[ray]'")
        request.getfixturevalue("ray_backend")
    return str(request.param)
