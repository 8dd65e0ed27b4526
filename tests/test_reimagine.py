"""The reimagine task on a tiny real-architecture Stable Diffusion: txt2img and img2img."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel

from core.engine import Engine, Outcome, Partial
from core.errors import (
    ConfigError,
    ContentFlagged,
    InferenceFailed,
    InvalidRequest,
    ModelUnavailable,
)
from core.settings import BatchSettings, EngineSettings, ReimagineSettings
from core.streams import Stream
from core.tasks.reimagine import FLAGGED_MESSAGE, RawImage, ReimagineTask, fit_size
from core.tiny import diffusion, resolve_model
from core.types import GeneratedImage, ReimagineRequest, StepProgress
from tests import imagekit

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE = 128
STEPS = 4

Factory = Callable[..., ReimagineTask]


def engine_settings(cache: Path) -> EngineSettings:
    return EngineSettings(device="cpu", model_cache=cache, forward_timeout_s=60)


def reimagine_settings(**overrides: Any) -> ReimagineSettings:
    values: dict[str, Any] = {
        "model": "tiny/stable-diffusion",
        "precision": "none",
        "size": SIZE,
        "steps": STEPS,
        "strength": 0.5,
        "safety_checker": False,
        **overrides,
    }
    return ReimagineSettings(**values)


@pytest.fixture(scope="module")
def make_task(model_cache: Path) -> Factory:
    def make(**overrides: Any) -> ReimagineTask:
        return ReimagineTask(
            reimagine_settings(**overrides),
            engine_settings(model_cache),
            resolve_model=resolve_model,
        )

    return make


@pytest.fixture(scope="module")
def task(make_task: Factory) -> Iterator[ReimagineTask]:
    loaded = make_task()
    loaded.load()
    yield loaded
    loaded.unload()


def generate(task: ReimagineTask, *requests: ReimagineRequest) -> list[GeneratedImage]:
    """One forward for all ``requests`` (they must share a batch key), as the engine does."""
    for request in requests:
        task.validate(request)
    prepared = [task.preprocess(request) for request in requests]
    assert len({task.batch_key(item) for item in prepared}) == 1
    return [task.postprocess(raw) for raw in task.forward(prepared)]


def picture(size: tuple[int, int]) -> bytes:
    return imagekit.encode(imagekit.noise(size, seed=sum(size)))


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data), formats=["PNG"])
    image.load()
    return image.size


def pixels(data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data), formats=["PNG"]).convert("RGB")
    return torch.tensor(numpy.asarray(image), dtype=torch.int16)


@contextlib.contextmanager
def forward_hook(module: torch.nn.Module, hook: Callable[..., None]) -> Iterator[None]:
    """Instrument a real module (count calls, record batch sizes) for one block."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -- sizes (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "longest", "expected"),
    [
        ((1000, 667), 512, (512, 336)),
        ((667, 1000), 512, (336, 512)),
        ((512, 512), 512, (512, 512)),
        ((100, 75), 512, (512, 384)),  # small uploads are scaled up, never padded
        ((150, 100), 128, (128, 80)),
        ((4000, 500), 512, (512, 64)),
    ],
)
def test_sizes_keep_the_aspect_ratio_in_multiples_of_8(
    size: tuple[int, int], longest: int, expected: tuple[int, int]
) -> None:
    assert fit_size(*size, longest) == expected


@pytest.mark.parametrize(
    ("size", "longest", "expected"),
    [
        ((4000, 400), 512, (640, 64)),
        ((400, 4000), 512, (64, 640)),
        ((160, 8), 128, (1280, 64)),  # 20:1, the longest strip decode_image accepts
        ((1414, 28_280), 512, (64, 1280)),
    ],
)
def test_an_image_too_narrow_for_the_size_keeps_its_shape_64_pixels_across(
    size: tuple[int, int], longest: int, expected: tuple[int, int]
) -> None:
    assert fit_size(*size, longest) == expected


# -- generation ------------------------------------------------------------------------------


