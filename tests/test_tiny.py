"""The local model builders: cached, atomic, reproducible and loadable like hub models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoProcessor,
    AutoTokenizer,
    BlipForConditionalGeneration,
)

from core import tiny
from core.errors import ConfigError
from core.tiny import captioners, resolve_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CAPTIONERS = ("tiny/blip2-opt", "tiny/blip-caption", "tiny/git", "tiny/vit-gpt2")


@pytest.mark.parametrize(
    "model",
    [
        "Salesforce/blip-image-captioning-base",
        "fabiochiu/t5-base-tag-generation",
        "/srv/models/my-blip",
        "tinyllama/TinyLlama-1.1B",  # an owner that merely starts with "tiny"
    ],
)
def test_hub_ids_and_folders_pass_through_unchanged(model: str, tmp_path: Path) -> None:
    assert resolve_model(model, tmp_path) == model
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_local_model_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tiny/blip2-opt"):
        resolve_model("tiny/nope", tmp_path)


BUILDS: list[Path] = []


def counting_build(folder: Path) -> None:
    BUILDS.append(folder)
    captioners.build_t5_tags(folder)


def crashing_build(folder: Path) -> None:
    (folder / "config.json").write_text("{}")
    raise RuntimeError("disk full")


def test_a_build_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    BUILDS.clear()
    monkeypatch.setitem(tiny._BUILDERS, "tiny/t5-tags", f"{__name__}:counting_build")
    first = resolve_model("tiny/t5-tags", tmp_path)
    second = resolve_model("tiny/t5-tags", tmp_path)
    assert first == second
    assert len(BUILDS) == 1
    # Only the finished folder is left: the staging folder was renamed into place.
    assert [p.name for p in tmp_path.iterdir()] == [Path(first).name]


def test_a_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(tiny._BUILDERS, "tiny/t5-tags", f"{__name__}:crashing_build")
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model("tiny/t5-tags", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_builds_are_reproducible_and_leave_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    one = Path(resolve_model("tiny/blip-caption", tmp_path / "one"))
    two = Path(resolve_model("tiny/blip-caption", tmp_path / "two"))
    assert torch.equal(torch.rand(1), expected_next)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.parametrize("kind", CAPTIONERS)
def test_captioners_load_through_the_auto_classes(kind: str, tmp_path: Path) -> None:
    started = time.perf_counter()
    folder = Path(resolve_model(kind, tmp_path))
    assert time.perf_counter() - started < 1.0
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.num_parameters() < 200_000
    if AutoConfig.from_pretrained(folder).model_type != "vision-encoder-decoder":
        processor = AutoProcessor.from_pretrained(folder)
        assert processor.tokenizer is not None and processor.image_processor is not None


def test_the_tag_model_loads_through_the_auto_classes(model_cache: Path) -> None:
    folder = resolve_model("tiny/t5-tags", model_cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    ids = tokenizer("a cat on a red couch").input_ids
    assert ids[-1] == tokenizer.eos_token_id == model.config.eos_token_id
    assert model.config.vocab_size == len(tokenizer)


def test_blip2_processor_and_config_agree_on_the_image_tokens(model_cache: Path) -> None:
    folder = resolve_model("tiny/blip2-opt", model_cache)
    processor = AutoProcessor.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    assert processor.num_query_tokens == config.num_query_tokens == 4
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    assert config.text_config.vocab_size == len(processor.tokenizer)


def test_random_blip_base_has_the_real_models_shapes() -> None:
    config, processor = captioners._blip_base_parts()
    with torch.device("meta"):  # shapes only: nothing allocated, nothing saved
        model = BlipForConditionalGeneration(config)
    assert model.num_parameters() == 223_971_644
    tokenizer = processor.tokenizer
    assert len(tokenizer) == config.text_config.vocab_size == 30524
    assert (tokenizer.pad_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id) == (
        0,
        102,
        30522,
    )
    assert processor.image_processor.size.height == config.vision_config.image_size == 384
