"""``python -m bot ask|write|reimagine|imagine``: one image or prompt, answered in the
terminal through the service, as the chat adapters are."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from bot.files import is_link, read_image_file
from bot.options import add_config_options, settings_from
from core.errors import CaptionbotError, EngineDead, InvalidRequest
from core.ports import ChatRef, UserRef
from core.service import Service
from core.types import (
    Answer,
    GeneratedImage,
    ImageInput,
    Link,
    Origin,
    SocialCaption,
    SocialDraft,
    StepProgress,
    Upload,
    WarmingUp,
)

# What each command needs from the engine.
NEEDS = {
    "ask": ["vqa"],
    "write": ["caption", "ocr", "tags", "write"],
    "reimagine": ["reimagine"],
    "imagine": ["reimagine"],
}


def add_parsers(commands: Any) -> None:
    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", help="an image file or an http(s) link")
    ask.add_argument("question")
    ask.add_argument("--format", choices=("txt", "jsonl"), default="txt")

    write = commands.add_parser(
        "write", help="write a ready-to-post social caption for an image (streams as it writes)"
    )
    write.add_argument("image", help="an image file or an http(s) link")
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
            command.add_argument("image", help="an image file or an http(s) link")
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


async def run_command(args: argparse.Namespace) -> int:
    """Run one single-image command; 0 on success, 1 with a one-line reason otherwise."""
    from bot.wiring import local_service

    settings = settings_from(args)
    names = list(NEEDS[args.command])
    if "reimagine" in names:
        from diffusers.utils import logging as diffusers_logging

        # Its checkpoint-loading bar would garble the "step i of n" line on stderr.
        diffusers_logging.disable_progress_bar()
    if args.command == "write" and settings.profile.mood.enabled:
        names.append("mood")
    where = getattr(args, "image", None) or args.command
    try:
        if getattr(args, "out", None) is not None:
            _check_out(args.out)
        image = _image(args.image) if hasattr(args, "image") else None
        origin = Origin(
            UserRef("cli", "local"),
            ChatRef("cli", "local"),
            author=getattr(args, "author", ""),
            chat_title=getattr(args, "chat", ""),
        )
        async with local_service(settings, names) as service:
            if args.command == "ask":
                answer: Answer = await service.ask(origin, args.question, image)
                _print_answer(args, answer)
                return 0
            if args.command == "write":
                return await _write(service, origin, args, image)
            return await _reimagine(service, origin, args, image)
    except EngineDead:
        raise
    except CaptionbotError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 1


def _check_out(path: Path) -> None:
    """Refuse an output path that cannot be written before minutes of generation, not after."""
    if path.is_dir():
        raise InvalidRequest(f"--out {path} is a folder; give a file name such as new.png.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise InvalidRequest(f"--out {path}: cannot write in {path.parent}.")


def _image(given: str) -> ImageInput:
    if is_link(given):
        return Link(given)
    path = Path(given)
    try:
        return Upload(read_image_file(path), path.name)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path} ({exc.strerror or exc}).") from None


def _print_answer(args: argparse.Namespace, answer: Answer) -> None:
    if args.format == "jsonl":
        record = {"file": args.image, "question": args.question, "answer": answer.text}
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(answer.text)


async def _write(
    service: Service, origin: Origin, args: argparse.Namespace, image: ImageInput
) -> int:
    shown = ""
    final: SocialCaption | None = None
    reply = service.write(origin, image, args.style, platform=args.platform, date=args.date)
    async with reply:
        async for part in reply:
            if isinstance(part, WarmingUp):
                print(f"(the {part.task} model is warming up…)", file=sys.stderr, flush=True)
            elif isinstance(part, SocialDraft):
                # The draft streams to stderr as it grows; the cleaned caption goes to stdout.
                delta = part.text[len(shown) :] if part.text.startswith(shown) else "\n" + part.text
                print(delta, end="", file=sys.stderr, flush=True)
                shown = part.text
            elif isinstance(part, SocialCaption):
                final = part
    print(file=sys.stderr)
    assert final is not None
    if args.format == "jsonl":
        fields = reply.shown
        record = {
            "file": args.image,
            "caption": fields["caption"],
            "ocr_text": fields["ocr"],
            "hashtags": fields["tags"],
            "social": final.text,
            "truncated": final.truncated,
        }
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(final.text)
    return 0


async def _reimagine(
    service: Service, origin: Origin, args: argparse.Namespace, image: ImageInput
) -> int:
    made: GeneratedImage | None = None
    reply = service.reimagine(
        origin,
        args.text,
        image,
        use_context_image=False,
        strength=getattr(args, "strength", None),
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
    )
    async with reply:
        async for part in reply:
            if isinstance(part, WarmingUp):
                print("(the image model is warming up…)", file=sys.stderr, flush=True)
            elif isinstance(part, StepProgress):
                print(f"\rstep {part.step} of {part.total}", end="", file=sys.stderr, flush=True)
            elif isinstance(part, GeneratedImage):
                made = part
    print(file=sys.stderr)
    assert made is not None
    await asyncio.to_thread(args.out.write_bytes, made.png)
    size = f"{made.width}x{made.height}"
    print(f"wrote {args.out} ({size}, {made.steps} steps, seed {made.seed})")
    return 0
