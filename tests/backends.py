"""The engine on either executor backend, for tests that must hold on both: this
process's device ("local") and Ray Serve ("ray", on the module's local Ray from the
``ray_backend`` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from adapters.ray import RayBackend, RayExecutor, RemoteTask
from core.engine import Engine
from core.settings import EngineSettings, RayDeployment, RaySettings

BACKENDS = ("local", "ray")
# Replicas take a fifth of a core each, so a test's deployments fit the 2-CPU Ray.
SMALL = RayDeployment(cpus=0.2)


@contextlib.asynccontextmanager
async def engine_on(
    backend: str,
    factories: dict[str, Callable[[], Any]],
    deployments: dict[str, RayDeployment] | None = None,
    **settings: Any,
) -> AsyncIterator[Engine]:
    """An engine with a task from each factory; on Ray, each a deployment (``SMALL``
    unless ``deployments`` says otherwise) taken down when the engine closes."""
    engine_settings = EngineSettings(**{"device": "cpu", "forward_timeout_s": 60.0, **settings})
    if backend == "local":
        tasks = {name: make() for name, make in factories.items()}
        async with Engine(tasks, engine_settings) as engine:
            yield engine
        return
    chosen = RaySettings(tasks=deployments or dict.fromkeys(factories, SMALL))
    remote = RayBackend(chosen, engine_settings).tasks(factories)
    try:
        async with Engine(remote, engine_settings, executor=RayExecutor()) as engine:
            yield engine
    finally:
        await asyncio.to_thread(_take_down, remote)


def _take_down(remote: dict[str, RemoteTask]) -> None:
    for task in remote.values():
        task.unload()


def delete_ray_apps() -> None:
    """What an engine on a Ray it did not start leaves deployed (for the bot's next start)."""
    from ray import serve

    for name in serve.status().applications:
        if name.startswith("captionbot-"):
            serve.delete(name)
