"""``python -m bot export-ratings``: the social captions people rated 👍, as instruction-
tuning JSONL for a LoRA adapter of the writer (``[profiles.NAME.write] adapter``).

One row per rated caption, what the writer was given and what it wrote::

    {"system": ..., "prompt": ..., "response": ..., "score": 1}

``prompt`` is the writer's user message (``core.tasks.write.user_prompt``: the caption, the
text in the image, hashtags, author, date, platform, chat and style as a fenced JSON
block) and ``system`` its rules from the configured ``write`` settings, so a fine-tune sees
exactly what the writer sees. An answer stores what it showed but not the writer's whole
input (author, chat, style); that comes from the write result's cache key, which is the
request itself.

A seed project fine-tuned its writer with LoRA on targets of which 18% were the string
"nan". Here rows are dropped, each for the first of these reasons, and counted per reason:

1. the rater, or the user the rated answer was written for, used /forget (at any time:
   the store records who did, and what they do afterwards stays out too);
2. thumbs down (``--include-negative`` keeps them, with ``"score": -1``);
3. the answer is gone or showed no social caption, or its writer input is not known;
4. an empty response or a placeholder ("nan", "none", "null");
5. a degenerate response: a loop of characters or words, or too few distinct words;
6. longer than ``--max-tokens`` as a training sequence (system, prompt and response in the
   writer's chat template), counted with the writer's tokenizer when the model cache has
   it, else bounded from above by UTF-8 bytes;
7. a duplicate of a row already kept, ignoring case and spacing (the oldest rating wins).
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import logging
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.sqlite import SqliteStore
from bot.options import add_config_options, settings_from
from core import codec
from core.errors import ConfigError
from core.ports import AnswerRecord, Rating, Store, UserRef
from core.settings import Settings, WriteSettings
from core.types import PostContext, SocialCaption, WriteRequest

logger = logging.getLogger(__name__)

# What a rating of a social caption is about: a /write answer or the web page's social
# caption ("write"), or a whole chat answer that showed one ("describe"): in a chat, the
# 👍 under a described image is the only rating its social caption gets.
RATED_TASKS = ("write", "describe")
# Llama-2's context, the default writer's.
DEFAULT_MAX_TOKENS = 4096
# Room for a chat template's markers around three messages in the byte estimate.
TEMPLATE_ALLOWANCE = 64

PLACEHOLDERS = frozenset({"", "nan", "none", "null"})
# The same 1-10 characters six times running ("hahahahahaha"), in a run of at least
# LOOP_MIN_CHARS: six exclamation marks are emphasis, twelve are a loop.
_CHARACTER_LOOP = re.compile(r"(.{1,10}?)\1{5,}", re.DOTALL)
LOOP_MIN_CHARS = 12
_WORD = re.compile(r"\w+")
# A phrase of up to this many words repeated back to back: 4 times for one word ("so so
# so so"), 3 for longer phrases. Longer loops fail the distinct-word ratio instead.
LONGEST_LOOPED_PHRASE = 10
# Below this share of distinct words (in a response of at least MIN_WORDS_FOR_RATIO words)
# a response says little more than a few words over and over.
MIN_DISTINCT_RATIO = 0.5
MIN_WORDS_FOR_RATIO = 8


class Drop(enum.Enum):
    """Why a rated caption was left out, in the order the checks run."""

    FORGOTTEN = "rated by, or written for, a user who used /forget"
    NEGATIVE = "thumbs down (--include-negative keeps them)"
    NO_CAPTION = "the answer rated is gone or showed no social caption"
    UNKNOWN_INPUT = "what the writer was given is no longer known"
    EMPTY = 'empty, or a placeholder ("nan", "none", "null")'
    DEGENERATE = "degenerate: looping, or too few distinct words"
    TOO_LONG = "longer than --max-tokens"
    DUPLICATE = "a duplicate of a row kept, ignoring case and spacing"


@dataclass(frozen=True, slots=True)
class RatedCaption:
    """A rating of a social caption and what the writer was given for it."""

    rating: Rating
    # Who asked for the answer rated.
    asker: UserRef
    request: WriteRequest
    text: str


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A rating whose caption or writer input cannot be found."""

    rating: Rating
    # None when the answer rated is gone.
    asker: UserRef | None
    reason: Drop


@dataclass(frozen=True, slots=True)
class Example:
    """One JSONL row."""

    system: str
    prompt: str
    response: str
    score: int


@dataclass(frozen=True, slots=True)
class TokenCount:
    """How a row's length in tokens is measured, and how the summary names that."""

    measure: Callable[[Example], int]
    source: str


