"""``python -m bot ask|write|reimagine|imagine``: one image or prompt, answered in the terminal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from bot.wiring import build_tasks
from core.engine import Engine, Outcome, Partial, Warming
from core.errors import CaptionbotError, EngineDead, InvalidRequest
from core.settings import Settings
from core.types import (
    Answer,
    AskRequest,
    GeneratedImage,
    PostContext,
    ReimagineRequest,
    SocialCaption,
    StepProgress,
    WriteRequest,
)

# What each command needs from the engine.
NEEDS = {
    "ask": ["vqa"],
    "write": ["caption", "ocr", "tags", "write"],
    "reimagine": ["reimagine"],
    "imagine": ["reimagine"],
}


def add_parsers(commands: Any, add_config_options: Any) -> None:
    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", type=Path)
    ask.add_argument("question")
    ask.add_argument("--format", choices=("txt", "jsonl"), default="txt")

    write = commands.add_parser(
        "write", help="write a ready-to-post social caption for an image (streams as it writes)"
    )
    write.add_argument("image", type=Path)
    write.add_argument("--author", default="", help="who posted it (username)")
    write.add_argument("--date", default="", help="when it was posted")
    write.add_argument("--platform", default="", help="where it will be posted, e.g. Instagram")
    write.add_argument("--chat", default="", help="chat, community or company name")
    write.add_argument("--style", default="", help='tone for this caption, e.g. "witty"')
    write.add_argument("--format", choices=("txt", "jsonl"), default="txt")

    for name, text in (
        ("reimagine", "make a new image from an image and edited text (img2img)"),
        ("imagine", "make an image from text alone (txt2img)"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        if name == "reimagine":
            command.add_argument("image", type=Path)
        command.add_argument("text")
        command.add_argument("--out", type=Path, required=True, help="where to write the PNG")
        command.add_argument("--steps", type=int)
        command.add_argument("--guidance", type=float)
        command.add_argument("--seed", type=int)
        if name == "reimagine":
            command.add_argument(
                "--strength", type=float, help="0 keeps the original, 1 ignores it"
            )

    for command in ("ask", "write", "reimagine", "imagine"):
        add_config_options(commands.choices[command])


def _check_out(path: Path) -> None:
    """Refuse an output path that cannot be written before minutes of generation, not after."""
    if path.is_dir():
        raise InvalidRequest(f"--out {path} is a folder; give a file name such as new.png.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise InvalidRequest(f"--out {path}: cannot write in {path.parent}.")


async def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run one single-image command; 0 on success, 1 with a one-line reason otherwise."""
    names = list(NEEDS[args.command])
    if "reimagine" in names:
        from diffusers.utils import logging as diffusers_logging

        # Its checkpoint-loading bar would garble the "step i of n" line on stderr.
        diffusers_logging.disable_progress_bar()
    if args.command == "write" and settings.profile.mood.enabled:
        names.append("mood")
    tasks = build_tasks(settings, names)
    try:
        if getattr(args, "out", None) is not None:
            _check_out(args.out)
        image = _read(args.image) if hasattr(args, "image") else None
        async with Engine(tasks, settings.engine) as engine:
            if args.command == "ask":
                return await _ask(engine, args, image)
            if args.command == "write":
                return await _write(engine, args, image, mood=settings.profile.mood.enabled)
            return await _reimagine(engine, args, image)
    except EngineDead:
        raise
    except CaptionbotError as exc:
        print(f"{getattr(args, 'image', None) or args.command}: {exc}", file=sys.stderr)
        return 1


def _read(path: Path) -> bytes:
    from bot.cli import read_image_file

    try:
        return read_image_file(path)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path} ({exc.strerror or exc}).") from None


async def _ask(engine: Engine, args: argparse.Namespace, image: bytes | None) -> int:
    assert image is not None
    answer: Answer = (
        await engine.run("vqa", AskRequest(image, args.question, args.image.name))
    ).value
    if args.format == "jsonl":
        record = {"file": args.image.name, "question": args.question, "answer": answer.text}
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(answer.text)
    return 0


async def _write(
    engine: Engine, args: argparse.Namespace, image: bytes | None, *, mood: bool
) -> int:
    from bot.cli import describe_fields

    assert image is not None
    fields = await describe_fields(engine, image, args.image.name, mood=mood)
    context = PostContext(
        caption=fields["caption"],
        ocr_text=fields["ocr_text"],
        hashtags=tuple(fields["hashtags"]),
        author=args.author,
        date=args.date,
        platform=args.platform,
        chat=args.chat,
    )
    shown = ""
    final: Outcome | None = None
    events = engine.stream("write", WriteRequest(context, args.style))
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Warming):
                print("(the writer is warming up…)", file=sys.stderr, flush=True)
            elif isinstance(event, Partial):
                # The draft streams to stderr as it grows; the cleaned caption goes to stdout.
                text = str(event.value)
                delta = text[len(shown) :] if text.startswith(shown) else "\n" + text
                print(delta, end="", file=sys.stderr, flush=True)
                shown = text
            else:
                final = event
    print(file=sys.stderr)
    assert final is not None
    caption: SocialCaption = final.value
    if args.format == "jsonl":
        record = {"file": args.image.name, **fields, "social": caption.text}
        record["truncated"] = caption.truncated
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(caption.text)
    return 0


async def _reimagine(engine: Engine, args: argparse.Namespace, image: bytes | None) -> int:
    request = ReimagineRequest(
        text=args.text,
        image=image,
        name=args.image.name if image is not None else "prompt",
        strength=getattr(args, "strength", None),
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
    )
    final: Outcome | None = None
    async with contextlib.aclosing(engine.stream("reimagine", request)) as events:
        async for event in events:
            if isinstance(event, Warming):
                print("(the image model is warming up…)", file=sys.stderr, flush=True)
            elif isinstance(event, Partial) and isinstance(event.value, StepProgress):
                step = event.value
                print(f"\rstep {step.step} of {step.total}", end="", file=sys.stderr, flush=True)
            elif isinstance(event, Outcome):
                final = event
    print(file=sys.stderr)
    assert final is not None
    result: GeneratedImage = final.value
    args.out.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(args.out.write_bytes, result.png)
    size = f"{result.width}x{result.height}"
    print(f"wrote {args.out} ({size}, {result.steps} steps, seed {result.seed})")
    return 0
