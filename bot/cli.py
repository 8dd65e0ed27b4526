"""``python -m bot caption|ocr|tags PATH ...`` and ``python -m bot bench ...``."""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from bot.config import load_settings
from core.engine import Engine
from core.errors import CaptionbotError, ConfigError, EngineDead, InvalidRequest
from core.images import MAX_BYTES
from core.types import (
    Caption,
    CaptionRequest,
    MoodRequest,
    OcrRequest,
    OcrResult,
    Tags,
    TagsRequest,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
)
# Enough requests in flight for full batches, few enough that reading files stays ahead.
# Images in flight at once: enough for full batches, never more than the engine admits
# (each image may need several requests at once: caption, OCR and mood side by side).
MAX_CONCURRENCY = 32
PROGRESS_THRESHOLD = 3


@dataclass(frozen=True, slots=True)
class Job:
    path: Path
    name: str


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    fields: dict[str, Any]
    error: str | None = None


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
        if args.command in ("caption", "ocr", "tags"):
            return asyncio.run(_run_files(args))
        from bot.commands import run_command

        return asyncio.run(run_command(args, settings_from(args)))
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
    helps = {
        "caption": "describe each image in one sentence",
        "ocr": "read the text in each image",
        "tags": "suggest hashtags from each image's caption and text",
    }
    for name, text in helps.items():
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "paths", nargs="+", type=Path, help="image files or folders (searched recursively)"
        )
        command.add_argument("--format", choices=("txt", "jsonl", "csv"), default="txt")
        command.add_argument("--out", type=Path, help="write here instead of standard output")
        command.add_argument(
            "--resume",
            action="store_true",
            help="with --out: skip images already in the file and append",
        )
        _add_config_options(command)
        if name == "caption":
            command.add_argument(
                "--prefix", default="", help='caption continues this text, e.g. "a photography of"'
            )
    from bot.commands import add_parsers

    add_parsers(commands, _add_config_options)
    serve = commands.add_parser(
        "run", help="run the bot: the web playground and every configured adapter"
    )
    serve.add_argument(
        "--listen", help="HOST:PORT for the web page, instead of [web] in the config"
    )
    _add_config_options(serve)
    bench = commands.add_parser("bench", help="measure throughput on this machine")
    bench.add_argument("which", choices=("caption", "vqa", "reimagine", "overhead", "memory"))
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--images", type=int, default=16, help="images per measured run")
    bench.add_argument("--tokens", type=int, default=20, help="tokens generated per image")
    bench.add_argument("--steps", type=int, default=4, help="denoising steps (reimagine)")
    bench.add_argument("--size", type=int, default=512, help="image side in pixels (reimagine)")
    bench.add_argument("--items", type=int, default=20000, help="no-op items (overhead)")
    bench.add_argument(
        "--model",
        default="random/blip-base",
        help="model to measure (default: the real-size random architecture for the task)",
    )
    _add_config_options(bench)
    return parser


def _add_config_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--profile", help="model profile: gpu, cpu or tiny (default: from the config)"
    )
    command.add_argument(
        "--config", type=Path, help="config file (default: ./config.toml if present)"
    )


def settings_from(args: argparse.Namespace) -> Any:
    path = args.config
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    settings = load_settings(path, args.profile)
    if settings.profile.name == "tiny" and args.command not in ("bench", "run"):
        print(
            "profile 'tiny': small random-weight models, so the text and images are "
            "nonsense by design; use --profile cpu or gpu for real output",
            file=sys.stderr,
        )
    return settings


# -- files ----------------------------------------------------------------------------


def collect_images(paths: Sequence[Path]) -> tuple[list[Job], list[Row]]:
    """Expand folders recursively; a path that does not exist is a reported row, not a crash."""
    jobs: list[Job] = []
    missing: list[Row] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            jobs.extend(Job(p, p.relative_to(path).as_posix()) for p in found)
        elif path.is_file():
            jobs.append(Job(path, path.name))
        else:
            missing.append(Row(str(path), {}, "no such file or folder"))
    return jobs, missing


