"""``python -m bot``: the command line. Parses the arguments and hands each command to its
module: ``bot.files`` (caption, ocr, tags), ``bot.commands`` (ask, write, reimagine,
imagine), ``bot.bench``, ``bot.run``, and the operators' tools ``bot.doctor``,
``bot.evaluate`` and ``bot.export_ratings``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from bot import commands as single
from bot import files, prefetch
from bot.doctor import add_doctor_arguments
from bot.evaluate import add_eval_arguments
from bot.export_ratings import add_export_arguments
from bot.options import add_config_options, settings_from
from core.errors import ConfigError, EngineDead


def main(argv: Sequence[str] | None = None) -> int:
    # Download and weight-loading progress bars would interleave with ours on stderr.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # diffusers warns at every load about casting modules it then lists as none.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = _parser().parse_args(argv)
    if args.command == "run":
        from bot.run import configure_logging, run

        configure_logging(args.verbose)
        try:
            settings = settings_from(args)
            if args.listen:
                host, _, port = args.listen.rpartition(":")
                if not host or not port.isdigit():
                    raise ConfigError(
                        f"--listen wants HOST:PORT, e.g. 0.0.0.0:8080; got {args.listen}"
                    )
                web = dataclasses.replace(settings.web, host=host, port=int(port))
                settings = dataclasses.replace(settings, web=web)
            return asyncio.run(run(settings))
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Pillow warns about malformed files from the decoding threads; route that to the log.
    logging.captureWarnings(True)
    for noisy in ("httpx", "easyocr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import about optional CPU kernels, and on every CPU forward.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        if args.command == "bench":
            from bot.bench import run_bench

            return run_bench(args)
        if args.command == "prefetch":
            return prefetch.run_prefetch(args)
        if args.command == "doctor":
            from bot.doctor import run_doctor

            return run_doctor(args)
        if args.command == "eval":
            from bot.evaluate import run_eval

            return run_eval(args)
        if args.command == "export-ratings":
            from bot.export_ratings import run_export_ratings

            return run_export_ratings(args)
        if args.command in ("caption", "ocr", "tags"):
            from bot.files import run_files

            return asyncio.run(run_files(args))
        from bot.commands import run_command

        return asyncio.run(run_command(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except EngineDead as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # The hung device thread cannot be stopped, and interpreter shutdown would wait on
        # it inside native code: leave at once with the documented status.
        os._exit(3)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", required=True)

    files.add_parsers(commands)
    single.add_parsers(commands)
    prefetch.add_parser(commands)
    add_doctor_arguments(
        commands.add_parser("doctor", help="check this machine and its set-up before it serves")
    )
    add_eval_arguments(
        commands.add_parser(
            "eval", help="caption a folder and score the captions against COCO references"
        )
    )
    add_export_arguments(
        commands.add_parser(
            "export-ratings",
            help="the social captions people rated 👍, as JSONL to fine-tune the writer",
        )
    )
    serve = commands.add_parser(
        "run", help="run the bot: the web playground and every configured adapter"
    )
    serve.add_argument(
        "--listen", help="HOST:PORT for the web page, instead of [web] in the config"
    )
    add_config_options(serve)
    bench = commands.add_parser("bench", help="measure throughput on this machine")
    bench.add_argument(
        "which",
        choices=(
            "caption",
            "vqa",
            "reimagine",
            "overhead",
            "memory",
            "describe",
            "telegram",
            "discord",
        ),
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--images", type=int, default=16, help="images per measured run")
    bench.add_argument("--tokens", type=int, default=20, help="tokens generated per image")
    bench.add_argument("--steps", type=int, default=4, help="denoising steps (reimagine)")
    bench.add_argument("--size", type=int, default=512, help="image side in pixels (reimagine)")
    bench.add_argument("--items", type=int, default=20000, help="no-op items (overhead)")
    bench.add_argument(
        "--users",
        type=int,
        default=50,
        help="people posting a photo at once (describe, telegram, discord)",
    )
    bench.add_argument(
        "--channels", type=int, default=5, help="channels the members post in (discord)"
    )
    bench.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="caption: measure on a local Ray Serve too, with --replicas (default: local)",
    )
    bench.add_argument(
        "--replicas", default="1,2", help="replica counts side by side (caption --backend ray)"
    )
    bench.add_argument(
        "--model",
        default="random/blip-base",
        help="model to measure (default: the real-size random architecture for the task)",
    )
    add_config_options(bench)
    return parser