@dataclass(frozen=True, slots=True)
class Export:
    """The rows kept, and how many were dropped for each reason."""

    examples: tuple[Example, ...]
    dropped: Counter[Drop]


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="the JSONL file to write, or - for standard output"
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive,
        default=DEFAULT_MAX_TOKENS,
        help="longest row, in the writer's tokens, as a training sequence (system, prompt "
        f"and response); default {DEFAULT_MAX_TOKENS}, Llama-2's context",
    )
    parser.add_argument(
        "--include-negative",
        action="store_true",
        help='keep thumbs-down rows too, with "score": -1 (for preference tuning; never for '
        "plain supervised fine-tuning)",
    )
    add_config_options(parser)


def run_export_ratings(args: argparse.Namespace) -> int:
    """Write the rows and print to stderr how many were kept and dropped, and why."""
    settings = settings_from(args)
    database = settings.store.database
    if not database.is_file():
        raise ConfigError(f"there is no store at {database} ([store] database) to export from")
    # 1. What was rated, and what the writer was given for it.
    rated, forgotten = asyncio.run(_read_store(settings))
    # 2. The cleaning.
    counter = writer_token_count(settings)
    export = clean(
        rated,
        forgotten,
        settings.profile.write,
        counter,
        max_tokens=args.max_tokens,
        include_negative=args.include_negative,
    )
    # 3. The rows, then the summary.
    lines = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in export.examples)
    if args.out == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        Path(args.out).write_text(lines, encoding="utf-8")
    print(summary(export, len(rated), args.out, counter), file=sys.stderr)
    return 0


async def _read_store(
    settings: Settings,
) -> tuple[list[RatedCaption | Unresolved], frozenset[UserRef]]:
    async with SqliteStore.open(settings.store.database, settings.store.images_dir) as store:
        ratings = await store.ratings_of_tasks(RATED_TASKS)
        rated = [await resolve(store, rating) for rating in ratings]
        return rated, await store.forgotten_users()


async def resolve(store: Store, rating: Rating) -> RatedCaption | Unresolved:
    """The caption ``rating`` is about and the writer's input for it."""
    answer = await _answer_rated(store, rating)
    if answer is None or answer.sha256 is None:
        return Unresolved(rating, None, Drop.NO_CAPTION)
    text = json.loads(answer.result).get("social")
    if text is None:
        return Unresolved(rating, answer.user, Drop.NO_CAPTION)
    # The write result's parameters are the writer's request; the one whose caption the
    # answer showed is the one it was given.
    requests = {
        _write_request(key.params)
        for key, value in (await store.results_of(answer.sha256, "write")).items()
        if _caption_text(value) == text
    }
    if len(requests) > 1:
        # The same words written for several posts (say, one image sent by two people):
        # only the post made where and when this answer was is this answer's.
        day = answer.created.date().isoformat()
        requests = {
            r
            for r in requests
            if (r.context.platform, r.context.date) == (answer.chat.platform, day)
        }
    if len(requests) != 1:
        return Unresolved(rating, answer.user, Drop.UNKNOWN_INPUT)
    return RatedCaption(rating, answer.user, requests.pop(), text)


async def _answer_rated(store: Store, rating: Rating) -> AnswerRecord | None:
    if rating.answer is not None:
        return await store.get_answer(rating.answer)
    # Rated by image and task (the web page): the rater's newest answer about that image,
    # by the time of the rating, that showed a social caption.
    shown = [
        answer
        for answer in await store.answers_about(rating.sha256, rating.user)
        if answer.created <= rating.at and "social" in json.loads(answer.result)
    ]
    return shown[-1] if shown else None


def _caption_text(value: str) -> str:
    caption: SocialCaption = codec.decode(value)
    return caption.text


def _write_request(params: str) -> WriteRequest:
    # As core.service writes them: {"context": asdict(PostContext), "style": str}.
    decoded = json.loads(params)
    context = decoded["context"]
    return WriteRequest(
        PostContext(**{**context, "hashtags": tuple(context["hashtags"])}), decoded["style"]
    )


