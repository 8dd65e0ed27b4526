"""The vqa task on tiny BLIP VQA and BLIP-2 models, its batching, and its answer rules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoProcessor, BlipForQuestionAnswering

from core.engine import Engine
from core.errors import (
    ConfigError,
    InferenceFailed,
    InvalidRequest,
    ModelUnavailable,
)
from core.settings import BatchSettings, EngineSettings, VqaSettings
from core.tasks.vqa import GeneratedAnswer, PreparedQuestion, VqaTask, clean_answer
from core.tiny import resolve_model
from core.tiny.vqa import blip_vqa_base_parts
from core.types import Answer, AskRequest
from tests import imagekit

pytestmark = pytest.mark.usefixtures("single_torch_thread")

BLIP2_PROMPT = "Question: {question} Answer:"
# torch.ao's dynamic int8 (the CPU int8 path) is deprecated in torch; _runtime calls it.
INT8_DEPRECATION = "ignore:torch.ao.quantization is deprecated:DeprecationWarning"
# Short and long, so a batch of them needs padding.
QUESTIONS = (
    "What is in the picture?",
    "How many cats are sitting on the red couch by the window?",
    "What colour is it?",
    "Is it raining?",
)


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


Factory = Callable[..., VqaTask]


@pytest.fixture(scope="module")
def loaded(model_cache: Path) -> Factory:
    """Loaded tasks, one per distinct configuration, shared by the module."""
    tasks: dict[tuple[Any, ...], VqaTask] = {}

    def get(model: str, **overrides: Any) -> VqaTask:
        key = (model, *sorted(overrides.items()))
        if key not in tasks:
            settings = VqaSettings(model=model, precision="none", **overrides)
            task = VqaTask(settings, engine_settings(model_cache), resolve_model=resolve_model)
            task.load()
            tasks[key] = task
        return tasks[key]

    return get


def ask_all(task: VqaTask, asks: Sequence[tuple[bytes, str]]) -> list[str]:
    """Answers of one batched forward."""
    prepared = [task.preprocess(AskRequest(image, question)) for image, question in asks]
    return [task.postprocess(raw).text for raw in task.forward(prepared)]


# -- answer text rules (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoded", "prompt", "expected"),
    [
        ("two", "", "Two"),
        ("  yes . ", "", "Yes"),
        ("a red car", "", "A red car"),
        ('"on the table"', "", "On the table"),
        ("two\ufffd\x11", "", "Two"),
        ("", "", ""),
        (" ? ", "", ""),
        # BLIP-2 running on into a new turn of its prompt is cut there.
        ("two Question: what is the dog doing? Answer: sleeping", BLIP2_PROMPT, "Two"),
        ("a cat\nQuestion: is it", BLIP2_PROMPT, "A cat"),
        ("Answer: blue", BLIP2_PROMPT, "Blue"),
        (" answer: blue answer: red", BLIP2_PROMPT, "Blue"),
        ("Question: what", BLIP2_PROMPT, ""),
        # Another template's markers are the ones that count.
        ("two Q: why", "Q: {question} A:", "Two"),
        ("A: two", "Q: {question} A:", "Two"),
        # Without a prompt the words are ordinary.
        ("question: answer", "", "Question: answer"),
        # A looping answer is cut back to one occurrence.
        ("street street street street street", "", "Street"),
        ("two dogs two dogs two dogs", "", "Two dogs"),
    ],
)
def test_clean_answer(decoded: str, prompt: str, expected: str) -> None:
    assert clean_answer(decoded, prompt) == expected


# -- construction and validation ------------------------------------------------------------------


def test_construction_loads_nothing(tmp_path: Path) -> None:
    task = VqaTask(
        VqaSettings(model="tiny/blip-vqa"), engine_settings(tmp_path), resolve_model=resolve_model
    )
    assert task.name == "vqa"
    assert task.memory_bytes() == 0
    assert list(tmp_path.iterdir()) == []
    assert "tiny/blip-vqa" in task.describe()


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (VqaSettings(precision="fp8"), "precision"),  # type: ignore[arg-type]
        (VqaSettings(max_new_tokens=0), "max_new_tokens"),
        (VqaSettings(min_new_tokens=13, max_new_tokens=12), "min_new_tokens"),
        (VqaSettings(min_new_tokens=-1), "min_new_tokens"),
        (VqaSettings(num_beams=0), "num_beams"),
        (VqaSettings(max_question_chars=0), "max_question_chars"),
        (VqaSettings(prompt="Answer this:"), "prompt"),
        (VqaSettings(prompt="Q: {question} about {image} A:"), "prompt"),
        (VqaSettings(prompt="Q: {question} A: {"), "prompt"),
    ],
)
def test_impossible_settings_fail_at_start_up(
    settings: VqaSettings, key: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=key):
        VqaTask(settings, engine_settings(tmp_path), resolve_model=resolve_model)


@pytest.mark.parametrize(
    ("question", "reason"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("why " * 80, "longer than 300 characters"),
    ],
)
def test_unanswerable_questions_are_refused_with_a_reason(
    question: str, reason: str, tmp_path: Path
) -> None:
    task = VqaTask(
        VqaSettings(model="tiny/blip-vqa"), engine_settings(tmp_path), resolve_model=resolve_model
    )
    with pytest.raises(InvalidRequest, match=reason) as caught:
        task.validate(AskRequest(pictures()[0], question))
    assert "\n" not in str(caught.value)


def test_the_question_limit_counts_normalised_characters(tmp_path: Path) -> None:
    task = VqaTask(
        VqaSettings(max_question_chars=20), engine_settings(tmp_path), resolve_model=resolve_model
    )
    task.validate(AskRequest(pictures()[0], "  " + "a" * 20 + "  \n"))
    task.validate(AskRequest(pictures()[0], "how   many\n\ndogs?"))
    with pytest.raises(InvalidRequest, match="20 characters"):
        task.validate(AskRequest(pictures()[0], "a" * 21))


def test_an_empty_upload_is_refused_on_the_loop(tmp_path: Path) -> None:
    task = VqaTask(VqaSettings(), engine_settings(tmp_path), resolve_model=resolve_model)
    with pytest.raises(InvalidRequest, match=r"photo\.png is empty"):
        task.validate(AskRequest(b"", "What is this?", name="photo.png"))


def test_a_broken_upload_is_an_invalid_request(loaded: Factory) -> None:
    task = loaded("tiny/blip-vqa")
    with pytest.raises(InvalidRequest, match=r"holiday\.jpg"):
        task.preprocess(AskRequest(imagekit.not_an_image(), "What?", name="holiday.jpg"))


def test_a_checkpoint_that_cannot_answer_makes_the_task_unavailable(model_cache: Path) -> None:
    task = VqaTask(
        VqaSettings(model="tiny/git"), engine_settings(model_cache), resolve_model=resolve_model
    )
    with pytest.raises(ModelUnavailable, match="cannot answer questions") as caught:
        task.preprocess(AskRequest(pictures()[0], "What is it?"))
    assert "'git'" in caught.value.cause and caught.value.retry_after_s is None


def test_no_answer_at_all_is_an_inference_failure(loaded: Factory) -> None:
    task = loaded("tiny/blip-vqa")
    with pytest.raises(InferenceFailed, match="could not answer"):
        task.postprocess(GeneratedAnswer(token_ids=()))


# -- BLIP VQA -------------------------------------------------------------------------------------


def test_different_images_give_different_answers(loaded: Factory) -> None:
    task = loaded("tiny/blip-vqa")
    for question in QUESTIONS:
        answers = ask_all(task, [(image, question) for image in pictures()])
        assert all(answers), answers
        assert len(set(answers)) == len(answers), (question, answers)


def test_different_questions_give_different_answers(loaded: Factory) -> None:
    task = loaded("tiny/blip-vqa")
    for image in pictures()[1:]:  # a flat red square leaves little to ask about
        answers = ask_all(task, [(image, question) for question in QUESTIONS])
        assert len(set(answers)) > 1, answers


def test_a_padded_batch_answers_each_question_as_if_alone(loaded: Factory) -> None:
    task = loaded("tiny/blip-vqa")
    asks = [(image, question) for image in pictures() for question in QUESTIONS]
    prepared = [task.preprocess(AskRequest(image, question)) for image, question in asks]
    assert len({len(item.input_ids) for item in prepared}) > 1  # padding is needed
    batched = task.forward(prepared)
    assert batched == [task.forward([item])[0] for item in prepared]


def test_the_answer_decoder_honours_the_question_mask(loaded: Factory) -> None:
    # Without load()'s hook transformers drops this mask and padding leaks into answers.
    model = loaded("tiny/blip-vqa")._model
    generator = torch.Generator().manual_seed(0)
    question = torch.randn(1, 6, 32, generator=generator)
    start = torch.tensor([[model.config.text_config.bos_token_id]])
    with torch.inference_mode():
        masked, full = (
            model.text_decoder(
                input_ids=start,
                encoder_hidden_states=question,
                encoder_attention_mask=torch.tensor([mask]),
            ).logits
            for mask in ([1, 1, 1, 0, 0, 0], [1] * 6)
        )
        trimmed = model.text_decoder(input_ids=start, encoder_hidden_states=question[:, :3]).logits
    assert torch.allclose(masked, trimmed, atol=1e-5)
    assert not torch.allclose(masked, full, atol=1e-3)


@pytest.mark.parametrize("model", ["tiny/blip-vqa", "tiny/blip2-opt"])
def test_generation_settings_reach_generate(loaded: Factory, model: str) -> None:
    task = loaded(model, max_new_tokens=3, num_beams=2)
    raws = task.forward(task.sample(4))
    assert len(raws) == 4
    assert all(0 < len(raw.token_ids) <= 3 for raw in raws)
    # Benchmarks force a fixed length; answers never count the prompt or start token.
    forced = loaded(model, min_new_tokens=5, max_new_tokens=5)
    assert [len(raw.token_ids) for raw in forced.forward(forced.sample(3))] == [5, 5, 5]


def test_sample_gives_varied_questions_of_the_model_size(loaded: Factory) -> None:
    task = loaded("tiny/blip-vqa")
    items: list[PreparedQuestion] = task.sample(4)
    assert all(item.pixel_values.shape == (1, 3, 32, 32) for item in items)
    assert len({item.input_ids for item in items}) == 4
    assert len({len(item.input_ids) for item in items}) > 1
    assert not torch.equal(items[0].pixel_values, items[1].pixel_values)


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        pytest.param("int8", torch.float32, marks=pytest.mark.filterwarnings(INT8_DEPRECATION)),
        ("bf16", torch.bfloat16),
    ],
)
def test_other_cpu_precisions_load_and_answer(
    precision: str, dtype: torch.dtype, model_cache: Path
) -> None:
    settings = VqaSettings(model="tiny/blip-vqa", precision=precision, max_new_tokens=6)  # type: ignore[arg-type]
    task = VqaTask(settings, engine_settings(model_cache), resolve_model=resolve_model)
    task.load()
    try:
        assert precision in task.describe()
        conv = next(m for m in task._model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.dtype == dtype
        if precision == "int8":
            quantized = torch.ao.nn.quantized.dynamic.Linear
            assert any(isinstance(m, quantized) for m in task._model.modules())
        answers = ask_all(task, list(zip(pictures(), QUESTIONS, strict=True)))
        assert all(answers)
    finally:
        task.unload()


@pytest.mark.filterwarnings(INT8_DEPRECATION)
def test_memory_is_measured_per_precision_and_freed(model_cache: Path) -> None:
    sizes = {}
    for precision in ("none", "bf16", "int8"):
        settings = VqaSettings(model="tiny/blip-vqa", precision=precision)
        task = VqaTask(settings, engine_settings(model_cache), resolve_model=resolve_model)
        assert task.memory_bytes() == 0
        task.load()
        sizes[precision] = task.memory_bytes()
        task.unload()
        assert task.memory_bytes() == 0
    # bf16 halves every fp32 tensor; int8 quarters the Linear weights only.
    assert sizes["bf16"] == sizes["none"] // 2
    assert sizes["int8"] < sizes["none"]


def test_unload_frees_the_model_and_load_brings_it_back(model_cache: Path) -> None:
    task = VqaTask(
        VqaSettings(model="tiny/blip-vqa", precision="none"),
        engine_settings(model_cache),
        resolve_model=resolve_model,
    )
    task.load()
    before = ask_all(task, [(pictures()[1], QUESTIONS[0])])
    task.unload()
    with pytest.raises(RuntimeError, match="before load"):
        task.forward(task.sample(1))
    task.load()
    assert ask_all(task, [(pictures()[1], QUESTIONS[0])]) == before


def test_the_tiny_checkpoint_is_small_reproducible_and_consistent(tmp_path: Path) -> None:
    one, two = (Path(resolve_model("tiny/blip-vqa", tmp_path / name)) for name in "ab")
    for file in one.iterdir():
        assert file.read_bytes() == (two / file.name).read_bytes(), file.name
    assert sum(f.stat().st_size for f in one.iterdir()) < 1_000_000
    config = AutoConfig.from_pretrained(one)
    tokenizer = AutoProcessor.from_pretrained(one).tokenizer
    text = config.text_config
    assert text.encoder_hidden_size == config.vision_config.hidden_size
    assert text.bos_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    assert text.sep_token_id == text.eos_token_id == tokenizer.sep_token_id
    assert text.vocab_size == len(tokenizer)


def test_real_size_blip_vqa_base_has_the_real_models_shapes() -> None:
    config, processor = blip_vqa_base_parts()
    with torch.device("meta"):  # shapes only: nothing allocated, nothing saved
        model = BlipForQuestionAnswering(config)
    assert model.num_parameters() == 361_230_140
    # The hub lists 385 M: its count includes the LM head tied to the decoder's embeddings.
    assert sum(t.numel() for t in model.state_dict().values()) == 384_703_096
    text = config.text_config
    assert (text.encoder_hidden_size, config.vision_config.hidden_size) == (768, 768)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == text.vocab_size == 30524
    assert (tokenizer.pad_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id) == (
        text.pad_token_id,
        text.sep_token_id,
        text.bos_token_id,
    )
    assert (text.bos_token_id, text.sep_token_id, text.eos_token_id) == (30522, 102, 102)
    assert processor.image_processor.size.height == config.vision_config.image_size == 384


# -- BLIP-2 prompted ----------------------------------------------------------------------------


def test_blip2_answers_and_different_images_change_the_answer(loaded: Factory) -> None:
    task = loaded("tiny/blip2-opt")
    for question in QUESTIONS[:2]:
        answers = ask_all(task, [(image, question) for image in pictures()])
        assert all(answers), answers
        assert len(set(answers)) == len(answers), (question, answers)


def test_blip2_answers_exclude_the_prompt(loaded: Factory) -> None:
    task = loaded("tiny/blip2-opt")
    item = task.preprocess(AskRequest(pictures()[1], QUESTIONS[1]))
    config = task._model.config
    # One <image> token per query, or a prompted generate silently ignores the image.
    assert item.input_ids.count(config.image_token_index) == config.num_query_tokens == 4
    tokenizer = task._processing().processor.tokenizer
    assert tokenizer.decode(item.input_ids, skip_special_tokens=True).endswith(
        "Question: How many cats are sitting on the red couch by the window? Answer:"
    )
    [raw] = task.forward([item])
    assert 0 < len(raw.token_ids) <= task._settings.max_new_tokens
    assert config.image_token_index not in raw.token_ids


def test_blip2_left_padding_answers_each_question_as_if_alone(loaded: Factory) -> None:
    task = loaded("tiny/blip2-opt")
    asks = [(image, question) for image in pictures()[1:3] for question in QUESTIONS]
    prepared = [task.preprocess(AskRequest(image, question)) for image, question in asks]
    assert len({len(item.input_ids) for item in prepared}) > 1
    assert task.forward(prepared) == [task.forward([item])[0] for item in prepared]


# -- through the engine --------------------------------------------------------------------------


class RecordingVqa(VqaTask):
    """The real task, noting the size of every batch it runs."""

    def __init__(self, settings: VqaSettings, engine: EngineSettings) -> None:
        super().__init__(settings, engine, resolve_model=resolve_model)
        self.batches: list[int] = []

    def forward(self, batch: Sequence[PreparedQuestion]) -> list[GeneratedAnswer]:
        self.batches.append(len(batch))
        return super().forward(batch)


async def test_the_engine_batches_concurrent_asks(loaded: Factory, model_cache: Path) -> None:
    asks = [(image, question) for image in pictures() for question in QUESTIONS[:2]]
    alone = [ask_all(loaded("tiny/blip-vqa"), [ask])[0] for ask in asks]
    settings = VqaSettings(
        model="tiny/blip-vqa",
        precision="none",
        batching=BatchSettings(batch_size=4, max_wait_ms=200),
    )
    task = RecordingVqa(settings, engine_settings(model_cache))
    async with Engine({"vqa": task}, engine_settings(model_cache)) as engine:
        await engine.ensure_loaded("vqa")
        task.batches.clear()
        outcomes = await asyncio.gather(
            *(engine.run("vqa", AskRequest(image, question)) for image, question in asks)
        )
        refused = await asyncio.gather(
            engine.run("vqa", AskRequest(pictures()[0], "  ")),
            engine.run("vqa", AskRequest(imagekit.truncated_png(), "What?", name="cut.png")),
            return_exceptions=True,
        )
    answers = [outcome.value for outcome in outcomes]
    assert all(isinstance(answer, Answer) and answer.text for answer in answers)
    assert sorted(task.batches) == [4, 4]
    # Batching changed nothing: each answer is the one the question gets alone.
    assert [a.text for a in answers] == alone
    assert all(isinstance(error, InvalidRequest) for error in refused)
