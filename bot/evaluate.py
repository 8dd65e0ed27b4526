"""``python -m bot eval FOLDER``: caption a folder of images with one or more caption
models and score the captions against reference captions in COCO's format.

    python -m bot eval tests/fixtures/eval
    python -m bot eval val2017/ --references captions_val2017.json --profile cpu
    python -m bot eval photos/ --model Salesforce/blip-image-captioning-base \\
        --model Salesforce/blip-image-captioning-large --json

- **References**: ``--references FILE``, by default ``captions.json`` in FOLDER, as COCO
  writes them: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`` (other keys, such as "info", "licenses" or an annotation's "id", are
  ignored). ``file_name`` is the image's path relative to FOLDER. The images found both in
  FOLDER and in the references are scored; stderr says how many were left out on each side.
- **Models**: each ``--model`` (a hub id, a folder or a ``tiny/`` name) captions every
  image with the profile's other caption settings, through the same service and engine as
  ``python -m bot caption``; without ``--model``, the profile's caption model. Models run
  one after the other, so only one is in memory at a time.
- **Scores**: BLEU-1..4, ROUGE-L and CIDEr (CIDEr-D) by pycocoevalcap's own scorers, the
  ones behind the COCO caption leaderboard, on text tokenized as its PTBTokenizer does
  (``ptb_tokenize``). An image a model could not caption counts as an empty caption, so
  every model is scored on the same images. As in coco-caption, CIDEr weighs n-grams by
  how rare they are among the references of the images scored: compare models on one
  set of images, not figures from different sets.
- **CLIPScore** (Hessel et al., 2021), which needs no references: the mean over the
  images of 2.5 * max(cos(image, "A photo depicts " + caption), 0), the paper's prompt,
  with the profile's mood model (CLIP). A random-weight CLIP (the ``tiny`` profile's)
  would give numbers that mean nothing, so then it is not computed and the output says why;
  the same when the CLIP cannot be loaded.
- **Output**: progress on stderr and a table on stdout; with ``--json``, one JSON object
  with every score and each model's captions instead. Exit status 0; 1 when a caption
  model cannot be loaded; 2 for bad input (not a folder, no images, references that
  cannot be read or are not in COCO's format, no image in both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from bot.files import (
    IMAGE_SUFFIXES,
    MAX_CONCURRENCY,
    Job,
    Progress,
    collect_images,
    read_image_file,
)
from bot.options import add_config_options, settings_from
from core.errors import CaptionbotError, ConfigError, EngineDead, ModelUnavailable, TaskUnavailable
from core.ports import ChatRef, UserRef
from core.settings import EngineSettings, Settings
from core.types import Origin, Upload

if TYPE_CHECKING:
    import torch

    from core.service import Service

DEFAULT_REFERENCES = "captions.json"
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")
CLIPSCORE = "CLIPScore"
# Hessel et al.'s weight and prompt, so figures compare with the paper's CLIP-S.
CLIPSCORE_WEIGHT = 2.5
CLIPSCORE_PROMPT = "A photo depicts "
CLIP_BATCH = 16
# Models built locally with random weights (core.tiny): no meaningful CLIP embedding.
RANDOM_WEIGHTS = ("tiny/", "random/")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ModelCaptions:
    model: str
    # Image name -> caption, in the order the images are scored; "" where it failed.
    captions: Mapping[str, str]
    # Image name -> why the model gave no caption for it.
    failures: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Scores:
    bleu: tuple[float, float, float, float]
    rouge_l: float
    cider: float

    def named(self) -> dict[str, float]:
        return dict(zip(METRICS, (*self.bleu, self.rouge_l, self.cider), strict=True))


@dataclass(frozen=True, slots=True)
class ModelReport:
    run: ModelCaptions
    scores: Scores
    # None when CLIPScore was not computed (see ``Evaluation.clipscore_note``).
    clipscore: float | None


@dataclass(frozen=True, slots=True)
class Evaluation:
    folder: Path
    references: Path
    profile: str
    images: tuple[str, ...]
    reports: tuple[ModelReport, ...]
    clipscore_note: str | None


def add_eval_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    command.add_argument(
        "--references",
        type=Path,
        help=f"reference captions in COCO's format (default: FOLDER/{DEFAULT_REFERENCES})",
    )
    command.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="MODEL",
        help="caption model to score (hub id, folder or tiny/ name); repeat it to compare "
        "models side by side (default: the profile's caption model)",
    )
    command.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_options(command)


def run_eval(args: argparse.Namespace) -> int:
    """Caption the folder with each model, score the captions and print them."""
    # 1. Check everything the user gave before any model loads.
    references_path = args.references or args.folder / DEFAULT_REFERENCES
    try:
        settings = settings_from(args)
        found = find_images(args.folder)
        references = load_references(references_path)
        images = matched_images(found, references, args.folder)
        models = args.models or [settings.profile.caption.model]
        for model in models:
            if models.count(model) > 1:
                raise ConfigError(f"--model {model} is given more than once")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # 2. Caption with each model in turn.
    runs: list[ModelCaptions] = []
    for model in models:
        try:
            runs.append(asyncio.run(caption_images(settings, model, images)))
        except ModelUnavailable as exc:
            print(f"error: caption model {model} cannot be loaded: {exc.cause}", file=sys.stderr)
            return 1

    # 3. Score against the references, then without them (CLIPScore).
    all_scores = [score_captions(references, run.captions) for run in runs]
    clipscores: list[float | None] = [None] * len(runs)
    clip_model = settings.profile.mood.model
    note: str | None = None
    if clip_model.startswith(RANDOM_WEIGHTS):
        note = (
            f"CLIPScore not computed: the profile's CLIP ({clip_model}) has random weights, "
            "so its scores would mean nothing; use a profile with a real CLIP (cpu or gpu)"
        )
    else:
        print(f"{clip_model}: CLIPScore of {len(runs)} x {len(images)} captions", file=sys.stderr)
        try:
            clipscores = list(clip_scores(clip_model, settings.engine, images, runs))
        except ModelUnavailable as exc:
            note = f"CLIPScore not computed: {exc.cause}"

    # 4. Report.
    evaluation = Evaluation(
        folder=args.folder,
        references=references_path,
        profile=settings.profile.name,
        images=tuple(job.name for job in images),
        reports=tuple(
            ModelReport(run, scores, clipscore)
            for run, scores, clipscore in zip(runs, all_scores, clipscores, strict=True)
        ),
        clipscore_note=note,
    )
    print(json.dumps(as_json(evaluation), indent=2) if args.json else render_table(evaluation))
    return 0


# -- references and images ----------------------------------------------------------------


def load_references(path: Path) -> dict[str, tuple[str, ...]]:
    """Reference captions by image file name, from a COCO captions file; ``ConfigError``
    naming what is wrong. Images without any caption are left out."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the references {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the references {path} are not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"the references {path} are not valid JSON: {exc.msg} (line {exc.lineno})"
        ) from None
    if not (
        isinstance(document, dict)
        and isinstance(document.get("images"), list)
        and isinstance(document.get("annotations"), list)
    ):
        raise ConfigError(
            f'the references {path} are not in COCO\'s caption format: it needs "images" '
            'and "annotations" lists'
        )
    names: dict[int | str, str] = {}
    seen: set[str] = set()
    for index, image in enumerate(document["images"]):
        image_id = _as_id(image.get("id")) if isinstance(image, dict) else None
        name = image.get("file_name") if isinstance(image, dict) else None
        if image_id is None or not isinstance(name, str) or not name:
            raise ConfigError(f'{path}: images[{index}] needs an "id" and a "file_name"')
        if image_id in names:
            raise ConfigError(f"{path}: images[{index}] repeats the image id {image_id}")
        if name in seen:
            raise ConfigError(f"{path}: images[{index}] repeats the file name {name}")
        names[image_id] = name
        seen.add(name)
    captions: dict[str, list[str]] = {}
    for index, annotation in enumerate(document["annotations"]):
        image_id = _as_id(annotation.get("image_id")) if isinstance(annotation, dict) else None
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if image_id is None or not isinstance(caption, str) or not caption.strip():
            raise ConfigError(
                f'{path}: annotations[{index}] needs an "image_id" and a non-empty "caption"'
            )
        if image_id not in names:
            raise ConfigError(
                f"{path}: annotations[{index}] is about image id {image_id}, which is not "
                'in "images"'
            )
        captions.setdefault(names[image_id], []).append(caption)
    if not captions:
        raise ConfigError(f"the references {path} hold no captions")
    return {name: tuple(texts) for name, texts in captions.items()}


