"""Builds the engine's tasks from settings; the one place that knows every task class."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from core.settings import Settings
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
    tasks: dict[str, Task[Any, Any, Any, Any]] = {}
    for name in names:
        # Task modules import torch and their model libraries: only what is asked for.
        module, _, cls = TASK_CLASSES[name].partition(":")
        task_class = getattr(importlib.import_module(module), cls)
        # The tiny builders are wired in here, so `tiny/...` names work in every profile
        # while the core itself knows only hub ids and folders.
        tasks[name] = task_class(
            getattr(settings.profile, name), settings.engine, resolve_model=resolve_model
        )
    return tasks
