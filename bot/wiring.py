"""Builds the engine's tasks from settings; the one place that knows every task class."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from core.settings import Settings
from core.task import Task

TASK_NAMES = ("caption", "ocr", "tags")


def build_tasks(
    settings: Settings, names: Iterable[str] = TASK_NAMES
) -> dict[str, Task[Any, Any, Any, Any]]:
    """Construct the named tasks; impossible settings raise ``ConfigError`` here, at start."""
    # Task modules import torch; keep that cost out of `import bot`.
    from core.tasks.caption import CaptionTask
    from core.tasks.ocr import OcrTask
    from core.tasks.tags import TagsTask

    profile, engine = settings.profile, settings.engine
    factories: dict[str, Callable[[], Task[Any, Any, Any, Any]]] = {
        "caption": lambda: CaptionTask(profile.caption, engine),
        "ocr": lambda: OcrTask(profile.ocr, engine),
        "tags": lambda: TagsTask(profile.tags, engine),
    }
    return {name: factories[name]() for name in names}
