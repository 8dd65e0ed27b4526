"""Kosmos-2 in the caption task: its own grounding prompt, clean text and grounded entities."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from core.engine import Engine
from core.settings import BatchSettings, CaptionSettings, EngineSettings
from core.tasks.caption import CaptionTask, GeneratedCaption, RawEntity, grounded_caption
from core.tiny import resolve_model
from core.types import Caption, CaptionRequest, Entity
from tests import imagekit

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MODEL = "tiny/kosmos2"
PREFIX = "a photography of"
INT8_DEPRECATION = "ignore:torch.ao.quantization is deprecated:DeprecationWarning"
# The example of Kosmos2Processor.post_process_generation's documentation.
SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>"
    "<patch_index_0863></object> warming himself by<phrase> a fire</phrase><object>"
    "<patch_index_0005><patch_index_0911></object>."
)
SNOWMAN_BOX = (0.390625, 0.046875, 0.984375, 0.828125)
FIRE_BOX = (0.171875, 0.015625, 0.484375, 0.890625)


def pictures() -> list[bytes]:
    """Four clearly different uploads."""
    return [
        imagekit.encode(imagekit.solid((64, 48), "red")),
        imagekit.encode(imagekit.corner_marked((64, 48), mark="blue", background="yellow")),
        imagekit.encode(imagekit.noise((64, 48), seed=3)),
        imagekit.encode(imagekit.text_image("OPEN", (64, 48), font_size=20), "JPEG"),
    ]


def engine_settings(cache: Path) -> EngineSettings:
    return EngineSettings(device="cpu", model_cache=cache, forward_timeout_s=60)


def kosmos_settings(**overrides: object) -> CaptionSettings:
    fields: dict[str, object] = {"model": MODEL, "precision": "none", "max_new_tokens": 128}
    return CaptionSettings(**{**fields, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def task(model_cache: Path) -> CaptionTask:
    loaded = CaptionTask(
        kosmos_settings(), engine_settings(model_cache), resolve_model=resolve_model
    )
    loaded.load()
    return loaded


def caption_all(task: CaptionTask, images: Sequence[bytes], prefix: str = "") -> list[Caption]:
    prepared = [task.preprocess(CaptionRequest(image, prefix=prefix)) for image in images]
    return [task.postprocess(raw) for raw in task.forward(prepared)]


def assert_well_formed(caption: Caption) -> None:
    assert "<" not in caption.text, caption  # no grounding tag survives
    for entity in caption.entities:
        start, end = entity.span
        assert 0 <= start < end <= len(caption.text)
        assert caption.text[start:end] == entity.text
        assert entity.boxes
        for x0, y0, x1, y1 in entity.boxes:
            assert 0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0


# -- grounded captions (pure) ---------------------------------------------------------------------


def snowman_entities(shift: int = 0) -> list[RawEntity]:
    """What post_process_generation gives for SNOWMAN (spans in "An image of a snowman …")."""
    return [
        ("a snowman", (12 + shift, 21 + shift), [SNOWMAN_BOX]),
        ("a fire", (41 + shift, 47 + shift), [FIRE_BOX]),
    ]


def test_the_lead_in_is_dropped_and_the_entities_follow_the_text() -> None:
    caption = grounded_caption(
        "An image of a snowman warming himself by a fire.", snowman_entities()
    )
    assert caption == Caption(
        "A snowman warming himself by a fire.",
        entities=(
            Entity("A snowman", (0, 9), (SNOWMAN_BOX,)),
            Entity("a fire", (29, 35), (FIRE_BOX,)),
        ),
    )


def test_a_prefix_replaces_the_lead_in_and_is_kept() -> None:
    text = "a photography of a snowman warming himself by a fire"
    caption = grounded_caption(text, snowman_entities(shift=5), PREFIX)
    assert caption.text == "A photography of a snowman warming himself by a fire."
    assert [(e.text, e.span) for e in caption.entities] == [
        ("a snowman", (17, 26)),
        ("a fire", (46, 52)),
    ]


def test_a_repeated_phrase_keeps_the_occurrence_that_was_grounded() -> None:
    text = "An image of a dog next to a dog"
    caption = grounded_caption(text, [("a dog", (26, 31), [(0.1, 0.2, 0.3, 0.4)])])
    assert caption.text == "A dog next to a dog."
    assert [e.span for e in caption.entities] == [(14, 19)]


def test_phrases_without_words_boxes_or_place_are_dropped() -> None:
    text = "An image of a cat on a mat"
    entities: list[RawEntity] = [
        # Kosmos-2's name for a box that belongs to no phrase.
        ("<patch_index_0044><patch_index_0863>", (11, 11), [SNOWMAN_BOX]),
        ("a cat", (12, 17), []),
        # Part of the lead-in, which the caption no longer has.
        ("An image", (0, 8), [FIRE_BOX]),
        ("a mat", (21, 26), [FIRE_BOX]),
    ]
    caption = grounded_caption(text, entities)
    assert caption.text == "A cat on a mat."
    assert caption.entities == (Entity("a mat", (9, 14), (FIRE_BOX,)),)


def test_boxes_are_put_in_order_and_inside_the_image() -> None:
    text = "An image of a dog"
    caption = grounded_caption(text, [("a dog", (12, 17), [(0.75, 0.5, 0.25, 1.25)])])
    assert caption.entities[0].boxes == ((0.25, 0.5, 0.75, 1.0),)


def test_the_caption_rules_still_apply_and_entities_survive_them() -> None:
    text = "An image of a dog dog dog on the beach,"
    caption = grounded_caption(text, [("the beach", (29, 38), [SNOWMAN_BOX])])
    assert caption.text == "A dog on the beach."
    assert caption.degenerate
    assert caption.entities == (Entity("the beach", (9, 18), (SNOWMAN_BOX,)),)


@pytest.mark.parametrize(("text", "prefix"), [("An image of", ""), ("An image of.", ""), ("", "")])
def test_nothing_beyond_the_lead_in_is_no_caption(text: str, prefix: str) -> None:
    assert grounded_caption(text, [("An image", (0, 8), [SNOWMAN_BOX])], prefix) == Caption("")


# -- the tiny model ------------------------------------------------------------------------------


def test_the_tiny_checkpoint_has_what_the_processor_needs(tmp_path: Path) -> None:
    folder, again = (Path(resolve_model(MODEL, tmp_path / name)) for name in "ab")
    for file in folder.iterdir():
        assert file.read_bytes() == (again / file.name).read_bytes(), file.name
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000
    config = AutoConfig.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    assert config.model_type == "kosmos-2"
    assert config.text_config.vocab_size == len(tokenizer)
    for tag in ("<grounding>", "<phrase>", "</phrase>", "<object>", "</object>", "</image>"):
        assert tokenizer.convert_tokens_to_ids(tag) != tokenizer.unk_token_id, tag
    patches = [f"<patch_index_{i:04d}>" for i in (0, 1023)]
    assert tokenizer.unk_token_id not in tokenizer.convert_tokens_to_ids(patches)
    # The image's 64 places are written as the ids after <unk>: ordinary pieces.
    first = tokenizer.unk_token_id + 1
    image_ids = range(first, first + config.latent_query_num)
    assert not set(image_ids) & set(tokenizer.all_special_ids)


def test_the_prompt_is_kosmos_own_unless_a_prefix_replaces_its_lead_in(
    task: CaptionTask,
) -> None:
    tokenizer = task._processing().tokenizer
    plain = task.preprocess(CaptionRequest(pictures()[0]))
    prefixed = task.preprocess(CaptionRequest(pictures()[0], prefix=PREFIX))
    for item, ending in (
        (plain, "<grounding> An image of"),
        (prefixed, "<grounding> a photography of"),
    ):
        ids = item.inputs["input_ids"][0].tolist()
        assert tokenizer.decode(ids, skip_special_tokens=True).endswith(ending)
        assert int(item.inputs["image_embeds_position_mask"].sum()) == 64
    assert task.batch_key(plain) != task.batch_key(prefixed)


def test_a_grounded_generation_becomes_text_and_entities(task: CaptionTask) -> None:
    # The decode and post-processing path, on token ids as generate returns them.
    tokenizer = task._processing().tokenizer
    ids = tokenizer("</image>" + SNOWMAN, add_special_tokens=False).input_ids
    caption = task.postprocess(GeneratedCaption(tuple(ids), prefix=""))
    assert caption == grounded_caption(
        "An image of a snowman warming himself by a fire.", snowman_entities()
    )
    assert_well_formed(caption)


def test_different_images_give_different_captions(task: CaptionTask) -> None:
    for prefix in ("", PREFIX):
        captions = caption_all(task, pictures(), prefix)
        assert len({c.text for c in captions}) == len(captions), captions
        for caption in captions:
            assert_well_formed(caption)
            assert not caption.text.lower().startswith("an image of")
            assert caption.text.startswith("A photography of") == bool(prefix)


def test_raw_generations_carry_tags_that_the_caption_does_not(task: CaptionTask) -> None:
    [raw] = task.forward([task.preprocess(CaptionRequest(pictures()[2]))])
    tokenizer = task._processing().tokenizer
    assert "<patch_index_" in tokenizer.decode(list(raw.token_ids), skip_special_tokens=True)
    assert_well_formed(task.postprocess(raw))


def test_a_batch_gives_each_image_its_own_caption(task: CaptionTask) -> None:
    images = pictures()
    assert caption_all(task, images) == [caption_all(task, [image])[0] for image in images]


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        pytest.param("int8", torch.float32, marks=pytest.mark.filterwarnings(INT8_DEPRECATION)),
        ("bf16", torch.bfloat16),
    ],
)
def test_other_cpu_precisions_load_and_caption(
    precision: str, dtype: torch.dtype, model_cache: Path
) -> None:
    task = CaptionTask(
        kosmos_settings(precision=precision, max_new_tokens=16),
        engine_settings(model_cache),
        resolve_model=resolve_model,
    )
    assert task.memory_bytes() == 0
    task.load()
    try:
        conv = next(m for m in task._model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.dtype == dtype
        assert task.memory_bytes() > 0
        for caption in caption_all(task, pictures()[:2]):
            assert caption.text
            assert_well_formed(caption)
    finally:
        task.unload()
    assert task.memory_bytes() == 0


async def test_the_engine_captions_with_kosmos(model_cache: Path) -> None:
    settings = kosmos_settings(batching=BatchSettings(batch_size=4, max_wait_ms=200))
    task = CaptionTask(settings, engine_settings(model_cache), resolve_model=resolve_model)
    async with Engine({"caption": task}, engine_settings(model_cache)) as engine:
        outcomes = await asyncio.gather(
            *(engine.run("caption", CaptionRequest(image)) for image in pictures())
        )
    captions = [outcome.value for outcome in outcomes]
    assert all(isinstance(c, Caption) and c.text for c in captions)
    assert len({c.text for c in captions}) == 4
    for caption in captions:
        assert_well_formed(caption)