def _as_id(value: object) -> int | str | None:
    """An image id as COCO writes it (a number; text is taken too), else None."""
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def find_images(folder: Path) -> list[Job]:
    """The images in ``folder`` and below, in path order, named by their relative path."""
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    found, _ = collect_images([str(folder)])
    if not found:
        raise ConfigError(
            f"{folder} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return found


def matched_images(
    found: Sequence[Job], references: Mapping[str, Sequence[str]], folder: Path
) -> list[Job]:
    """The images found that have reference captions; stderr says how many were left out."""
    matched = [job for job in found if job.name in references]
    if not matched:
        raise ConfigError(
            f"none of the {len(found)} images in {folder} is named in the references "
            "(their file_name is the path relative to the folder)"
        )
    if unreferenced := len(found) - len(matched):
        print(f"images without reference captions, left out: {unreferenced}", file=sys.stderr)
    if absent := len(references) - len(matched):
        print(f"referenced images not in {folder}, left out: {absent}", file=sys.stderr)
    return matched


# -- captioning ---------------------------------------------------------------------------


async def caption_images(settings: Settings, model: str, images: Sequence[Job]) -> ModelCaptions:
    """Caption every image with ``model`` through the service, as ``caption`` does."""
    from bot.wiring import local_service

    caption = replace(settings.profile.caption, model=model)
    settings = replace(settings, profile=replace(settings.profile, caption=caption))
    print(f"{model}: captioning {len(images)} images", file=sys.stderr)
    limit = asyncio.Semaphore(max(1, min(MAX_CONCURRENCY, settings.engine.max_in_flight)))
    progress = Progress(len(images), enabled=True)
    captions: dict[str, str] = {}
    failures: dict[str, str] = {}

    async def one(service: Service, index: int, job: Job) -> None:
        # One "user" per image, forgotten at once, so memory stays bounded by the images
        # in flight however many the folder holds.
        origin = Origin(UserRef("cli", f"eval-{index}"), ChatRef("cli", f"eval-{index}"))
        async with limit:
            try:
                data = await asyncio.to_thread(read_image_file, Path(job.source))
                captions[job.name] = (await service.caption(origin, Upload(data, job.name))).text
            except (EngineDead, TaskUnavailable):
                raise  # nothing more can be captioned: the run stops
            except OSError as exc:
                failures[job.name] = f"cannot read file ({exc.strerror or exc})"
            except CaptionbotError as exc:
                failures[job.name] = str(exc)
            finally:
                await service.forget(origin)
        if job.name in failures:
            print(f"{model}: {job.name}: {failures[job.name]}", file=sys.stderr)
        progress.advance(job.name in failures)

    try:
        async with local_service(settings, ["caption"]) as service:
            # The first image alone loads the model, so a model that cannot be loaded fails
            # once rather than once for every image in flight.
            await one(service, 0, images[0])
            pending = [
                asyncio.ensure_future(one(service, i, job))
                for i, job in enumerate(images[1:], start=1)
            ]
            try:
                await asyncio.gather(*pending)
            finally:
                for future in pending:
                    future.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        progress.close()
    return ModelCaptions(model, {job.name: captions.get(job.name, "") for job in images}, failures)


# -- scores -------------------------------------------------------------------------------


def score_captions(references: Mapping[str, Sequence[str]], captions: Mapping[str, str]) -> Scores:
    """BLEU-1..4, ROUGE-L and CIDEr of one caption per image against that image's
    references, both keyed by image name, with pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {name: [ptb_tokenize(text) for text in references[name]] for name in captions}
    res = {name: [ptb_tokenize(text)] for name, text in captions.items()}
    # verbose=0: its default prints the n-gram counts to stdout, into our table or JSON.
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return Scores(
        bleu=(float(bleu[0]), float(bleu[1]), float(bleu[2]), float(bleu[3])),
        rouge_l=float(rouge_l),
        cider=float(cider),
    )


# pycocoevalcap's PTBTokenizer runs Stanford CoreNLP's PTBTokenizer (Java) in a subprocess,
# and the bot must not need Java. What follows gives the same tokens on caption text:
# lower case, clitics split off ("is n't", "dog 's"), brackets as -lrb- and kin, and
# punctuation split off and then removed with pycocoevalcap's own PUNCTUATIONS list.
# That list is upper case where CoreNLP's -lowerCase output is not, so "-lrb-" stays, as it
# does in coco-caption. The rules were checked against the jar pycocoevalcap ships (3.4.1)
# on COCO-style captions (tests/test_eval.py does so where Java is installed); exotic input
# (emoticons, "a&b", "'tis") may still differ.
_REMOVED = frozenset(PUNCTUATIONS)
# CoreNLP cannot tokenize characters outside the Basic Multilingual Plane and drops them.
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_TYPOGRAPHIC = str.maketrans(
    {"’": "'", "‘": "`", "“": '"', "”": '"', "…": " ... ", "–": " -- ", "—": " -- "}
)
# Words CoreNLP keeps whole with their period, in any letter case (measured: "x dr. y"
# keeps "dr.", "x no. y" gives "no ."). Other words lose a final period, as punctuation.
_ABBREVIATIONS = frozenset(
    {
        *("al", "apr", "aug", "ave", "blvd", "bros", "calif", "capt", "cf", "co", "col"),
        *("corp", "dec", "dept", "dr", "esq", "est", "etc", "feb", "fla", "fri", "ft", "gen"),
        *("gov", "hon", "inc", "jan", "jr", "jul", "jun", "lt", "ltd", "mar", "messrs", "mon"),
        *("mr", "mrs", "ms", "mt", "nov", "oct", "pres", "prof", "rd", "rep", "rev", "sen"),
        *("sep", "sept", "sgt", "sq", "sr", "st", "thu", "tue", "univ", "va", "vs", "wed"),
    }
)
# One letter, or dotted letters: "j.", "u.s.", "p.m.", "e.g.", "ph.d.".
_INITIALS = re.compile(r"[a-z]\.|(?:[a-z]{1,2}\.){2,}", re.IGNORECASE)
_LEADING = re.compile(r"--|\.+|[\"'`(\[{$]|#(?=\d)")
_OPENING = {'"': "``", "'": "`", "(": "-lrb-", "[": "-lsb-", "{": "-lcb-"}
# A leading apostrophe that belongs to the word: "'90s", "'em".
_ELIDED = re.compile(r"'(?:\d\ds|em)\b", re.IGNORECASE)
_TRAILING = re.compile(r"(?:-+|[?!]+|\.+|[\"')\]}%$,;:])$")
_CLOSING = {'"': "''", ")": "-rrb-", "]": "-rsb-", "}": "-rcb-"}
# Split inside a word; commas and colons between digits stay ("1,000", "10:30").
_INSIDE = re.compile(r"--|[;*+=|~^\\]|(?<!\d),|,(?!\d)|(?<!\d):|:(?!\d)")
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)", re.IGNORECASE)
# Split after their third letter: "can not", "gon na".
_TWO_WORDS = frozenset({"cannot", "gonna", "gotta", "wanna", "lemme", "gimme"})


def ptb_tokenize(text: str) -> str:
    """``text`` as pycocoevalcap's PTBTokenizer returns it: lower-case tokens without
    punctuation, joined by single spaces."""
    tokens: list[str] = []
    for chunk in _ASTRAL.sub("", text.translate(_TYPOGRAPHIC)).split():
        tokens += _chunk_tokens(chunk)
    return " ".join(token for token in map(str.lower, tokens) if token not in _REMOVED)


def _chunk_tokens(chunk: str) -> list[str]:
    """The tokens of one whitespace-free piece of text, punctuation included."""
    head: list[str] = []
    while chunk and not _ELIDED.match(chunk) and (found := _LEADING.match(chunk)):
        head.append(_OPENING.get(found.group(), found.group()))
        chunk = chunk[found.end() :]
    tail: list[str] = []
    while chunk and (found := _TRAILING.search(chunk)):
        piece, cut = found.group(), found.start()
        if piece[0] == "." and _is_abbreviation(chunk[:cut] + "."):
            if piece == ".":
                break
            piece, cut = piece[1:], cut + 1  # "u.s.." is "u.s." and a period
        tail.insert(0, "..." if piece.startswith("..") else _CLOSING.get(piece, piece))
        chunk = chunk[:cut]
    words: list[str] = []
    for word in _INSIDE.sub(lambda inside: f" {inside.group()} ", chunk).split():
        if word.lower() in _TWO_WORDS:
            words += [word[:3], word[3:]]
            continue
        clitics: list[str] = []
        while clitic := _CLITIC.fullmatch(word):
            word = clitic.group(1)
            clitics.insert(0, clitic.group(2))
        words += [word, *clitics]
    return [*head, *words, *tail]


def _is_abbreviation(word: str) -> bool:
    return word[:-1].lower() in _ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


def clip_scores(
    model: str, engine: EngineSettings, images: Sequence[Job], runs: Sequence[ModelCaptions]
) -> list[float]:
    """Each run's mean CLIPScore over ``images``; a caption that failed scores 0.
    ``ModelUnavailable`` when the CLIP cannot be loaded."""
    import torch
    from transformers import AutoModel, AutoProcessor

    from core.images import decode_image
    from core.tasks import _runtime
    from core.tiny import resolve_model

    device = _runtime.resolve_device(engine.device)
    with _runtime.loading("mood", model):
        folder = _runtime.ModelFiles("mood", model, resolve_model, engine.model_cache).folder()
        clip = AutoModel.from_pretrained(folder).to(device).eval()
        processor = AutoProcessor.from_pretrained(folder)
        if clip.config.model_type != "clip":
            raise ConfigError(f"{model} is not a CLIP model but {clip.config.model_type!r}")

    def embed_images(batch: Sequence[Job]) -> torch.Tensor:
        pictures = [decode_image(read_image_file(Path(job.source)), job.name) for job in batch]
        pixels = processor(images=pictures, return_tensors="pt").pixel_values
        return clip.get_image_features(pixel_values=pixels.to(device)).pooler_output

    def embed_texts(batch: Sequence[str]) -> torch.Tensor:
        encoded = processor.tokenizer(
            list(batch),
            padding=True,
            truncation=True,
            max_length=clip.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        return clip.get_text_features(**encoded.to(device)).pooler_output

    # An image no model could caption (one that does not decode, say) scores 0 in every
    # run, so it is never embedded.
    scored = [job for job in images if any(job.name not in run.failures for run in runs)]
    if not scored:
        return [0.0] * len(runs)
    means: list[float] = []
    with torch.inference_mode():
        image_features = torch.cat([embed_images(batch) for batch in _batches(scored)])
        for run in runs:
            texts = [CLIPSCORE_PROMPT + run.captions[job.name] for job in scored]
            text_features = torch.cat([embed_texts(batch) for batch in _batches(texts)])
            scores = clipscore(image_features, text_features).cpu()
            made = torch.tensor([job.name not in run.failures for job in scored])
            means.append(float((scores * made).sum()) / len(images))
    return means


def _batches(items: Sequence[T]) -> list[Sequence[T]]:
    return [items[start : start + CLIP_BATCH] for start in range(0, len(items), CLIP_BATCH)]


def clipscore(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(n, dim) x (n, dim) -> (n,): 2.5 * max(cos, 0) for each image and its caption."""
    import torch

    cosine = torch.nn.functional.cosine_similarity(
        image_features.float(), text_features.float(), dim=-1
    )
    return CLIPSCORE_WEIGHT * cosine.clamp(min=0)


# -- output -------------------------------------------------------------------------------


def render_table(evaluation: Evaluation) -> str:
    """One row per model: images scored, captions that failed, then every score."""
    metrics = [*METRICS, CLIPSCORE] if evaluation.clipscore_note is None else list(METRICS)
    header = ["model", "images", "failed", *metrics]
    rows = [header]
    for report in evaluation.reports:
        values = list(report.scores.named().values())
        if report.clipscore is not None:
            values.append(report.clipscore)
        counts = [str(len(evaluation.images)), str(len(report.run.failures))]
        rows.append([report.run.model, *counts, *(f"{value:.3f}" for value in values)])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    if evaluation.clipscore_note is not None:
        lines.append(evaluation.clipscore_note)
    return "\n".join(lines)


def as_json(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "folder": str(evaluation.folder),
        "references": str(evaluation.references),
        "profile": evaluation.profile,
        "images": list(evaluation.images),
        "models": [
            {
                "model": report.run.model,
                "scores": {**report.scores.named(), CLIPSCORE: report.clipscore},
                "failed": dict(report.run.failures),
                "captions": dict(report.run.captions),
            }
            for report in evaluation.reports
        ],
        "clipscore_note": evaluation.clipscore_note,
    }
