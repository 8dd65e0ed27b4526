"""``python -m bot prefetch``: download every model the profile needs, ahead of the first
request, with progress in the log; what is already in the cache is not fetched again."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from bot.options import add_config_options, settings_from
from core.errors import ModelUnavailable

logger = logging.getLogger(__name__)


def add_parser(commands: Any) -> None:
    text = "download the models of the profile now, instead of on their first use"
    prefetch = commands.add_parser("prefetch", help=text, description=text)
    add_config_options(prefetch)


def run_prefetch(args: argparse.Namespace) -> int:
    """0 when every model is here; 1 (with each reason) when one could not be fetched."""
    from bot.wiring import TASK_NAMES, build_tasks

    logging.getLogger("core.tasks._runtime").setLevel(logging.INFO)
    settings = settings_from(args)
    names = [n for n in TASK_NAMES if n != "mood" or settings.profile.mood.enabled]
    failed = 0
    for name, task in build_tasks(settings, names).items():
        fetch = getattr(task, "fetch", None)
        if fetch is None:
            continue
        started = time.monotonic()
        try:
            fetch()
        except ModelUnavailable as error:
            print(f"{name}: {error.cause}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: ready ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 1 if failed else 0
