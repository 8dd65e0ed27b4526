"""Builds the engine's tasks from settings; the one place that knows every task class."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from core.settings import Settings
from core.task import Task

TASK_NAMES = ("caption", "ocr", "tags", "mood", "vqa", "write", "reimagine")


def build_tasks(
    settings: Settings, names: Iterable[str] = TASK_NAMES
) -> dict[str, Task[Any, Any, Any, Any]]:
    """Construct the named tasks; impossible settings raise ``ConfigError`` here, at start."""
    profile, engine = settings.profile, settings.engine

    # Task modules import torch and their model libraries; import only what is asked for.
    def caption() -> Task[Any, Any, Any, Any]:
        from core.tasks.caption import CaptionTask

        return CaptionTask(profile.caption, engine)

    def ocr() -> Task[Any, Any, Any, Any]:
        from core.tasks.ocr import OcrTask

        return OcrTask(profile.ocr, engine)

    def tags() -> Task[Any, Any, Any, Any]:
        from core.tasks.tags import TagsTask

        return TagsTask(profile.tags, engine)

    def mood() -> Task[Any, Any, Any, Any]:
        from core.tasks.mood import MoodTask

        return MoodTask(profile.mood, engine)

    def vqa() -> Task[Any, Any, Any, Any]:
        from core.tasks.vqa import VqaTask

        return VqaTask(profile.vqa, engine)

    def write() -> Task[Any, Any, Any, Any]:
        from core.tasks.write import WriteTask

        return WriteTask(profile.write, engine)

    def reimagine() -> Task[Any, Any, Any, Any]:
        from core.tasks.reimagine import ReimagineTask

        return ReimagineTask(profile.reimagine, engine)

    factories: dict[str, Callable[[], Task[Any, Any, Any, Any]]] = {
        "caption": caption,
        "ocr": ocr,
        "tags": tags,
        "mood": mood,
        "vqa": vqa,
        "write": write,
        "reimagine": reimagine,
    }
    return {name: factories[name]() for name in names}
