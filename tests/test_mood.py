"""The mood task: CLIP zero-shot mood and colour labels, template ensembles and a threshold."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from core.engine import Engine
from core.errors import ConfigError, InvalidRequest, ModelUnavailable
from core.settings import BatchSettings, EngineSettings, MoodSettings
from core.tasks.mood import (
    Logits,
    MoodTask,
    PreparedImage,
    label_embeddings,
    select_labels,
    zero_shot_logits,
)
from core.tiny import resolve_model
from core.types import MoodLabel, MoodLabels, MoodRequest
from tests import imagekit

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MODEL = "tiny/clip"
INT8_DEPRECATION = "ignore:torch.ao.quantization is deprecated:DeprecationWarning"
HASHTAG = re.compile(r"^#[a-z]+(_[a-z]+)*$")
ALL_LABELS = len(MoodSettings().mood_labels) + len(MoodSettings().colour_labels)


def pictures() -> list[bytes]:
    """Six clearly different uploads."""
    return [
        imagekit.encode(imagekit.solid((64, 48), "red")),
        imagekit.encode(imagekit.solid((64, 48), "white")),
        imagekit.encode(imagekit.solid((64, 48), "black")),
        imagekit.encode(imagekit.corner_marked((64, 48), mark="blue", background="yellow")),
        imagekit.encode(imagekit.noise((64, 48), seed=3)),
        imagekit.encode(imagekit.text_image("OPEN", (64, 48), font_size=20), "JPEG"),
    ]


def engine_settings(cache: Path) -> EngineSettings:
    return EngineSettings(device="cpu", model_cache=cache, forward_timeout_s=60)


def mood_settings(**overrides: Any) -> MoodSettings:
    return MoodSettings(**{"model": MODEL, "precision": "none", **overrides})


@pytest.fixture(scope="module")
def task(model_cache: Path) -> MoodTask:
    loaded = MoodTask(mood_settings(), engine_settings(model_cache), resolve_model=resolve_model)
    loaded.load()
    return loaded


def logits_of(task: MoodTask, images: Sequence[bytes]) -> list[Logits]:
    return task.forward([task.preprocess(MoodRequest(image)) for image in images])


def labels_at(task: MoodTask, raws: Sequence[Logits], threshold: float) -> list[MoodLabels]:
    names = [label.name for label in task._labels]
    kinds = [label.kind for label in task._labels]
    return [select_labels(raw, names, kinds, threshold) for raw in raws]


# -- scoring (pure) -------------------------------------------------------------------------------


def test_templates_are_normalised_before_they_are_averaged() -> None:
    # One label, two templates: a long and a short embedding pointing different ways.
    ensembled = label_embeddings(torch.tensor([[[3.0, 0.0], [0.0, 1.0]]]))
    half = math.sqrt(0.5)
    assert torch.allclose(ensembled, torch.tensor([[half, half]]))


def test_each_label_is_ensembled_over_its_own_templates() -> None:
    templates = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 5.0]]])
    assert torch.allclose(label_embeddings(templates), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_logits_are_cosines_times_the_scale() -> None:
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = zero_shot_logits(torch.tensor([[2.0, 0.0], [1.0, 1.0]]), labels, 100.0)
    expected = torch.tensor([[100.0, 0.0], [100 * math.sqrt(0.5), 100 * math.sqrt(0.5)]])
    assert torch.allclose(logits, expected)


NAMES = ("joyful", "retro", "abstract", "pastel colors", "vibrant")
KINDS = ("mood", "mood", "mood", "colour", "colour")


def test_softmax_runs_within_each_kind_and_labels_come_sorted() -> None:
    # Moods: joyful clearly ahead. Colours: even, so each gets exactly one half.
    logits = (4.0, 1.0, 1.0, 7.0, 7.0)
    labels = select_labels(logits, NAMES, KINDS, threshold=0.0)
    scores = {label.name: label.score for label in labels.labels}
    mood_total = math.exp(4) + 2 * math.exp(1)
    assert scores["joyful"] == pytest.approx(math.exp(4) / mood_total)
    assert scores["retro"] == pytest.approx(math.exp(1) / mood_total)
    assert scores["pastel colors"] == scores["vibrant"] == pytest.approx(0.5)
    assert [label.score for label in labels.labels] == sorted(scores.values(), reverse=True)
    assert {label.kind for label in labels.labels if label.name == "vibrant"} == {"colour"}


def test_a_threshold_keeps_zero_one_or_several_labels() -> None:
    flat = (1.0, 1.0, 1.0, 2.0, 2.0)
    assert select_labels(flat, NAMES, KINDS, threshold=0.6).labels == ()
    peaked = (9.0, 1.0, 1.0, 2.0, 2.0)
    assert [label.name for label in select_labels(peaked, NAMES, KINDS, 0.6).labels] == ["joyful"]
    several = select_labels(peaked, NAMES, KINDS, 0.4)
    assert [label.name for label in several.labels] == ["joyful", "pastel colors", "vibrant"]


def test_labels_become_hashtags() -> None:
    labels = select_labels((0.0, 0.0, 0.0, 5.0, 0.0), NAMES, KINDS, threshold=0.9)
    assert labels == MoodLabels((MoodLabel("pastel colors", "colour", labels.labels[0].score),))
    assert labels.hashtags == ("#pastel_colors",)


# -- construction and validation ------------------------------------------------------------------


def test_construction_loads_nothing(tmp_path: Path) -> None:
    task = MoodTask(mood_settings(), engine_settings(tmp_path), resolve_model=resolve_model)
    assert task.name == "mood"
    assert task.memory_bytes() == 0
    assert list(tmp_path.iterdir()) == []
    assert MODEL in task.describe()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"precision": "fp8"}, "precision"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"mood_templates": ("a photo",)}, "mood_templates"),
        ({"mood_templates": ("a {} {} photo",)}, "mood_templates"),
        ({"colour_templates": ("a {} photo in {style}",)}, "colour_templates"),
        ({"colour_templates": ()}, "colour_templates"),
        ({"mood_labels": ("joyful", "joyful")}, "mood_labels"),
        ({"colour_labels": ("vibrant", " ")}, "colour_labels"),
        ({"mood_labels": (), "colour_labels": ()}, "at least one label"),
    ],
)
def test_impossible_settings_fail_at_start_up(
    overrides: dict[str, Any], key: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=key):
        MoodTask(mood_settings(**overrides), engine_settings(tmp_path), resolve_model=resolve_model)


def test_an_empty_upload_is_refused_on_the_loop(tmp_path: Path) -> None:
    task = MoodTask(mood_settings(), engine_settings(tmp_path), resolve_model=resolve_model)
    with pytest.raises(InvalidRequest, match=r"cat\.jpg is empty"):
        task.validate(MoodRequest(b"", "cat.jpg"))


def test_a_broken_upload_is_an_invalid_request(task: MoodTask) -> None:
    with pytest.raises(InvalidRequest, match=r"holiday\.jpg"):
        task.preprocess(MoodRequest(imagekit.not_an_image(), "holiday.jpg"))


def test_a_checkpoint_that_is_not_clip_makes_the_task_unavailable(model_cache: Path) -> None:
    task = MoodTask(
        mood_settings(model="tiny/blip-caption"),
        engine_settings(model_cache),
        resolve_model=resolve_model,
    )
    with pytest.raises(ModelUnavailable, match="cannot make mood labels") as caught:
        task.preprocess(MoodRequest(pictures()[0]))
    assert "mood needs a CLIP checkpoint" in caught.value.cause
    assert caught.value.retry_after_s is None


def test_the_tiny_checkpoint_is_small_reproducible_and_consistent(tmp_path: Path) -> None:
    one, two = (Path(resolve_model(MODEL, tmp_path / name)) for name in "ab")
    for file in one.iterdir():
        assert file.read_bytes() == (two / file.name).read_bytes(), file.name
    assert sum(f.stat().st_size for f in one.iterdir()) < 1_000_000
    config = AutoConfig.from_pretrained(one)
    tokenizer = AutoProcessor.from_pretrained(one).tokenizer
    assert config.model_type == "clip"
    assert config.text_config.vocab_size == len(tokenizer)
    # The text embedding is read at the end token, found by the config's id.
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("a cyberpunk photo").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(ids) == 2 + len("acyberpunkphoto")  # one token per character


# -- the tiny model ------------------------------------------------------------------------------


def test_threshold_zero_gives_every_label_once(task: MoodTask) -> None:
    for labels in labels_at(task, logits_of(task, pictures()), threshold=0.0):
        assert len(labels.labels) == ALL_LABELS
        assert len(set(labels.hashtags)) == ALL_LABELS
        assert "#pastel_colors" in labels.hashtags
        assert all(HASHTAG.match(hashtag) for hashtag in labels.hashtags)
        for kind in ("mood", "colour"):
            total = sum(label.score for label in labels.labels if label.kind == kind)
            assert total == pytest.approx(1.0)


def test_a_high_threshold_gives_no_labels(task: MoodTask) -> None:
    raws = logits_of(task, pictures())
    assert all(labels.labels == () for labels in labels_at(task, raws, threshold=0.99))


def test_images_get_zero_one_or_several_labels(task: MoodTask) -> None:
    raws = logits_of(task, pictures())
    everything = labels_at(task, raws, threshold=0.0)
    # Between the least and the most confident image's best label, some images keep
    # labels and some keep none.
    tops = sorted(labels.labels[0].score for labels in everything)
    threshold = (tops[0] + tops[-1]) / 2
    kept = labels_at(task, raws, threshold)
    assert any(labels.labels == () for labels in kept)
    assert any(labels.labels for labels in kept)
    for all_labels, some in zip(everything, kept, strict=True):
        assert some.labels == tuple(x for x in all_labels.labels if x.score >= threshold)
    # The configured threshold does not force a fixed count, unlike the seed's four.
    counts = {len(task.postprocess(raw).labels) for raw in raws}
    assert len(counts) > 1


def test_labels_are_deterministic(task: MoodTask, model_cache: Path) -> None:
    images = pictures()
    first = [task.postprocess(raw) for raw in logits_of(task, images)]
    again = [task.postprocess(raw) for raw in logits_of(task, images[::-1])][::-1]
    fresh = MoodTask(mood_settings(), engine_settings(model_cache), resolve_model=resolve_model)
    fresh.load()
    anew = [fresh.postprocess(raw) for raw in logits_of(fresh, images)]
    assert first == again == anew


def test_label_embeddings_are_the_template_ensembles(task: MoodTask) -> None:
    model = task._model
    tokenizer = task._processing().tokenizer
    label = task._labels[0]
    prompts = [template.format(label.name) for template in label.templates]
    assert prompts == ["a joyful photo", "a photo with a joyful mood", "a joyful picture"]
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        features = model.get_text_features(**encoded).pooler_output
    assert task._label_embeddings is not None
    expected = label_embeddings(features.unsqueeze(0))[0]
    assert torch.allclose(task._label_embeddings[0], expected, atol=1e-5)
    # Not just the first template's embedding.
    single = label_embeddings(features[:1].unsqueeze(0))[0]
    assert not torch.allclose(task._label_embeddings[0], single, atol=1e-3)


def test_the_templates_change_the_scores(task: MoodTask, model_cache: Path) -> None:
    single = MoodTask(
        mood_settings(mood_templates=("a {} photo",)),
        engine_settings(model_cache),
        resolve_model=resolve_model,
    )
    single.load()
    image = pictures()[3:4]
    assert logits_of(single, image) != logits_of(task, image)


def test_one_kind_alone_is_enough(model_cache: Path) -> None:
    moods = MoodTask(
        mood_settings(colour_labels=(), threshold=0.0),
        engine_settings(model_cache),
        resolve_model=resolve_model,
    )
    moods.load()
    [raw] = logits_of(moods, pictures()[:1])
    labels = moods.postprocess(raw)
    assert {label.kind for label in labels.labels} == {"mood"}
    assert len(labels.labels) == len(MoodSettings().mood_labels)


def test_sample_gives_distinct_inputs_of_the_model_size(task: MoodTask) -> None:
    items: list[PreparedImage] = task.sample(3)
    assert all(item.pixel_values.shape == (1, 3, 32, 32) for item in items)
    assert not torch.equal(items[0].pixel_values, items[1].pixel_values)
    assert len(task.forward(items)) == 3


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        pytest.param("int8", torch.float32, marks=pytest.mark.filterwarnings(INT8_DEPRECATION)),
        ("bf16", torch.bfloat16),
    ],
)
def test_other_cpu_precisions_load_and_label(
    precision: str, dtype: torch.dtype, model_cache: Path
) -> None:
    quantized = MoodTask(
        mood_settings(precision=precision),
        engine_settings(model_cache),
        resolve_model=resolve_model,
    )
    quantized.load()
    try:
        assert precision in quantized.describe()
        conv = next(m for m in quantized._model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.dtype == dtype
        for labels in labels_at(quantized, logits_of(quantized, pictures()[:2]), 0.0):
            assert len(labels.labels) == ALL_LABELS
    finally:
        quantized.unload()


@pytest.mark.filterwarnings(INT8_DEPRECATION)
def test_memory_is_measured_per_precision_and_freed(model_cache: Path) -> None:
    sizes = {}
    for precision in ("none", "bf16", "int8"):
        task = MoodTask(
            mood_settings(precision=precision),
            engine_settings(model_cache),
            resolve_model=resolve_model,
        )
        assert task.memory_bytes() == 0
        task.load()
        sizes[precision] = task.memory_bytes()
        task.unload()
        assert task.memory_bytes() == 0
        with pytest.raises(RuntimeError, match="before load"):
            task.forward(task.sample(1))
    # bf16 halves every fp32 tensor; int8 quarters the Linear weights only.
    assert sizes["bf16"] == sizes["none"] // 2
    assert sizes["int8"] < sizes["none"]


# -- through the engine --------------------------------------------------------------------------


class RecordingMood(MoodTask):
    """The real task, noting the size of every batch it runs."""

    def __init__(self, settings: MoodSettings, engine: EngineSettings) -> None:
        super().__init__(settings, engine, resolve_model=resolve_model)
        self.batches: list[int] = []

    def forward(self, batch: Sequence[PreparedImage]) -> list[Logits]:
        self.batches.append(len(batch))
        return super().forward(batch)


async def test_the_engine_batches_mood_requests(task: MoodTask, model_cache: Path) -> None:
    images = pictures()
    alone = [task.postprocess(logits_of(task, [image])[0]) for image in images]
    settings = mood_settings(batching=BatchSettings(batch_size=3, max_wait_ms=200))
    recording = RecordingMood(settings, engine_settings(model_cache))
    async with Engine({"mood": recording}, engine_settings(model_cache)) as engine:
        await engine.ensure_loaded("mood")
        recording.batches.clear()
        outcomes = await asyncio.gather(
            *(engine.run("mood", MoodRequest(image, f"{i}.png")) for i, image in enumerate(images))
        )
        with pytest.raises(InvalidRequest):
            await engine.run("mood", MoodRequest(imagekit.truncated_png(), "cut.png"))
    assert sorted(recording.batches) == [3, 3]
    labels = [outcome.value for outcome in outcomes]
    assert all(isinstance(value, MoodLabels) for value in labels)
    assert [[(x.name, x.kind) for x in value.labels] for value in labels] == [
        [(x.name, x.kind) for x in value.labels] for value in alone
    ]
    for value, single in zip(labels, alone, strict=True):
        assert [x.score for x in value.labels] == pytest.approx([x.score for x in single.labels])