def clean(
    rated: Sequence[RatedCaption | Unresolved],
    forgotten: frozenset[UserRef],
    settings: WriteSettings,
    counter: TokenCount,
    *,
    max_tokens: int,
    include_negative: bool,
) -> Export:
    """The rows worth training on, oldest rating first, and what was dropped for which
    reason (see the module's docstring for the order)."""
    # Imported here, as it imports torch: the command line imports this module for --help.
    from core.tasks.write import system_prompt, user_prompt

    examples: list[Example] = []
    dropped: Counter[Drop] = Counter()
    seen: set[tuple[int, str]] = set()
    for item in rated:
        reason: Drop | None = None
        if item.rating.user in forgotten or item.asker in forgotten:
            reason = Drop.FORGOTTEN
        elif item.rating.score < 0 and not include_negative:
            reason = Drop.NEGATIVE
        elif isinstance(item, Unresolved):
            reason = item.reason
        elif is_placeholder(item.text):
            reason = Drop.EMPTY
        elif is_degenerate(item.text):
            reason = Drop.DEGENERATE
        else:
            styled = bool(item.request.style.strip())
            example = Example(
                system_prompt(settings, styled=styled),
                user_prompt(item.request),
                item.text,
                item.rating.score,
            )
            key = (example.score, normalized(example.response))
            if counter.measure(example) > max_tokens:
                reason = Drop.TOO_LONG
            elif key in seen:
                reason = Drop.DUPLICATE
            else:
                seen.add(key)
                examples.append(example)
        if reason is not None:
            dropped[reason] += 1
    return Export(tuple(examples), dropped)


# -- the checks -----------------------------------------------------------------------------


def is_placeholder(text: str) -> bool:
    """Empty, or what a missing value becomes on its way through a data frame."""
    return text.strip().strip("\"'`.").casefold() in PLACEHOLDERS


def is_degenerate(text: str) -> bool:
    """A loop of characters or words, or a response of many words but few distinct ones."""
    if any(len(loop.group()) >= LOOP_MIN_CHARS for loop in _CHARACTER_LOOP.finditer(text)):
        return True
    words = [word.casefold() for word in _WORD.findall(text)]
    if len(words) >= MIN_WORDS_FOR_RATIO and len(set(words)) / len(words) < MIN_DISTINCT_RATIO:
        return True
    return _repeats_a_phrase(words)


def _repeats_a_phrase(words: Sequence[str]) -> bool:
    for size in range(1, LONGEST_LOOPED_PHRASE + 1):
        copies = 4 if size == 1 else 3
        for start in range(len(words) - size * copies + 1):
            phrase = words[start : start + size]
            if all(
                words[start + size * copy : start + size * (copy + 1)] == phrase
                for copy in range(1, copies)
            ):
                return True
    return False


def normalized(text: str) -> str:
    """``text`` as duplicates are compared: Unicode-normalized, case-folded, single-spaced."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# -- lengths --------------------------------------------------------------------------------


def writer_token_count(settings: Settings) -> TokenCount:
    """Counts with the configured writer's tokenizer when it loads without the network (a
    ``tiny/`` model is built locally); else an upper bound: no byte-level BPE or
    SentencePiece tokenizer with byte fallback (Llama, Qwen, Mistral) makes more tokens
    than a text has UTF-8 bytes."""
    # Imported here: transformers takes seconds to import, and --help needs none of it.
    from transformers import AutoTokenizer

    from core.tiny import resolve_model

    model = settings.profile.write.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model(model, settings.engine.model_cache), local_files_only=True
        )
    except (OSError, ValueError) as exc:
        logger.info("the tokenizer of %s does not load offline: %s", model, exc)
        return TokenCount(
            estimate_tokens,
            f"estimated as UTF-8 bytes, an upper bound: the tokenizer of {model} is not in "
            "the model cache (python -m bot prefetch fetches it)",
        )
    if not tokenizer.chat_template:
        raise ConfigError(
            f"write.model {model} is not a chat model (its tokenizer has no chat template)"
        )

    def measure(example: Example) -> int:
        text = tokenizer.apply_chat_template(_messages(example), tokenize=False)
        # The template writes its own special tokens, as the writer's preprocess relies on.
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    return TokenCount(measure, f"counted with the tokenizer of {model}")


def estimate_tokens(example: Example) -> int:
    text = "".join(message["content"] for message in _messages(example))
    return len(text.encode("utf-8")) + TEMPLATE_ALLOWANCE


def _messages(example: Example) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": example.system},
        {"role": "user", "content": example.prompt},
        {"role": "assistant", "content": example.response},
    ]


# -- the summary ----------------------------------------------------------------------------


def summary(export: Export, rated: int, out: str, counter: TokenCount) -> str:
    where = "standard output" if out == "-" else out
    lines = [
        f"export-ratings: kept {len(export.examples)} of {rated} ratings of social captions,"
        f" written to {where}",
        *(
            f"  dropped {export.dropped[reason]:>5}  {reason.name.lower():<13}  {reason.value}"
            for reason in Drop
        ),
        f"  lengths {counter.source}",
    ]
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value
