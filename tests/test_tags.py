"""The tags task on a tiny T5, and the hashtag rules."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from core.engine import Engine
from core.errors import ConfigError, InvalidRequest, ModelUnavailable
from core.settings import BatchSettings, EngineSettings, TagsSettings
from core.tasks.tags import MAX_INPUT_TOKENS, TagsTask, hashtags, to_hashtag
from core.tiny import resolve_model
from core.types import Tags, TagsRequest

pytestmark = pytest.mark.usefixtures("single_torch_thread")

HASHTAG = re.compile(r"^#[^\W_]+(?:_[^\W_]+)*$")
INT8_DEPRECATION = "ignore:torch.ao.quantization is deprecated:DeprecationWarning"


def engine_settings(cache: Path) -> EngineSettings:
    return EngineSettings(device="cpu", model_cache=cache, forward_timeout_s=60)


def tiny_settings(**overrides: object) -> TagsSettings:
    values: dict[str, object] = {
        "model": "tiny/t5-tags",
        "precision": "none",
        "num_beams": 4,
        "min_new_tokens": 4,
        "max_new_tokens": 24,
    }
    return TagsSettings(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def task(model_cache: Path) -> TagsTask:
    loaded = TagsTask(tiny_settings(), engine_settings(model_cache), resolve_model=resolve_model)
    loaded.load()
    return loaded


def tag(task: TagsTask, *requests: TagsRequest) -> list[Tags]:
    raw = task.forward([task.preprocess(request) for request in requests])
    return [task.postprocess(item) for item in raw]


# -- hashtag rules (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag_text", "expected"),
    [
        ("Photography", "#photography"),
        ("  Street Art ", "#street_art"),
        ("street-art", "#street_art"),
        ("#Travel", "#travel"),
        ("New York City", "#new_york_city"),
        ("rock 'n' roll", "#rock_n_roll"),
        ("Don’t Panic", "#dont_panic"),
        ("C++", "#c"),
        ("rock & roll", "#rock_roll"),
        ("snake_case_tag", "#snake_case_tag"),
        ("__x__", "#x"),
        ("3D printing", "#3d_printing"),
        ("Web 2.0", "#web_2_0"),
        ("café culture", "#café_culture"),
        ("ÜBER", "#über"),
        ("東京", "#東京"),
        ("2023", None),
        ("1_000", None),
        ("2.0", None),
        ("", None),
        ("  ", None),
        ("!!!", None),
        ("front riding front riding front riding front riding", "#front_riding"),
    ],
)
def test_to_hashtag(tag_text: str, expected: str | None) -> None:
    assert to_hashtag(tag_text) == expected


def test_hashtags_are_normalised_deduplicated_and_capped() -> None:
    generated = "Photography, Creativity, photography,  Street Art, street-art, 2023, , Travel"
    assert hashtags(generated, 10) == ("#photography", "#creativity", "#street_art", "#travel")
    assert hashtags(generated, 2) == ("#photography", "#creativity")
    assert hashtags("Travel", 10) == ("#travel",)
    assert hashtags("", 10) == ()
    assert hashtags(", , 42", 10) == ()


# -- construction and validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [TagsRequest(""), TagsRequest("   ", " \n "), TagsRequest("", "")],
)
def test_nothing_to_tag_is_an_invalid_request(request_: TagsRequest, tmp_path: Path) -> None:
    task = TagsTask(tiny_settings(), engine_settings(tmp_path), resolve_model=resolve_model)
    with pytest.raises(InvalidRequest, match="nothing to tag"):
        task.validate(request_)


def test_caption_or_image_text_alone_is_enough(tmp_path: Path) -> None:
    task = TagsTask(tiny_settings(), engine_settings(tmp_path), resolve_model=resolve_model)
    task.validate(TagsRequest("A cat on a couch."))
    task.validate(TagsRequest("", "OPEN 24 HOURS"))
    assert list(tmp_path.iterdir()) == []  # construction and validation load nothing


@pytest.mark.parametrize(
    "overrides",
    [
        {"precision": "fp8"},
        {"min_new_tokens": 65, "max_new_tokens": 64},
        {"num_beams": 0},
        {"max_tags": 0},
    ],
)
def test_impossible_settings_fail_at_start_up(overrides: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TagsTask(tiny_settings(**overrides), engine_settings(tmp_path), resolve_model=resolve_model)


def test_unloadable_files_make_the_task_unavailable(tmp_path: Path) -> None:
    task = TagsTask(
        tiny_settings(model=str(tmp_path)), engine_settings(tmp_path), resolve_model=resolve_model
    )
    with pytest.raises(ModelUnavailable, match="cannot make hashtags") as caught:
        task.preprocess(TagsRequest("A cat."))
    assert str(tmp_path) in caught.value.cause and caught.value.retry_after_s is None


def test_the_default_model_is_the_t5_tag_generator() -> None:
    assert TagsSettings().model == "fabiochiu/t5-base-tag-generation"


# -- the model ----------------------------------------------------------------------------------


def test_tags_are_deterministic(task: TagsTask) -> None:
    request = TagsRequest("A cat sitting on a red couch.", "SALE 50% OFF")
    first = tag(task, request)
    assert tag(task, request) == first
    assert first[0].hashtags


def test_tags_are_normalised_distinct_and_capped(model_cache: Path) -> None:
    capped = TagsTask(
        tiny_settings(max_tags=3), engine_settings(model_cache), resolve_model=resolve_model
    )
    capped.load()
    requests = [TagsRequest(text) for text in ("A dog on the beach.", "Street art on a wall.")]
    for tags in tag(capped, *requests):
        assert 1 <= len(tags.hashtags) <= 3
        assert len(set(tags.hashtags)) == len(tags.hashtags)
        assert all(HASHTAG.match(hashtag) for hashtag in tags.hashtags), tags


def test_a_batch_tags_each_input_as_if_alone(task: TagsTask) -> None:
    requests = [
        TagsRequest("A cat."),
        TagsRequest("Two people riding bicycles down a busy street at sunset.", "STOP"),
        TagsRequest("A bowl of fruit on a wooden table."),
    ]
    alone = [tag(task, request)[0] for request in requests]
    assert tag(task, *requests) == alone


def test_the_image_text_is_part_of_the_input(task: TagsTask) -> None:
    caption_only = task.preprocess(TagsRequest("A shop window."))
    with_text = task.preprocess(TagsRequest("A shop window.", "OPEN\n24 hours"))
    text_only = task.preprocess(TagsRequest("", "OPEN 24 hours"))
    assert len(with_text) > len(caption_only)
    assert with_text[: len(caption_only) - 1] == caption_only[:-1]  # all but the final </s>
    assert with_text[-len(text_only) :] == text_only


def test_long_input_is_truncated_to_the_model_limit(task: TagsTask) -> None:
    words = "a cat sitting on a red couch next to a bowl of fruit " * 100
    ids = task.preprocess(TagsRequest(words))
    assert len(ids) == MAX_INPUT_TOKENS
    assert tag(task, TagsRequest(words))[0].hashtags


def test_sample_gives_varied_inputs(task: TagsTask) -> None:
    items = task.sample(4)
    assert len(set(items)) == 4
    assert len(task.forward(items)) == 4


@pytest.mark.filterwarnings(INT8_DEPRECATION)
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_other_cpu_precisions_load_and_tag(precision: str, model_cache: Path) -> None:
    quantized = TagsTask(
        tiny_settings(precision=precision),
        engine_settings(model_cache),
        resolve_model=resolve_model,
    )
    quantized.load()
    try:
        assert precision in quantized.describe()
        [tags] = tag(quantized, TagsRequest("A cat sitting on a red couch."))
        assert all(HASHTAG.match(hashtag) for hashtag in tags.hashtags)
    finally:
        quantized.unload()


async def test_the_engine_runs_tags(model_cache: Path) -> None:
    task = TagsTask(
        tiny_settings(batching=BatchSettings(batch_size=2)),
        engine_settings(model_cache),
        resolve_model=resolve_model,
    )
    requests = [TagsRequest("A cat on a couch."), TagsRequest("", "OPEN 24 HOURS")]
    async with Engine({"tags": task}, engine_settings(model_cache)) as engine:
        outcomes = await asyncio.gather(*(engine.run("tags", r) for r in requests))
        with pytest.raises(InvalidRequest):
            await engine.run("tags", TagsRequest(" ", ""))
    assert all(isinstance(o.value, Tags) for o in outcomes)
    assert all(HASHTAG.match(h) for o in outcomes for h in o.value.hashtags)


@pytest.mark.filterwarnings(INT8_DEPRECATION)
def test_memory_is_measured_per_precision_and_freed(model_cache: Path) -> None:
    sizes = {}
    for precision in ("none", "bf16", "int8"):
        task = TagsTask(
            tiny_settings(precision=precision),
            engine_settings(model_cache),
            resolve_model=resolve_model,
        )
        assert task.memory_bytes() == 0
        task.load()
        sizes[precision] = task.memory_bytes()
        task.unload()
        assert task.memory_bytes() == 0
    # bf16 halves every fp32 tensor; int8 quarters the Linear weights only.
    assert sizes["bf16"] == sizes["none"] // 2
    assert sizes["int8"] < sizes["none"]
