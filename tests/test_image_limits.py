"""Every image task takes every shape ``decode_image`` accepts, right at its limits, and a
large upload reaches each model no larger than that task's working size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from statistics import fmean
from typing import Any

import pytest
from PIL import Image

from core.images import MAX_ASPECT, MAX_PIXELS, MIN_SIDE, decode_image
from core.settings import (
    CaptionSettings,
    EngineSettings,
    MoodSettings,
    ReimagineSettings,
    VqaSettings,
)
from core.tasks.caption import CaptionTask
from core.tasks.mood import MoodTask
from core.tasks.reimagine import ReimagineTask
from core.tasks.vqa import VqaTask
from core.tiny import resolve_model
from core.types import (
    Answer,
    AskRequest,
    Caption,
    CaptionRequest,
    GeneratedImage,
    MoodLabels,
    MoodRequest,
    ReimagineRequest,
)
from tests import imagekit

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The longest strip under the pixel limit: 28280x1414 is 39.99 megapixels at 20:1.
_LONG = 28_280
_SHORT = _LONG // MAX_ASPECT
LIMITS = {
    "smallest": (MIN_SIDE, MIN_SIDE),
    "narrowest, wide": (MIN_SIDE * MAX_ASPECT, MIN_SIDE),
    "narrowest, tall": (MIN_SIDE, MIN_SIDE * MAX_ASPECT),
    "largest strip, wide": (_LONG, _SHORT),
    "largest strip, tall": (_SHORT, _LONG),
}
CAPTIONERS = ["tiny/blip2-opt", "tiny/blip-caption", "tiny/git", "tiny/vit-gpt2", "tiny/kosmos2"]


@pytest.fixture(scope="module")
def uploads() -> dict[str, bytes]:
    """Each limit as a PNG with a dark band, so the models see more than a flat colour."""
    encoded = {}
    for label, size in LIMITS.items():
        image = Image.new("RGB", size, "white")
        width, height = size
        image.paste((20, 40, 200), (0, height // 3, width, 2 * height // 3))
        encoded[label] = imagekit.encode(image)
    return encoded


def test_the_limits_are_what_decode_image_accepts(uploads: dict[str, bytes]) -> None:
    assert _LONG * _SHORT <= MAX_PIXELS
    for label, data in uploads.items():
        assert decode_image(data).size == LIMITS[label]


def engine(cache: Path) -> EngineSettings:
    return EngineSettings(device="cpu", model_cache=cache)


def run(task: Any, request: Any) -> Any:
    """The engine's phases in order, as one item."""
    task.validate(request)
    (raw,) = task.forward([task.preprocess(request)])
    return task.postprocess(raw)


@pytest.fixture(scope="module", params=CAPTIONERS)
def captioner(request: pytest.FixtureRequest, model_cache: Path) -> Iterator[CaptionTask]:
    settings = CaptionSettings(model=request.param, precision="none", max_new_tokens=8)
    task = CaptionTask(settings, engine(model_cache), resolve_model=resolve_model)
    task.load()
    yield task
    task.unload()


@pytest.mark.parametrize("label", list(LIMITS))
def test_every_captioner_captions_images_at_the_limits(
    captioner: CaptionTask, uploads: dict[str, bytes], label: str
) -> None:
    assert isinstance(run(captioner, CaptionRequest(uploads[label])), Caption)


@pytest.fixture(scope="module")
def mood(model_cache: Path) -> Iterator[MoodTask]:
    task = MoodTask(
        MoodSettings(model="tiny/clip", precision="none"),
        engine(model_cache),
        resolve_model=resolve_model,
    )
    task.load()
    yield task
    task.unload()


@pytest.mark.parametrize("label", list(LIMITS))
def test_mood_labels_images_at_the_limits(
    mood: MoodTask, uploads: dict[str, bytes], label: str
) -> None:
    assert isinstance(run(mood, MoodRequest(uploads[label])), MoodLabels)


@pytest.fixture(scope="module")
def vqa(model_cache: Path) -> Iterator[VqaTask]:
    task = VqaTask(
        VqaSettings(model="tiny/blip-vqa", precision="none", max_new_tokens=6),
        engine(model_cache),
        resolve_model=resolve_model,
    )
    task.load()
    yield task
    task.unload()


@pytest.mark.parametrize("label", list(LIMITS))
def test_vqa_answers_about_images_at_the_limits(
    vqa: VqaTask, uploads: dict[str, bytes], label: str
) -> None:
    request = AskRequest(uploads[label], "What colour is the band?")
    assert isinstance(run(vqa, request), Answer)


@pytest.fixture(scope="module")
def reimagine(model_cache: Path) -> Iterator[ReimagineTask]:
    # 128, as in the tiny profile: at it an upload wider than 2:1 is too narrow to keep
    # 64 pixels across with its longer side 128.
    settings = ReimagineSettings(
        model="tiny/stable-diffusion",
        precision="none",
        size=128,
        steps=2,
        strength=0.5,
        safety_checker=False,
    )
    task = ReimagineTask(settings, engine(model_cache), resolve_model=resolve_model)
    task.load()
    yield task
    task.unload()


@pytest.mark.parametrize(
    ("label", "size"),
    [
        ("smallest", (128, 128)),
        ("narrowest, wide", (1280, 64)),
        ("narrowest, tall", (64, 1280)),
        ("largest strip, wide", (1280, 64)),
        ("largest strip, tall", (64, 1280)),
    ],
)
def test_img2img_reimagines_images_at_the_limits(
    reimagine: ReimagineTask, uploads: dict[str, bytes], label: str, size: tuple[int, int]
) -> None:
    request = ReimagineRequest("a watercolour", image=uploads[label], seed=1)
    prepared = reimagine.preprocess(request)
    assert prepared.image is not None and prepared.image.size == size
    (raw,) = reimagine.forward([prepared])
    result = reimagine.postprocess(raw)
    assert isinstance(result, GeneratedImage)
    assert (result.width, result.height) == size


def test_img2img_of_a_large_upload_matches_the_same_picture_uploaded_small(
    reimagine: ReimagineTask,
) -> None:
    # Decoded at a working size, then sized from the full picture: a 4000x3000 upload
    # gets exactly the input a 400x300 one of the same picture does, give or take the
    # resampling.
    small = imagekit.corner_marked((400, 300))
    large = small.resize((4000, 3000), Image.Resampling.NEAREST)
    prepared = [
        reimagine.preprocess(
            ReimagineRequest("a watercolour", image=imagekit.encode(image), seed=1)
        )
        for image in (small, large)
    ]
    assert prepared[0].image is not None and prepared[1].image is not None
    assert prepared[0].image.size == prepared[1].image.size == (128, 96)
    pairs = zip(prepared[0].image.tobytes(), prepared[1].image.tobytes(), strict=True)
    assert fmean(abs(a - b) for a, b in pairs) < 4.0
