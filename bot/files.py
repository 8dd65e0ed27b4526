"""``python -m bot caption|ocr|tags PATH ...``: images from files, folders and links, in
batches through the service, written as text lines, JSON lines or CSV."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from bot.options import add_config_options, settings_from
from core.errors import CaptionbotError, ConfigError, EngineDead, InvalidRequest
from core.images import MAX_BYTES
from core.ports import ChatRef, UserRef
from core.service import Service
from core.types import Caption, ImageInput, Link, OcrResult, Origin, Upload

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
)
# Images in flight at once: enough for full batches, never more than the engine admits
# (each image may need several requests at once: caption, OCR and mood side by side).
MAX_CONCURRENCY = 32
PROGRESS_THRESHOLD = 3
HELPS = {
    "caption": "describe each image in one sentence",
    "ocr": "read the text in each image",
    "tags": "suggest hashtags from each image's caption and text",
}
# What each command needs from the engine.
NEEDS = {"caption": ["caption"], "ocr": ["ocr"], "tags": ["caption", "ocr", "tags"]}


@dataclass(frozen=True, slots=True)
class Job:
    # A file, or an http(s) link.
    source: Path | str
    name: str


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    fields: dict[str, Any]
    error: str | None = None


def add_parsers(commands: Any) -> None:
    for name, text in HELPS.items():
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "paths",
            nargs="+",
            help="image files, folders (searched recursively) or http(s) links",
        )
        command.add_argument("--format", choices=("txt", "jsonl", "csv"), default="txt")
        command.add_argument("--out", type=Path, help="write here instead of standard output")
        command.add_argument(
            "--resume",
            action="store_true",
            help="with --out: skip images already in the file and append",
        )
        add_config_options(command)
        if name == "caption":
            command.add_argument(
                "--prefix", default="", help='caption continues this text, e.g. "a photography of"'
            )


def is_link(path: str) -> bool:
    return path.lower().startswith(("http://", "https://"))


def collect_images(paths: Sequence[str]) -> tuple[list[Job], list[Row]]:
    """Expand folders recursively; a path that does not exist is a reported row, not a crash."""
    jobs: list[Job] = []
    missing: list[Row] = []
    for given in paths:
        if is_link(given):
            jobs.append(Job(given, given))
            continue
        path = Path(given)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            jobs.extend(Job(p, p.relative_to(path).as_posix()) for p in found)
        elif path.is_file():
            jobs.append(Job(path, path.name))
        else:
            missing.append(Row(given, {}, "no such file or folder"))
    return jobs, missing


async def run_files(args: argparse.Namespace) -> int:
    from bot.wiring import local_service

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
    needs = list(NEEDS[args.command])
    if args.command == "tags" and settings.profile.mood.enabled:
        needs.append("mood")
    concurrency = max(1, min(MAX_CONCURRENCY, settings.engine.max_in_flight // len(needs)))
    out, close = _open_out(args, appending=bool(done_names))
    writer = _writer(args.format, args.command, out, header=not done_names)
    progress = Progress(len(jobs), enabled=len(jobs) > PROGRESS_THRESHOLD)
    succeeded = 0
    try:
        async with local_service(settings, needs) as service:
            async for row in _ordered(service, args, jobs, concurrency):
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


async def _ordered(
    service: Service, args: argparse.Namespace, jobs: list[Job], concurrency: int
) -> AsyncIterator[Row]:
    """Yield rows in input order while several images are processed at once."""
    limit = asyncio.Semaphore(concurrency)

    async def bounded(index: int, job: Job) -> Row:
        async with limit:
            return await _process(service, args, index, job)

    pending = [asyncio.ensure_future(bounded(i, job)) for i, job in enumerate(jobs)]
    try:
        for future in pending:
            yield await future
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _process(service: Service, args: argparse.Namespace, index: int, job: Job) -> Row:
    # Each file is its own "user" so that forgetting it afterwards keeps memory bounded by
    # the images in flight, however many a folder holds.
    origin = Origin(UserRef("cli", f"file-{index}"), ChatRef("cli", f"file-{index}"))
    try:
        image: ImageInput
        if isinstance(job.source, Path):
            data = await asyncio.to_thread(read_image_file, job.source)
            image = Upload(data, job.name)
        else:
            image = Link(job.source)
        if args.command == "caption":
            caption: Caption = await service.caption(origin, image, args.prefix)
            return Row(job.name, {"caption": caption.text, "degenerate": caption.degenerate})
        if args.command == "ocr":
            ocr: OcrResult = await service.ocr(origin, image)
            return Row(job.name, ocr_fields(ocr))
        async with service.tags(origin, image) as reply:
            async for _ in reply:
                pass
        shown = reply.shown
        fields = {"caption": shown["caption"], "ocr_text": shown["ocr"], "hashtags": shown["tags"]}
        return Row(job.name, fields)
    except OSError as exc:
        return Row(job.name, {}, f"cannot read file ({exc.strerror or exc})")
    except EngineDead:
        raise
    except CaptionbotError as exc:
        return Row(job.name, {}, str(exc))
    finally:
        await service.forget(origin)


def read_image_file(path: Path) -> bytes:
    """The file's bytes, refusing one over the size limit before reading it."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise InvalidRequest(f"{path.name} is larger than {MAX_BYTES // 2**20} MB.")
    return path.read_bytes()


def ocr_fields(ocr: OcrResult) -> dict[str, Any]:
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