async def _run_files(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    jobs, failures = collect_images(args.paths)
    for row in failures:
        print(f"{row.name}: {row.error}", file=sys.stderr)
    done_names = _already_done(args)
    jobs = [job for job in jobs if job.name not in done_names]
    if not jobs:
        print(
            "no images to process" + (" (all already in --out)" if done_names else ""),
            file=sys.stderr,
        )
        return 0 if done_names else 1

    from bot.wiring import build_tasks

    needs = {"caption": ["caption"], "ocr": ["ocr"], "tags": ["caption", "ocr", "tags"]}[
        args.command
    ]
    args.with_mood = args.command == "tags" and settings.profile.mood.enabled
    if args.with_mood:
        needs.append("mood")
    tasks = build_tasks(settings, needs)
    args.concurrency = max(1, min(MAX_CONCURRENCY, settings.engine.max_in_flight // len(needs)))
    out, close = _open_out(args, appending=bool(done_names))
    writer = _writer(args.format, args.command, out, header=not done_names)
    progress = Progress(len(jobs), enabled=len(jobs) > PROGRESS_THRESHOLD)
    succeeded = 0
    try:
        async with Engine(tasks, settings.engine) as engine:
            rows = _ordered(engine, args, jobs)
            async for row in rows:
                writer.write(row)
                out.flush()
                if row.error is None:
                    succeeded += 1
                else:
                    print(f"{row.name}: {row.error}", file=sys.stderr)
                progress.advance(row.error is not None)
    finally:
        progress.close()
        if close:
            out.close()
    return 0 if succeeded else 1


async def _ordered(engine: Engine, args: argparse.Namespace, jobs: list[Job]) -> Any:
    """Yield rows in input order while several images are processed at once."""
    limit = asyncio.Semaphore(args.concurrency)

    async def bounded(job: Job) -> Row:
        async with limit:
            return await _process(engine, args, job)

    pending = [asyncio.ensure_future(bounded(job)) for job in jobs]
    try:
        for future in pending:
            yield await future
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _process(engine: Engine, args: argparse.Namespace, job: Job) -> Row:
    try:
        data = await asyncio.to_thread(read_image_file, job.path)
    except OSError as exc:
        return Row(job.name, {}, f"cannot read file ({exc.strerror or exc})")
    except InvalidRequest as exc:
        return Row(job.name, {}, str(exc))
    try:
        if args.command == "caption":
            caption: Caption = (
                await engine.run("caption", CaptionRequest(data, job.name, args.prefix))
            ).value
            return Row(job.name, {"caption": caption.text, "degenerate": caption.degenerate})
        if args.command == "ocr":
            ocr: OcrResult = (await engine.run("ocr", OcrRequest(data, job.name))).value
            return Row(job.name, _ocr_fields(ocr))
        return Row(job.name, await describe_fields(engine, data, job.name, mood=args.with_mood))
    except EngineDead:
        raise
    except CaptionbotError as exc:
        return Row(job.name, {}, str(exc))


async def describe_fields(engine: Engine, data: bytes, name: str, *, mood: bool) -> dict[str, Any]:
    """Caption and OCR side by side, then hashtags from both (and mood labels if enabled)."""
    parts = [
        engine.run("caption", CaptionRequest(data, name)),
        engine.run("ocr", OcrRequest(data, name)),
    ]
    if mood:
        parts.append(engine.run("mood", MoodRequest(data, name)))
    outcomes = await asyncio.gather(*parts)
    caption: Caption = outcomes[0].value
    ocr: OcrResult = outcomes[1].value
    tags: Tags = (await engine.run("tags", TagsRequest(caption.text, ocr.text))).value
    labels: tuple[str, ...] = outcomes[2].value.hashtags if mood else ()
    hashtags = list(dict.fromkeys([*tags.hashtags, *labels]))
    return {"caption": caption.text, "ocr_text": ocr.text, "hashtags": hashtags}


def read_image_file(path: Path) -> bytes:
    """The file's bytes, refusing one over the size limit before reading it."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise InvalidRequest(f"{path.name} is larger than {MAX_BYTES // 2**20} MB.")
    return path.read_bytes()


def _ocr_fields(ocr: OcrResult) -> dict[str, Any]:
    return {
        "text": ocr.text,
        "has_text": ocr.has_text,
        "lines": [
            {
                "text": line.text,
                "box": [list(p) for p in line.box],
                "confidence": round(line.confidence, 4),
            }
            for line in ocr.lines
        ],
    }


def _already_done(args: argparse.Namespace) -> set[str]:
    """Names already processed in ``--out``; failed rows and a torn last line are redone."""
    if not args.resume or args.out is None or not args.out.is_file():
        return set()
    try:
        text = args.out.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--resume cannot read {args.out}: {exc}") from None
    if args.format == "txt":
        return {line.split(": ", 1)[0] for line in text.splitlines() if ": " in line}
    if args.format == "jsonl":
        done = set()
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short when the last run was killed
            if isinstance(record, dict) and "file" in record and "error" not in record:
                done.add(record["file"])
        return done
    return {row["file"] for row in csv.DictReader(io.StringIO(text)) if not row.get("error")}


def _open_out(args: argparse.Namespace, *, appending: bool) -> tuple[IO[str], bool]:
    if args.out is None:
        return sys.stdout, False
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if appending:
        _drop_torn_line(args.out)
    return args.out.open("a" if appending else "w", encoding="utf-8", newline=""), True


def _drop_torn_line(path: Path) -> None:
    """Cut a last line left unfinished by a killed run, so appended rows start clean."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


# -- output formats ---------------------------------------------------------------------


class TextWriter:
    """``name: value`` lines, like the seed tool's captions.txt; errors go to stderr only."""

    def __init__(self, command: str, out: IO[str]) -> None:
        self._command = command
        self._out = out

    def write(self, row: Row) -> None:
        if row.error is not None:
            return
        if self._command == "caption":
            value = row.fields["caption"]
        elif self._command == "ocr":
            value = " | ".join(line["text"] for line in row.fields["lines"]) or "(no text)"
        else:
            value = " ".join(row.fields["hashtags"])
        self._out.write(f"{row.name}: {value}\n")


class JsonLinesWriter:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def write(self, row: Row) -> None:
        record = {"file": row.name, **row.fields}
        if row.error is not None:
            record["error"] = row.error
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")


class CsvWriter:
    COLUMNS: ClassVar[dict[str, list[str]]] = {
        "caption": ["file", "caption", "degenerate", "error"],
        "ocr": ["file", "text", "has_text", "error"],
        "tags": ["file", "caption", "ocr_text", "hashtags", "error"],
    }

    def __init__(self, command: str, out: IO[str], *, header: bool) -> None:
        self._command = command
        self._csv = csv.DictWriter(out, fieldnames=self.COLUMNS[command], extrasaction="ignore")
        if header:
            self._csv.writeheader()

    def write(self, row: Row) -> None:
        values = {"file": row.name, "error": row.error or "", **row.fields}
        if "hashtags" in values:
            values["hashtags"] = " ".join(values["hashtags"])
        self._csv.writerow(values)


def _writer(
    fmt: str, command: str, out: IO[str], *, header: bool
) -> TextWriter | JsonLinesWriter | CsvWriter:
    if fmt == "jsonl":
        return JsonLinesWriter(out)
    if fmt == "csv":
        return CsvWriter(command, out, header=header)
    return TextWriter(command, out)


class Progress:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    WIDTH = 30

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._total = total
        self._enabled = enabled
        self._done = 0
        self._failed = 0
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last_decile = -1

    def advance(self, failed: bool) -> None:
        self._done += 1
        self._failed += failed
        if not self._enabled:
            return
        decile = self._done * 10 // self._total
        if not self._tty and decile == self._last_decile:
            return
        self._last_decile = decile
        rate = self._done / max(1e-6, time.monotonic() - self._started)
        filled = self.WIDTH * self._done // self._total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        line = f"[{bar}] {self._done}/{self._total} images, {self._failed} failed, {rate:.1f}/s"
        sys.stderr.write(f"\r{line}" if self._tty else f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._enabled and self._tty:
            sys.stderr.write("\n")
