"""Builds the engine's tasks from settings, the one place that knows every task class, and
the service the command line uses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from core.engine import Engine
from core.service import Service
from core.settings import ServiceSettings, Settings
from core.task import Task
from core.tiny import resolve_model

# Task name -> its class; each is built from the profile section of the same name.
TASK_CLASSES = {
    "caption": "core.tasks.caption:CaptionTask",
    "ocr": "core.tasks.ocr:OcrTask",
    "tags": "core.tasks.tags:TagsTask",
    "mood": "core.tasks.mood:MoodTask",
    "vqa": "core.tasks.vqa:VqaTask",
    "write": "core.tasks.write:WriteTask",
    "reimagine": "core.tasks.reimagine:ReimagineTask",
}
TASK_NAMES = tuple(TASK_CLASSES)


def build_tasks(
    settings: Settings, names: Iterable[str] = TASK_NAMES
) -> dict[str, Task[Any, Any, Any, Any]]:
    """Construct the named tasks; impossible settings raise ``ConfigError`` here, at start."""
    return {name: make() for name, make in task_factories(settings, names).items()}


def task_factories(
    settings: Settings, names: Iterable[str] = TASK_NAMES
) -> dict[str, Callable[[], Task[Any, Any, Any, Any]]]:
    """How to build each named task: picklable, so a Ray replica builds its own."""
    if settings.profile.name == "gpu" and settings.engine.backend == "local":
        from core.tasks import _runtime

        # On a CPU this profile's models take minutes per request and hit the watchdog:
        # better to refuse now, saying why there is no GPU.
        _runtime.require_gpu(settings.engine.device)
    factories: dict[str, Callable[[], Task[Any, Any, Any, Any]]] = {}
    for name in names:
        # Task modules import torch and their model libraries: only what is asked for.
        module, _, cls = TASK_CLASSES[name].partition(":")
        task_class = getattr(importlib.import_module(module), cls)
        # The tiny builders are wired in here, so `tiny/...` names work in every profile
        # while the core itself knows only hub ids and folders.
        factories[name] = functools.partial(
            task_class,
            getattr(settings.profile, name),
            settings.engine,
            resolve_model=resolve_model,
        )
    return factories


@contextlib.asynccontextmanager
async def engine_for(
    settings: Settings,
    names: Iterable[str] = TASK_NAMES,
    on_dead: Callable[[str], None] | None = None,
) -> AsyncIterator[Engine]:
    """The engine with the named tasks on the configured backend: this machine's device,
    or a Ray cluster (``[engine] backend = "ray"``), each task a Ray Serve deployment."""
    factories = task_factories(settings, names)
    engine_settings = dataclasses.replace(
        settings.engine, device=resolved_device(settings.engine.device)
    )
    if settings.engine.backend == "local":
        tasks = {name: make() for name, make in factories.items()}
        async with Engine(
            tasks, engine_settings, on_dead=on_dead, pin_threads=pin_threads
        ) as engine:
            yield engine
        return
    from adapters.ray import RayBackend, RayExecutor

    backend = RayBackend(settings.ray, engine_settings)
    await asyncio.to_thread(backend.start)
    remote = backend.tasks(factories)
    try:
        async with Engine(remote, engine_settings, executor=RayExecutor()) as engine:
            yield engine
    finally:
        await asyncio.to_thread(backend.stop)


def pin_threads(count: int) -> None:
    """torch's per-thread pinning (``core.tasks._runtime.pin_threads``), for the engine's
    threads; torch is imported by the first thread that needs it, not by the command line."""
    from core.tasks._runtime import pin_threads as pin

    pin(count)


def resolved_device(device: str) -> str:
    """``auto`` as the device it means here: the engine runs a CPU and a GPU differently
    (see ``core.executor.CpuLanes``) and imports no torch to tell which it has."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.asynccontextmanager
async def local_service(settings: Settings, names: Iterable[str]) -> AsyncIterator[Service]:
    """The service over an in-memory store, for the command line: the user's own files,
    no quotas, no per-user limit, nothing kept after the run; links fetched as the bot
    fetches them."""
    from adapters.http import LinkFetcher
    from adapters.memory import MemoryStore

    unlimited = ServiceSettings(
        per_user_in_flight=0, daily_describe=0, daily_ask=0, daily_write=0, daily_reimagine=0
    )
    async with (
        LinkFetcher(settings.links) as fetcher,
        engine_for(settings, names) as engine,
    ):
        service = Service(
            engine,
            MemoryStore(),
            unlimited,
            fetcher=fetcher if settings.links.enabled else None,
        )
        try:
            yield service
        finally:
            await service.shutdown(grace_s=0)