def test_txt2img_makes_a_png_of_the_configured_size(task: ReimagineTask) -> None:
    (result,) = generate(task, ReimagineRequest("a red bicycle"))
    assert png_size(result.png) == (result.width, result.height) == (SIZE, SIZE)
    assert result.steps == STEPS
    assert 0 <= result.seed < 2**32


@pytest.mark.parametrize(
    ("upload", "expected"),
    [((150, 100), (128, 80)), ((90, 160), (72, 128)), ((64, 64), (SIZE, SIZE))],
)
def test_img2img_keeps_the_inputs_aspect_ratio(
    task: ReimagineTask, upload: tuple[int, int], expected: tuple[int, int]
) -> None:
    request = ReimagineRequest(
        "a watercolour painting", image=picture(upload), steps=4, strength=0.5
    )
    (result,) = generate(task, request)
    assert png_size(result.png) == (result.width, result.height) == expected
    assert result.steps == 2  # int(4 * 0.5): img2img skips the noisiest steps


def test_overrides_change_the_steps_run(task: ReimagineTask) -> None:
    (result,) = generate(task, ReimagineRequest("a cat", steps=3, guidance=1.0))
    assert result.steps == 3


def test_bf16_runs_on_the_cpu(make_task: Factory) -> None:
    task = make_task(precision="bf16")
    task.load()
    assert task.pipelines[1].unet.dtype == torch.bfloat16  # from_pipe kept the dtype
    (result,) = generate(task, ReimagineRequest("a red bicycle", steps=2))
    assert png_size(result.png) == (SIZE, SIZE)


def test_auto_precision_never_picks_int8_on_a_cpu(make_task: Factory) -> None:
    # _runtime's CPU fallback is dynamic int8, which diffusion cannot use.
    assert make_task(precision="auto").precision in ("bf16", "none")


def test_the_pipelines_share_their_weights(task: ReimagineTask) -> None:
    txt2img, img2img = task.pipelines
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(img2img, name) is getattr(txt2img, name)
    pointers = {p.data_ptr() for p in txt2img.unet.parameters()}
    assert {p.data_ptr() for p in img2img.unet.parameters()} == pointers


def test_a_seed_reproduces_its_image(task: ReimagineTask) -> None:
    (first,) = generate(task, ReimagineRequest("a lighthouse at night"))
    (again,) = generate(task, ReimagineRequest("a lighthouse at night", seed=first.seed))
    assert again.seed == first.seed
    assert again.png == first.png


def test_different_seeds_give_different_images(task: ReimagineTask) -> None:
    one, two = generate(
        task, ReimagineRequest("a lighthouse", seed=1), ReimagineRequest("a lighthouse", seed=2)
    )
    assert one.png != two.png


def test_a_batched_image_matches_the_same_seed_alone(task: ReimagineTask) -> None:
    upload = picture((150, 100))
    (alone,) = generate(task, ReimagineRequest("a boat", image=upload, seed=7))
    batched = generate(
        task,
        ReimagineRequest("a boat", image=upload, seed=7),
        ReimagineRequest("a storm", image=picture((150, 101)), seed=8),
    )
    assert [b.seed for b in batched] == [7, 8]
    # The noise is the same (one generator per item); only the kernels' summation order
    # differs with the batch size, which moves a few pixels by one level after rounding.
    difference = (pixels(batched[0].png) - pixels(alone.png)).abs()
    assert difference.max() <= 1
    assert difference.float().mean() < 0.001


def test_compatible_requests_share_a_batch_key_and_others_do_not(task: ReimagineTask) -> None:
    def key(**fields: Any) -> object:
        return task.batch_key(task.preprocess(ReimagineRequest("a fox", **fields)))

    assert key(seed=1) == key(seed=2)
    assert key() != key(steps=3)
    assert key() != key(guidance=2.0)
    assert key(image=picture((150, 100))) != key()
    assert key(image=picture((150, 100))) != key(image=picture((100, 150)))
    assert key(image=picture((150, 100))) != key(image=picture((150, 100)), strength=0.75)


