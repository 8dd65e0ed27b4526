"""Options every command shares: which config file and which model profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bot.config import load_settings
from core.settings import Settings


def add_config_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--profile", help="model profile: gpu, cpu or tiny (default: from the config)"
    )
    command.add_argument(
        "--config", type=Path, help="config file (default: ./config.toml if present)"
    )


def settings_from(args: argparse.Namespace) -> Settings:
    path = args.config
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    settings = load_settings(path, args.profile)
    # doctor and export-ratings produce no model output, so the warning would only confuse.
    quiet = ("bench", "run", "doctor", "export-ratings")
    if settings.profile.name == "tiny" and args.command not in quiet:
        print(
            "profile 'tiny': small random-weight models, so the text and images are "
            "nonsense by design; use --profile cpu or gpu for real output",
            file=sys.stderr,
        )
    return settings
