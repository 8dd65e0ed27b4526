"""``python -m bot export-ratings`` on a real SQLite store that the service filled: people
write, describe, rate and forget through the use cases, with fake models whose social
captions are scripted; the export keeps exactly the rows worth training on."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.sqlite import SqliteStore
from bot.config import load_settings
from bot.export_ratings import (
    Example,
    add_export_arguments,
    estimate_tokens,
    is_degenerate,
    is_placeholder,
    normalized,
    run_export_ratings,
    writer_token_count,
)
from core.engine import Engine
from core.errors import ConfigError
from core.ports import AnswerRecord, ChatRef, Rating, UserRef
from core.replies import Reply
from core.service import Service
from core.settings import BatchSettings, EngineSettings, ServiceSettings, WriteSettings
from core.tasks.write import system_prompt, user_prompt
from core.types import (
    Origin,
    PostContext,
    SocialCaption,
    Tags,
    TagsRequest,
    Upload,
    WriteRequest,
)
from tests import imagekit
from tests.fakes import FakeCaptioner, FakeReader

T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
GROUP = ChatRef("telegram", "-100")


def member(name: str) -> Origin:
    return Origin(UserRef("telegram", name), GROUP, author=f"@{name}", chat_title="Harbour friends")


ALICE, BOB, CAROL, ERIN = (member(name) for name in ("alice", "bob", "carol", "erin"))
# The web page: a browser is its own private chat, and rates by image and task.
DANA = Origin(UserRef("web", "dana"), ChatRef("web", "dana"), private=True)

GOLDEN = "Golden hour over the harbour, boats resting after a long day. #sunset #harbour"
BREAD = "Fresh bread on the counter and the whole kitchen smells like Sunday ☀️ #baking"
MURAL = "A mural that stops you mid-step: colour, courage and a little chaos. #streetart"
PLAIN = "A quiet street with parked cars. #street"
LOOP = "So good! So good! So good! So good! So good! #food"
FEW_WORDS = "sun and sea and sun and sea and sun and sand and sea and sun #beach"
NEAR_GOLDEN = "golden  hour over the HARBOUR, boats resting after a long day.  #sunset #harbour"
LONG = " ".join(f"word{i}" for i in range(600))


@dataclass
class FakeTagger:
    """The ``tags`` task's contract without a model: one hashtag for every post."""

    name: str = "tags"
    priority: int = 0
    batching: BatchSettings = field(default_factory=lambda: BatchSettings(batch_size=1))

    def validate(self, request: TagsRequest) -> None:
        pass

    def preprocess(self, request: TagsRequest) -> str:
        return request.caption

    def batch_key(self, item: str) -> Hashable:
        return None

    def load(self) -> None:
        pass

    def sample(self, size: int) -> list[str]:
        return [""] * size

    def forward(self, batch: Sequence[str]) -> list[str]:
        return list(batch)

    def postprocess(self, raw: str) -> Tags:
        return Tags(("#harbourlife",))

    def unload(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0

    def describe(self) -> str:
        return "fake tagger"

    def identity(self) -> str:
        return "fake-tagger"


@dataclass
class ScriptedWriter:
    """The ``write`` task's contract without a model: each post gets the next caption of
    ``script``, as a writer that might loop, ramble or print "nan" would write it."""

    script: list[str]
    name: str = "write"
    priority: int = 2
    batching: BatchSettings = field(default_factory=lambda: BatchSettings(batch_size=1))

    def validate(self, request: WriteRequest) -> None:
        pass

    def preprocess(self, request: WriteRequest) -> bool:
        return True

    def batch_key(self, item: bool) -> Hashable:
        return None

    def load(self) -> None:
        pass

    def sample(self, size: int) -> list[bool]:
        return [False] * size  # warm-up rows take nothing from the script

    def forward(self, batch: Sequence[bool]) -> list[str]:
        return [self.script.pop(0) if real else "" for real in batch]

    def postprocess(self, raw: str) -> SocialCaption:
        return SocialCaption(raw)

    def unload(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0

    def describe(self) -> str:
        return "scripted writer"

    def identity(self) -> str:
        return "scripted-writer"


def picture(seed: int) -> Upload:
    return Upload(imagekit.encode(imagekit.noise(size=(96, 64), seed=seed)))


def store_paths(root: Path) -> tuple[Path, Path]:
    return root / "data" / "bot.sqlite3", root / "data" / "images"


async def fill_store(root: Path) -> None:
    """Everything a month of a group chat and the web page leaves in the store."""
    # In the order the posts below are written.
    writer = ScriptedWriter(
        [
            *(GOLDEN, BREAD, MURAL, PLAIN),
            *("Erin's garden in bloom. #flowers", "Erin's new bike. #cycling"),
            *("nan", "None", LOOP, FEW_WORDS, LONG),
            NEAR_GOLDEN,
        ]
    )
    tasks = {
        "caption": FakeCaptioner(),
        "ocr": FakeReader(),
        "tags": FakeTagger(),
        "write": writer,
    }
    ticks = itertools.count()
    settings = EngineSettings(device="cpu", model_cache=root / "engine")
    async with (
        SqliteStore.open(*store_paths(root)) as store,
        Engine(tasks, settings) as engine,  # type: ignore[arg-type]
    ):
        service = Service(
            engine, store, ServiceSettings(), clock=lambda: T0 + timedelta(seconds=next(ticks))
        )

        async def answered(reply: Reply[Any]) -> Reply[Any]:
            async with reply:
                async for _ in reply:
                    pass
            return reply

        async def write(origin: Origin, seed: int, score: int) -> str:
            reply = await answered(service.write(origin, picture(seed)))
            await service.rate_answer(origin, reply.handle, score)
            return reply.handle

        # Kept: a /write 👍, a described image's 👍 and the web page's 👍 on its caption.
        golden = await write(ALICE, 1, +1)
        described = await answered(service.describe(BOB, picture(2)))
        await service.rate_answer(BOB, described.handle, +1)
        on_the_web = await answered(service.describe(DANA, picture(3)))
        assert on_the_web.sha256 is not None
        await service.rate(DANA, on_the_web.sha256, "write", +1)
        await service.rate(DANA, on_the_web.sha256, "caption", -1)  # not a social caption
        # Thumbs down.
        await write(ALICE, 4, -1)
        # Erin and Bob rate Erin's caption; Erin asks to be forgotten, which deletes both
        # ratings with her image. She carries on: her next caption, rated by her and by
        # Bob, must stay out as well.
        erins = await write(ERIN, 5, +1)
        await service.rate_answer(BOB, erins, +1)
        await service.forget(ERIN)
        after = await write(ERIN, 6, +1)
        await service.rate_answer(BOB, after, +1)
        # What a writer should never be trained on.
        for seed in range(7, 12):
            await write(ALICE, seed, +1)
        # A near-copy of the golden caption, and Bob's 👍 on the golden caption itself.
        await write(CAROL, 12, +1)
        await service.rate_answer(BOB, golden, +1)
        assert writer.script == []
        # A 👍 on a description without a social caption (Carol's chat does not want one).
        carols_chat = Origin(CAROL.user, ChatRef("telegram", "carol"), private=True)
        await service.update_chat_settings(carols_chat, parts=("caption", "ocr"))
        plain = await answered(service.describe(carols_chat, picture(13)))
        await service.rate_answer(carols_chat, plain.handle, +1)

        # An answer from before the write results carried the whole request: its social
        # caption is known, what the writer was given is not.
        old = await store.put_image(b"an old photo", BOB.user, T0)
        shown = json.dumps({"caption": "An old photo.", "social": "Old but gold. #throwback"})
        await store.put_answer(
            AnswerRecord("oldanswer1", GROUP, BOB.user, "write", old.sha256, shown, T0)
        )
        await store.rate(Rating(BOB.user, old.sha256, "write", 1, T0, "oldanswer1"))


def export(root: Path, model_cache: Path, *options: str) -> argparse.Namespace:
    database, images = store_paths(root)
    config = root / "config.toml"
    config.write_text(
        'profile = "tiny"\n'
        f'[engine]\nmodel_cache = "{model_cache}"\n'
        f'[store]\ndatabase = "{database}"\nimages_dir = "{images}"\n'
    )
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    args = parser.parse_args(["--config", str(config), *options])
    args.command = "export-ratings"
    return args


def drop_counts(stderr: str) -> dict[str, int]:
    return {reason: int(n) for n, reason in re.findall(r"dropped +(\d+) +(\w+)", stderr)}


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    asyncio.run(fill_store(tmp_path))
    return tmp_path


def test_export_keeps_only_clean_thumbs_up_captions_and_counts_each_drop(
    filled: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = filled / "ratings.jsonl"
    args = export(filled, model_cache, "--out", str(out), "--max-tokens", "2048")

    assert run_export_ratings(args) == 0

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["response"] for row in rows] == [GOLDEN, BREAD, MURAL]
    assert {row["score"] for row in rows} == {1}
    err = capsys.readouterr().err
    assert drop_counts(err) == {
        # Erin's caption from after she asked to be forgotten, rated by her and by Bob.
        "forgotten": 2,
        "negative": 1,
        "no_caption": 1,
        "unknown_input": 1,
        "empty": 2,
        "degenerate": 2,
        "too_long": 1,
        # Carol's near-copy and Bob's 👍 on the same answer as Alice's.
        "duplicate": 2,
    }
    assert "kept 3 of 15 ratings of social captions" in err
    assert "counted with the tokenizer of tiny/llama-chat" in err
    # The prompt is everything the writer was given, author and chat included, which the
    # answer alone does not record.
    settings = load_settings(Path(args.config), None)
    golden_post = PostContext(
        f"A picture of {len(picture(1).data)} bytes.",
        hashtags=("#harbourlife",),
        author="@alice",
        date="2026-05-01",
        platform="telegram",
        chat="Harbour friends",
    )
    assert rows[0]["system"] == system_prompt(settings.profile.write, styled=False)
    assert rows[0]["prompt"] == user_prompt(WriteRequest(golden_post))
    # The web page's row: its writer had no author or chat to go on.
    assert '"platform": "web"' in rows[2]["prompt"] and "author" not in rows[2]["prompt"]


def test_include_negative_keeps_thumbs_down_rows_scored_minus_one(
    filled: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = export(filled, model_cache, "--out", "-", "--include-negative")

    assert run_export_ratings(args) == 0

    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [(row["response"], row["score"]) for row in rows] == [
        (GOLDEN, 1),
        (BREAD, 1),
        (MURAL, 1),
        (PLAIN, -1),
    ]
    assert drop_counts(captured.err)["negative"] == 0
    assert "written to standard output" in captured.err


def test_a_missing_store_is_refused_rather_than_created(tmp_path: Path, model_cache: Path) -> None:
    args = export(tmp_path, model_cache, "--out", str(tmp_path / "out.jsonl"))
    with pytest.raises(ConfigError, match="no store at"):
        run_export_ratings(args)
    assert not store_paths(tmp_path)[0].exists()


def test_max_tokens_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "-", "--max-tokens", "0"])
    assert "must be at least 1" in capsys.readouterr().err


# -- the checks on their own -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "  ", "nan", "NaN", '"None"', "null.", "NULL"])
def test_placeholders_are_empty_targets(text: str) -> None:
    assert is_placeholder(text)


@pytest.mark.parametrize("text", ["Nana's kitchen", "None of us saw this coming. #wow"])
def test_words_that_contain_a_placeholder_are_not_one(text: str) -> None:
    assert not is_placeholder(text)


@pytest.mark.parametrize(
    "text",
    [
        LOOP,
        FEW_WORDS,
        "hahahahahahahaha what a day",
        "Wow!!!!!! hahahahahahaha",
        "very very very very nice",
        "#sunset #sunset #sunset #sunset",
        "Best view. " * 4,
    ],
)
def test_loops_and_repetition_are_degenerate(text: str) -> None:
    assert is_degenerate(text)


@pytest.mark.parametrize(
    "text",
    [
        GOLDEN,
        BREAD,
        MURAL,
        "Cats, cats, cats! Who could resist this face? #cats #caturday",
        "Wait for it... the best pizza in town 🍕🍕🍕 #pizza",
        "Wow!!!!!! What a day at the lake. #summer",
        "Go go go! Race day is here and the crowd is loud. #running",
        LONG,
    ],
)
def test_ordinary_captions_are_not_degenerate(text: str) -> None:
    assert not is_degenerate(text)


def test_duplicates_are_compared_without_case_or_spacing() -> None:
    assert normalized(" Golden  HOUR\nover the harbour ") == normalized(
        "golden hour over the harbour"
    )
    assert normalized("Golden hour!") != normalized("Golden hour")


# -- lengths ---------------------------------------------------------------------------------


def test_without_the_writers_tokenizer_lengths_are_an_upper_bound(
    tmp_path: Path, model_cache: Path
) -> None:
    tiny = load_settings(None, "tiny")
    tiny = dataclasses.replace(tiny, engine=EngineSettings(model_cache=model_cache))
    counted = writer_token_count(tiny)
    request = WriteRequest(PostContext("Ein Café in Köln 🌧️", ocr_text="ÖFFNUNGSZEITEN 8–18"))
    example = Example(
        system_prompt(WriteSettings(), styled=False),
        user_prompt(request),
        "Regen draußen, Kaffee drinnen ☕️ #köln",
        1,
    )
    assert 0 < counted.measure(example) <= estimate_tokens(example)

    missing = WriteSettings(model=str(tmp_path / "no-such-writer"))
    absent = dataclasses.replace(tiny, profile=dataclasses.replace(tiny.profile, write=missing))
    estimated = writer_token_count(absent)
    assert estimated.source.startswith("estimated as UTF-8 bytes")
    assert estimated.measure(example) == estimate_tokens(example)
