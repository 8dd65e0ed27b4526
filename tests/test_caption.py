"""The caption task on tiny real-architecture models, and its caption text rules."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from core.engine import Engine
from core.errors import (
    ConfigError,
    InferenceFailed,
    InvalidRequest,
    ModelUnavailable,
    TaskUnavailable,
)
from core.settings import BatchSettings, CaptionSettings, EngineSettings
from core.tasks.caption import (
    CaptionTask,
    GeneratedCaption,
    clean_caption,
    collapse_repetition,
    strip_artefacts,
)
from core.tiny import resolve_model
from core.types import Caption, CaptionRequest
from tests import imagekit

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CAPTIONERS = ("tiny/blip2-opt", "tiny/blip-caption", "tiny/git", "tiny/vit-gpt2")
PREFIX = "a photography of"
# torch.ao's dynamic int8 (the CPU int8 path) is deprecated in torch; _runtime calls it.
INT8_DEPRECATION = "ignore:torch.ao.quantization is deprecated:DeprecationWarning"


def pictures() -> list[bytes]:
    """Four clearly different uploads."""
    return [
        imagekit.encode(imagekit.solid((64, 48), "red")),
        imagekit.encode(imagekit.corner_marked((64, 48), mark="blue", background="yellow")),
        imagekit.encode(imagekit.noise((64, 48), seed=3)),
        imagekit.encode(imagekit.text_image("OPEN", (64, 48), font_size=20), "JPEG"),
    ]


Factory = Callable[..., CaptionTask]


@pytest.fixture(scope="module")
def loaded(model_cache: Path) -> Factory:
    """Loaded tasks, one per distinct configuration, shared by the module."""
    tasks: dict[tuple[Any, ...], CaptionTask] = {}

    def get(model: str, **overrides: Any) -> CaptionTask:
        key = (model, *sorted(overrides.items()))
        if key not in tasks:
            settings = CaptionSettings(model=model, precision="none", max_new_tokens=12)
            fields = {**{f: getattr(settings, f) for f in settings.__slots__}, **overrides}
            task = CaptionTask(
                CaptionSettings(**fields), engine_settings(model_cache), resolve_model=resolve_model
            )
            task.load()
            tasks[key] = task
        return tasks[key]

    return get


def engine_settings(cache: Path) -> EngineSettings:
    return EngineSettings(device="cpu", model_cache=cache, forward_timeout_s=60)


def caption_all(task: CaptionTask, images: list[bytes], prefix: str = "") -> list[Caption]:
    prepared = [task.preprocess(CaptionRequest(image, prefix=prefix)) for image in images]
    return [task.postprocess(raw) for raw in task.forward(prepared)]


# -- caption text rules (pure) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("arafed man sitting on a bench", "man sitting on a bench"),
        ("there is a araffe woman holding an umbrella", "there is a woman holding an umbrella"),
        ("ARAFED dog", "dog"),
        ("a cat with arafe , toys", "a cat with, toys"),
        ("two araffes and an arafed", "two and an"),
        ("arafy arafay arraffed", ""),
        ("a giraffe next to a paraffin lamp", "a giraffe next to a paraffin lamp"),
        ("a photo of arafat", "a photo of arafat"),
        ("  a   dog  ", "a dog"),
        ("a caf\ufffd on the corner\ufffd", "a caf on the corner"),
        ("a dog\x07 on a\u200b mat", "a dog on a mat"),
    ],
)
def test_artefact_words_are_removed_as_whole_words(text: str, expected: str) -> None:
    assert strip_artefacts(text) == expected


@pytest.mark.parametrize(
    ("text", "expected", "degenerate"),
    [
        ("a polar polar polar bear", "a polar bear", True),
        ("a polar polar bear", "a polar polar bear", False),
        ("a polar polar polar polar polar polar polar", "a polar", True),
        ("Bear bear BEAR.", "Bear", True),
        ("on the beach on the beach on the beach", "on the beach", True),
        ("a dog on the beach on the beach on the beach on the", "a dog on the beach", True),
        ("a cat, a cat, a cat, sleeping", "a cat, sleeping", True),
        ("a b a b a b a b", "a b", True),
        ("a a a b a a a b a a a b", "a b", True),
        ("a man and a woman and a dog", "a man and a woman and a dog", False),
        ("very very good", "very very good", False),
        ("", "", False),
    ],
)
def test_repetition_is_cut_back_and_flagged(text: str, expected: str, degenerate: bool) -> None:
    assert collapse_repetition(text) == (expected, degenerate)


@pytest.mark.parametrize(
    ("decoded", "prefix", "expected"),
    [
        ("a dog on the grass", "", Caption("A dog on the grass.")),
        ("is this a dog?", "", Caption("Is this a dog?")),
        ("a dog on the grass,", "", Caption("A dog on the grass.")),
        ("arafed man in a suit", "", Caption("Man in a suit.")),
        ("a polar polar polar bear", "", Caption("A polar bear.", degenerate=True)),
        # The prefix the model echoes appears once, as the user wrote it.
        ("a photography of a dog", PREFIX, Caption("A photography of a dog.")),
        ("a photography of a dog", "A Photography  of", Caption("A Photography of a dog.")),
        ("a photography of, a dog", PREFIX, Caption("A photography of, a dog.")),
        # A model that does not echo its prompt gets the prefix put in front.
        ("a dog on the grass", PREFIX, Caption("A photography of a dog on the grass.")),
        ("it ' s a dog", "it's", Caption("It's a dog.")),
        # Nothing beyond the prefix, or nothing at all: no caption.
        ("", "", Caption("")),
        ("  .  ", "", Caption("")),
        ("arafed", "", Caption("")),
        ("a photography of", PREFIX, Caption("")),
        ("a photography of of of of", PREFIX, Caption("", degenerate=True)),
    ],
)
def test_clean_caption(decoded: str, prefix: str, expected: Caption) -> None:
    assert clean_caption(decoded, prefix) == expected


# -- construction and validation ------------------------------------------------------------------


def test_construction_loads_nothing(tmp_path: Path) -> None:
    task = CaptionTask(
        CaptionSettings(model="tiny/blip2-opt"),
        engine_settings(tmp_path),
        resolve_model=resolve_model,
    )
    assert task.name == "caption"
    assert list(tmp_path.iterdir()) == []
    assert "tiny/blip2-opt" in task.describe()


@pytest.mark.parametrize(
    "settings",
    [
        CaptionSettings(precision="fp8"),  # type: ignore[arg-type]
        CaptionSettings(min_new_tokens=40, max_new_tokens=30),
        CaptionSettings(max_new_tokens=0),
        CaptionSettings(num_beams=0),
    ],
)
def test_impossible_settings_fail_at_start_up(settings: CaptionSettings, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CaptionTask(settings, engine_settings(tmp_path), resolve_model=resolve_model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cuda"):
        CaptionTask(
            CaptionSettings(),
            EngineSettings(device="cuda", model_cache=tmp_path),
            resolve_model=resolve_model,
        )


def test_an_overlong_prefix_is_refused(loaded: Factory) -> None:
    task = loaded("tiny/blip-caption")
    task.validate(CaptionRequest(b"x", prefix="a" * 200))
    with pytest.raises(InvalidRequest, match="prefix"):
        task.validate(CaptionRequest(b"x", prefix="a" * 201))


def test_a_broken_upload_is_an_invalid_request(loaded: Factory) -> None:
    task = loaded("tiny/blip-caption")
    with pytest.raises(InvalidRequest, match=r"holiday\.jpg"):
        task.preprocess(CaptionRequest(imagekit.not_an_image(), name="holiday.jpg"))


def test_no_text_at_all_is_an_inference_failure(loaded: Factory) -> None:
    task = loaded("tiny/blip-caption")
    with pytest.raises(InferenceFailed, match="could not describe"):
        task.postprocess(GeneratedCaption(token_ids=(), prefix=""))


def test_unloadable_files_make_the_task_unavailable(tmp_path: Path) -> None:
    settings = CaptionSettings(model=str(tmp_path), precision="none")
    task = CaptionTask(settings, engine_settings(tmp_path), resolve_model=resolve_model)
    with pytest.raises(ModelUnavailable, match="cannot describe images") as caught:
        task.preprocess(CaptionRequest(pictures()[0]))
    # The operator is told which folder, and nothing is retried before a restart.
    assert str(tmp_path) in caught.value.cause and caught.value.retry_after_s is None


def test_a_blip2_processor_without_its_query_count_is_refused(
    model_cache: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "old-blip2"
    shutil.copytree(resolve_model("tiny/blip2-opt", model_cache), folder)
    processor_config = folder / "processor_config.json"
    document = json.loads(processor_config.read_text())
    del document["num_query_tokens"]
    processor_config.write_text(json.dumps(document))
    task = CaptionTask(
        CaptionSettings(model=str(folder)), engine_settings(tmp_path), resolve_model=resolve_model
    )
    with pytest.raises(TaskUnavailable) as caught:
        task.preprocess(CaptionRequest(pictures()[0], prefix=PREFIX))
    assert isinstance(caught.value.__cause__, ConfigError)
    assert "num_query_tokens" in str(caught.value.__cause__)


# -- the models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", CAPTIONERS)
def test_different_images_give_different_captions(loaded: Factory, model: str) -> None:
    captions = caption_all(loaded(model), pictures())
    assert len({c.text for c in captions}) == len(captions), captions


@pytest.mark.parametrize("model", CAPTIONERS)
def test_a_prefix_is_continued_and_still_depends_on_the_image(loaded: Factory, model: str) -> None:
    captions = caption_all(loaded(model), pictures(), prefix=PREFIX)
    assert all(c.text.startswith("A photography of") for c in captions), captions
    assert len({c.text for c in captions}) == len(captions), captions


def test_blip2_prompt_carries_one_image_token_per_query(loaded: Factory) -> None:
    # Without these tokens a prompted BLIP-2 generate silently ignores the image.
    task = loaded("tiny/blip2-opt")
    item = task.preprocess(CaptionRequest(pictures()[0], prefix=PREFIX))
    config = task._model.config
    image_tokens = int((item.inputs["input_ids"] == config.image_token_index).sum())
    assert image_tokens == config.num_query_tokens == 4


def test_the_request_prefix_overrides_the_configured_one(loaded: Factory) -> None:
    task = loaded("tiny/blip-caption", prefix="a picture of")
    image = pictures()[1]
    assert caption_all(task, [image])[0].text.startswith("A picture of")
    assert caption_all(task, [image], prefix=PREFIX)[0].text.startswith("A photography of")


def test_items_share_a_batch_only_with_the_same_prefix(loaded: Factory) -> None:
    task = loaded("tiny/blip2-opt")
    image = pictures()[0]
    plain, spaced, prefixed = (
        task.preprocess(CaptionRequest(image, prefix=p))
        for p in ("", "  a  photography of ", PREFIX)
    )
    assert task.batch_key(spaced) == task.batch_key(prefixed) != task.batch_key(plain)


@pytest.mark.parametrize("model", ["tiny/blip2-opt", "tiny/blip-caption"])
def test_a_batch_gives_each_image_its_own_caption(loaded: Factory, model: str) -> None:
    task = loaded(model)
    images = pictures()
    one_by_one = [caption_all(task, [image])[0] for image in images]
    assert caption_all(task, images) == one_by_one


def test_generation_settings_reach_generate(loaded: Factory) -> None:
    task = loaded("tiny/blip-caption", min_new_tokens=8, max_new_tokens=8, num_beams=2)
    [raw] = task.forward(task.sample(1))
    # BLIP returns its start token, then exactly the forced number of new tokens.
    assert len(raw.token_ids) == 1 + 8


def test_sample_gives_distinct_inputs_of_the_model_size(loaded: Factory) -> None:
    task = loaded("tiny/git")
    items = task.sample(3)
    pixels = [item.inputs["pixel_values"] for item in items]
    assert all(p.shape == (1, 3, 32, 32) for p in pixels)
    assert not torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[1], pixels[2])
    assert len(task.forward(items)) == 3


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("none", torch.float32),
        pytest.param("int8", torch.float32, marks=pytest.mark.filterwarnings(INT8_DEPRECATION)),
        ("bf16", torch.bfloat16),
    ],
)
@pytest.mark.parametrize("model", ["tiny/blip2-opt", "tiny/blip-caption"])
def test_each_cpu_precision_loads_and_captions(
    model: str, precision: str, dtype: torch.dtype, model_cache: Path
) -> None:
    settings = CaptionSettings(model=model, precision=precision, max_new_tokens=8)  # type: ignore[arg-type]
    task = CaptionTask(settings, engine_settings(model_cache), resolve_model=resolve_model)
    task.load()
    try:
        assert precision in task.describe()
        conv = next(m for m in task._model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.dtype == dtype
        if precision == "int8":
            quantized = torch.ao.nn.quantized.dynamic.Linear
            assert any(isinstance(m, quantized) for m in task._model.modules())
        captions = caption_all(task, pictures()[:2], prefix=PREFIX)
        assert all(c.text.startswith("A photography of") for c in captions)
    finally:
        task.unload()


def test_unload_frees_the_model_and_load_brings_it_back(model_cache: Path) -> None:
    settings = CaptionSettings(model="tiny/vit-gpt2", precision="none", max_new_tokens=6)
    task = CaptionTask(settings, engine_settings(model_cache), resolve_model=resolve_model)
    task.load()
    before = caption_all(task, pictures()[:1])
    task.unload()
    with pytest.raises(RuntimeError, match="before load"):
        task.forward(task.sample(1))
    task.load()
    assert caption_all(task, pictures()[:1]) == before


# -- through the engine -------------------------------------------------------------------------


async def test_the_engine_batches_captions_by_prefix(model_cache: Path) -> None:
    settings = CaptionSettings(
        model="tiny/blip2-opt",
        precision="none",
        max_new_tokens=10,
        batching=BatchSettings(batch_size=4, max_wait_ms=50),
    )
    task = CaptionTask(settings, engine_settings(model_cache), resolve_model=resolve_model)
    images = pictures()
    async with Engine({"caption": task}, engine_settings(model_cache)) as engine:
        plain = [engine.run("caption", CaptionRequest(image)) for image in images]
        prefixed = [engine.run("caption", CaptionRequest(image, prefix=PREFIX)) for image in images]
        outcomes = await asyncio.gather(*plain, *prefixed)
        bad = await asyncio.gather(
            engine.run("caption", CaptionRequest(imagekit.truncated_png(), name="cut.png")),
            return_exceptions=True,
        )
    captions = [outcome.value for outcome in outcomes]
    assert all(isinstance(c, Caption) and c.text for c in captions)
    assert len({c.text for c in captions[:4]}) == 4
    assert all(c.text.startswith("A photography of") for c in captions[4:])
    assert not any(c.text.startswith("A photography of") for c in captions[:4])
    assert isinstance(bad[0], InvalidRequest)