def test_sample_makes_cheap_representative_inputs(task: ReimagineTask) -> None:
    batch = task.sample(2)
    assert {(item.width, item.height, item.mode) for item in batch} == {(SIZE, SIZE, "txt2img")}
    raws = task.forward(batch)
    assert [raw.steps for raw in raws] == [2, 2]
    assert "tiny/stable-diffusion" in task.describe()


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"text": ""}, "empty"),
        ({"text": "   "}, "empty"),
        ({"text": "x" * 501}, "longer than 500"),
        ({"steps": 0}, "Steps must be between 1 and 50"),
        ({"steps": 51}, "Steps must be between 1 and 50"),
        ({"guidance": 0.5}, "Guidance must be between 1 and 15"),
        ({"guidance": float("nan")}, "Guidance"),
        ({"strength": 0.5}, "only when an image is given"),
        ({"image": b"x", "strength": 0.05}, "Strength must be between 0.1 and 1"),
        ({"image": b"x", "strength": 1.5}, "Strength must be between 0.1 and 1"),
        ({"image": b"x", "steps": 3, "strength": 0.2}, "no step to run"),
        ({"image": b""}, "empty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
    ],
)
def test_requests_outside_the_bounds_are_refused(
    make_task: Factory, fields: dict[str, Any], reason: str
) -> None:
    request = ReimagineRequest(**{"text": "a dog", **fields})
    with pytest.raises(InvalidRequest, match=reason):
        make_task().validate(request)


def test_requests_at_the_bounds_are_accepted(make_task: Factory) -> None:
    task = make_task()
    task.validate(ReimagineRequest("x" * 500, steps=1, guidance=15.0, seed=2**32 - 1))
    task.validate(ReimagineRequest("a dog", image=b"x", steps=50, strength=0.1, guidance=1.0))


def test_a_damaged_upload_is_refused_in_preprocess(make_task: Factory) -> None:
    with pytest.raises(InvalidRequest, match="not an image"):
        make_task().preprocess(ReimagineRequest("a dog", image=imagekit.not_an_image()))


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"precision": "int8"}, "needs a CUDA GPU"),
        ({"precision": "nf4"}, "needs a CUDA GPU"),
        ({"size": 32}, "reimagine.size"),
        ({"min_steps": 5, "steps": 4}, "min_steps"),
        ({"guidance": 20.0}, "max_guidance"),
        ({"max_strength": 1.5}, "max_strength"),
        ({"steps": 1, "strength": 0.5}, "at least one step"),
    ],
)
def test_impossible_settings_fail_at_start(
    make_task: Factory, fields: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        make_task(**fields)


# -- streaming and the engine ----------------------------------------------------------------


async def test_progress_reaches_every_stream_of_a_batch(task: ReimagineTask) -> None:
    prepared = [task.preprocess(ReimagineRequest("a tree", seed=s)) for s in (1, 2)]
    streams: list[Stream[object] | None] = [Stream(), Stream()]
    raws = await asyncio.to_thread(task.forward_streaming, prepared, streams)
    assert [raw.steps for raw in raws] == [STEPS, STEPS]
    for stream in streams:
        assert stream is not None
        assert await stream.next() == StepProgress(STEPS, STEPS)
    assert task.render_partial(StepProgress(1, 4)) == StepProgress(1, 4)


async def test_the_engine_streams_step_i_of_n_then_the_image(
    make_task: Factory, model_cache: Path
) -> None:
    task = make_task(batching=BatchSettings(batch_size=1))
    upload = picture((150, 100))
    async with Engine({"reimagine": task}, engine_settings(model_cache)) as engine:
        events = [
            event
            async for event in engine.stream(
                "reimagine", ReimagineRequest("a bridge", image=upload, steps=20, strength=0.5)
            )
        ]
    partials = [event.value for event in events if isinstance(event, Partial)]
    outcome = events[-1]
    assert isinstance(outcome, Outcome) and outcome.value.steps == 10
    assert partials and {p.total for p in partials} == {10}
    steps = [p.step for p in partials]
    assert steps == sorted(set(steps)) and steps[-1] == 10


async def test_a_caller_that_leaves_stops_the_denoising(
    make_task: Factory, model_cache: Path
) -> None:
    task = make_task(batching=BatchSettings(batch_size=1))
    unet_calls: list[int] = []
    decoded = threading.Event()
    left = threading.Event()

    def on_unet(*_: Any) -> None:
        unet_calls.append(1)
        if len(unet_calls) == 2:
            left.wait(10)  # hold step 2 until the caller has gone

    async with Engine({"reimagine": task}, engine_settings(model_cache)) as engine:
        await engine.ensure_loaded("reimagine")
        txt2img, _ = task.pipelines
        with (
            forward_hook(txt2img.unet, on_unet),
            forward_hook(txt2img.vae.decoder, lambda *_: decoded.set()),
        ):
            # Engine.stream is typed AsyncIterator, but is an async generator: closing it
            # (not just breaking out of the loop) is what tells the engine the caller left.
            events = cast(
                AsyncGenerator[object],
                engine.stream("reimagine", ReimagineRequest("a castle", steps=50)),
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Partial):
                        assert event.value == StepProgress(1, 50)
                        break
            left.set()
            assert await asyncio.to_thread(decoded.wait, 10)
    # The callback after step 1 saw the caller gone if the loop won the race to cancel;
    # otherwise step 2 was held until it had left, and the callback after it stopped the rest.
    assert len(unet_calls) in (1, 2)


async def test_a_batch_whose_callers_all_left_gives_no_image(task: ReimagineTask) -> None:
    prepared = [task.preprocess(ReimagineRequest("a tree", seed=s)) for s in (1, 2)]
    streams: list[Stream[object] | None] = [Stream(), Stream()]
    for stream in streams:
        assert stream is not None
        stream.cancel()
    raws = await asyncio.to_thread(task.forward_streaming, prepared, streams)
    # The first step's callback sees the cancellation and interrupts the other three.
    assert raws == [RawImage(None, 1, 1, cancelled=True), RawImage(None, 2, 1, cancelled=True)]
    with pytest.raises(InferenceFailed, match="cancelled"):
        task.postprocess(raws[0])


async def test_a_batch_keeps_running_while_one_caller_still_waits(task: ReimagineTask) -> None:
    prepared = [task.preprocess(ReimagineRequest("a tree", seed=s)) for s in (1, 2)]
    gone: Stream[object] = Stream()
    gone.cancel()
    raws = await asyncio.to_thread(task.forward_streaming, prepared, [gone, None])
    assert [(raw.steps, raw.cancelled) for raw in raws] == [(STEPS, False), (STEPS, False)]


async def test_the_engine_batches_compatible_concurrent_requests(
    make_task: Factory, model_cache: Path
) -> None:
    task = make_task(batching=BatchSettings(batch_size=2, max_wait_ms=500))
    decoded_batches: list[int] = []

    def on_decode(_: Any, inputs: tuple[torch.Tensor, ...], __: Any) -> None:
        decoded_batches.append(inputs[0].shape[0])

    async with Engine({"reimagine": task}, engine_settings(model_cache)) as engine:
        await engine.ensure_loaded("reimagine")
        with forward_hook(task.pipelines[0].vae.decoder, on_decode):
            outcomes = await asyncio.gather(
                engine.run("reimagine", ReimagineRequest("a red door", seed=1)),
                engine.run("reimagine", ReimagineRequest("a blue door", image=picture((150, 100)))),
                engine.run("reimagine", ReimagineRequest("a green door", seed=2)),
            )
        assert engine.stats().tasks[0].memory_mb == task.memory_bytes() / 2**20
    results = [outcome.value for outcome in outcomes]
    assert [(r.width, r.height) for r in results] == [(SIZE, SIZE), (128, 80), (SIZE, SIZE)]
    assert [r.seed for r in results][::2] == [1, 2]
    # One pipeline call for the two txt2img requests, one for the img2img one.
    assert sorted(decoded_batches) == [1, 2]


def test_memory_is_reported_while_loaded(make_task: Factory) -> None:
    task = make_task()
    assert task.memory_bytes() == 0
    task.load()
    txt2img, _ = task.pipelines
    expected = sum(
        t.numel() * t.element_size()
        for module in (txt2img.unet, txt2img.vae, txt2img.text_encoder)
        for t in module.state_dict().values()
    )
    assert task.memory_bytes() == expected > 0
    task.unload()
    assert task.memory_bytes() == 0
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = task.pipelines


# -- safety checker --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checked_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny checkpoint with a real StableDiffusionSafetyChecker (flags nothing as built)."""
    folder = tmp_path_factory.mktemp("checked") / "sd"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        diffusion.build_stable_diffusion_checked(folder)
    return str(folder)


def test_the_safety_checker_is_required_by_default(make_task: Factory) -> None:
    task = make_task(safety_checker=True)  # the tiny checkpoint has none
    with pytest.raises(ModelUnavailable) as caught:
        task.load()
    assert "has no safety checker" in caught.value.cause and caught.value.retry_after_s is None


def test_a_checked_model_returns_images_the_checker_passes(
    make_task: Factory, checked_model: str
) -> None:
    task = make_task(model=checked_model, safety_checker=True)
    task.load()
    assert task.pipelines[1].safety_checker is task.pipelines[0].safety_checker is not None
    (result,) = generate(task, ReimagineRequest("a garden"))
    assert png_size(result.png) == (SIZE, SIZE)
    assert task.flagged_images == 0


def test_a_flagged_image_is_never_sent(
    make_task: Factory, checked_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    task = make_task(model=checked_model, safety_checker=True)
    task.load()
    checker = task.pipelines[0].safety_checker
    with torch.no_grad():
        # A cosine similarity always exceeds -2: every image now counts as flagged.
        checker.concept_embeds_weights.fill_(-2.0)
    requests = [ReimagineRequest("a garden", seed=1), ReimagineRequest("a garden", seed=2)]
    with caplog.at_level(logging.WARNING, logger="core.tasks.reimagine"):
        raws = task.forward([task.preprocess(request) for request in requests])
    assert [(raw.flagged, raw.image) for raw in raws] == [(True, None), (True, None)]
    for raw in raws:
        with pytest.raises(ContentFlagged) as refused:
            task.postprocess(raw)
        assert str(refused.value) == FLAGGED_MESSAGE
    assert task.flagged_images == 2
    assert "flagged an image (2 since start)" in caplog.text


def test_without_the_safety_checker_setting_none_is_loaded(
    make_task: Factory, checked_model: str
) -> None:
    task = make_task(model=checked_model, safety_checker=False)
    task.load()
    assert task.pipelines[0].safety_checker is None
    assert task.pipelines[1].safety_checker is None


# -- builders --------------------------------------------------------------------------------


def test_the_tiny_model_loads_like_a_hub_checkpoint(model_cache: Path) -> None:
    folder = Path(resolve_model("tiny/stable-diffusion", model_cache))
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 1_000_000
    pipeline = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert pipeline.safety_checker is None and pipeline.vae_scale_factor == 2
    assert pipeline.tokenizer.model_max_length == 77
    ids = pipeline.tokenizer("a cat").input_ids
    assert ids[0] == pipeline.tokenizer.bos_token_id and ids[-1] == pipeline.tokenizer.eos_token_id
    assert pipeline.scheduler.config.steps_offset == 1


def test_random_sd15_has_the_real_models_shapes() -> None:
    configs = diffusion.sd15_configs()
    with torch.device("meta"):  # shapes only: nothing allocated, nothing saved
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(configs["text_encoder"])
    assert unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert unet.config.cross_attention_dim == 768
    assert unet.num_parameters() == 859_520_964
    assert vae.num_parameters() == 83_653_863
    assert text_encoder.num_parameters() == 123_060_480
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # 512 px images, 64 px latents
