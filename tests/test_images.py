"""decode_image: hostile uploads are refused in one safe line; odd ones come out upright RGB."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
from PIL import Image, ImageFile

from core.errors import InvalidRequest
from core.images import (
    MAX_BYTES,
    check_image_bytes,
    decode_image,
    decode_working,
    display_name,
)
from tests import imagekit

RED = (255, 0, 0)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
UPLOAD_PATH = "/home/alice/uploads/photo.jpg"

# What each refusal must say; keyed like imagekit.bad_images().
REFUSALS = {
    "zero bytes": "photo.jpg is empty (0 bytes).",
    "text named .jpg": (
        "photo.jpg is not an image this bot can read (JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF)."
    ),
    "eps document": (
        "photo.jpg is not an image this bot can read (JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF)."
    ),
    "truncated jpeg": "photo.jpg is damaged or truncated and cannot be read.",
    "truncated png": "photo.jpg is damaged or truncated and cannot be read.",
    # Pillow refuses this one at open, before the bot sees its size.
    "bomb png (10 gigapixels)": "photo.jpg has more than the 40 megapixels this bot accepts.",
    "bomb png (49 megapixels)": (
        "photo.jpg is 7000x7000 pixels, more than the 40 megapixels this bot accepts."
    ),
    "1x1 png": "photo.jpg is only 1x1 pixels; at least 8x8 is needed.",
}
BAD = imagekit.bad_images()
ODD = imagekit.odd_images()


def close_to(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 8) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


# -- refusals ------------------------------------------------------------------------------


def test_every_bad_image_in_the_kit_has_an_expected_refusal() -> None:
    assert set(BAD) == set(REFUSALS)


@pytest.mark.parametrize("label", sorted(BAD))
def test_bad_image_is_refused_with_one_user_safe_line(label: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        decode_image(BAD[label], UPLOAD_PATH)
    # Exact text: one line, names the file but not the folder, no exception details.
    assert str(refused.value) == REFUSALS[label]


def test_truncated_jpeg_fails_on_its_missing_pixels_not_its_header() -> None:
    data = imagekit.truncated_jpeg()
    assert Image.open(io.BytesIO(data)).size == (256, 192)  # the header is intact
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(InvalidRequest, match="truncated"):
        decode_image(data)


def test_bomb_refused_from_its_header_without_decoding() -> None:
    # The kit's bombs carry almost no pixel data: decoding would fail as "truncated".
    with pytest.raises(InvalidRequest, match="megapixels"):
        decode_image(imagekit.bomb_png(7_000, 7_000))


def test_bomb_in_pillows_warning_band_is_refused_whatever_the_warning_filters() -> None:
    data = imagekit.bomb_png(10_000, 10_000)  # 100 M px: above Pillow's warning, below its error
    # Here (pytest) warnings are errors: Pillow's warning is raised at open.
    with pytest.raises(InvalidRequest, match="megapixels"):
        decode_image(data)
    # In production it is only a warning: Pillow warns, then the bot's own limit refuses.
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(InvalidRequest, match="megapixels"),
    ):
        decode_image(data)


@pytest.mark.parametrize(("size", "accepted"), [((8, 8), True), ((7, 100), False)])
def test_smallest_accepted_side_is_8_pixels(size: tuple[int, int], accepted: bool) -> None:
    data = imagekit.encode(imagekit.solid(size, "red"))
    if accepted:
        assert decode_image(data).size == size
    else:
        with pytest.raises(InvalidRequest, match="7x100 pixels"):
            decode_image(data)


@pytest.mark.parametrize(
    ("size", "refusal"),
    [
        ((40_000, 8), "photo.jpg is 40000x8 pixels, more than 20 times as wide as it is high."),
        ((8, 100_000), "photo.jpg is 8x100000 pixels, more than 20 times as high as it is wide."),
        ((161, 8), "photo.jpg is 161x8 pixels, more than 20 times as wide as it is high."),
        (
            (1414, 28_281),
            "photo.jpg is 1414x28281 pixels, more than 20 times as high as it is wide.",
        ),
    ],
)
def test_strips_too_long_for_the_tasks_are_refused_from_the_header(
    size: tuple[int, int], refusal: str
) -> None:
    # Header-only PNGs: were the shape not refused before decoding, they would fail as
    # truncated instead.
    with pytest.raises(InvalidRequest) as refused:
        decode_image(imagekit.bomb_png(*size), UPLOAD_PATH)
    assert str(refused.value) == refusal


@pytest.mark.parametrize("size", [(160, 8), (8, 160), (28_280, 1414)])
def test_the_longest_strips_accepted_decode(size: tuple[int, int]) -> None:
    assert decode_image(imagekit.encode(imagekit.solid(size, "red"))).size == size


def test_oversized_upload_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidRequest, match="larger than 50 MB"):
        check_image_bytes(b"\0" * (MAX_BYTES + 1), "huge.png")


def test_decoding_leaves_process_wide_state_alone() -> None:
    # decode_image runs on several pool threads at once: it must not swap warning filters
    # (not thread-safe) or change Pillow's globals.
    filters = list(warnings.filters)
    limit = Image.MAX_IMAGE_PIXELS
    for data in [*BAD.values(), *ODD.values()]:
        with contextlib.suppress(InvalidRequest):
            decode_image(data)
    assert warnings.filters == filters
    assert limit == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("/home/alice/secret/photo.jpg", "photo.jpg"),
        ("C:\\Users\\bob\\scan.png", "scan.png"),
        ("evil\nname.png", "evilname.png"),
        ("x" * 200 + ".png", "x" * 59 + "…"),
        ("", "image"),
        ("/tmp/", "tmp"),
    ],
)
def test_display_name_is_a_short_single_line_without_folders(name: str, shown: str) -> None:
    assert display_name(name) == shown


# -- working size ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "sides", "expected"),
    [
        # The flat 51 KB PNG that took OCR 50 s at full size.
        ((7000, 5700), (384, 384), (500, 408)),
        ((7000, 5700), (1280, 1), (1400, 1140)),
        ((5700, 7000), (1280, 1), (1140, 1400)),
        # The 20:1 limit at 40 megapixels, for OCR and for Stable Diffusion at 512.
        ((28_280, 1414), (1280, 1), (1286, 65)),
        ((28_280, 1414), (512, 64), (1286, 65)),
        ((1414, 28_280), (224, 224), (236, 4714)),
        # Already small enough: never enlarged, never reduced below what was asked.
        ((400, 120), (1280, 1), (400, 120)),
        ((700, 500), (384, 384), (700, 500)),
    ],
)
def test_working_size_is_a_whole_reduction_keeping_the_sides_asked_for(
    size: tuple[int, int], sides: tuple[int, int], expected: tuple[int, int]
) -> None:
    data = imagekit.encode(Image.new("L", size, 128))
    working = decode_working(data, min_long_side=sides[0], min_short_side=sides[1])
    assert working.image.size == expected
    assert working.image.mode == "RGB"
    assert working.full_size == size
    long_side, short_side = max(expected), min(expected)
    assert long_side >= sides[0] or expected == size
    assert short_side >= sides[1]


def test_a_large_jpeg_is_reduced_while_decoding() -> None:
    data = imagekit.encode(imagekit.noise((1600, 1200)), "JPEG", quality=90)
    # A whole reduction by 12 would give 134x100; libjpeg scales by 1/8 and that already
    # leaves too little for a further whole reduction.
    working = decode_working(data, min_long_side=100, min_short_side=100)
    assert working.image.size == (200, 150)
    assert working.full_size == (1600, 1200)


def test_a_truncated_jpeg_is_refused_at_its_working_size_too() -> None:
    data = imagekit.truncated(imagekit.encode(imagekit.noise((1600, 1200)), "JPEG"), 0.6)
    with pytest.raises(InvalidRequest, match="truncated"):
        decode_working(data, min_long_side=100, min_short_side=100)


def test_a_reduced_photo_taken_sideways_is_upright_and_knows_its_upright_size() -> None:
    upright = imagekit.corner_marked((600, 400))
    data = imagekit.exif_rotated(upright, 6)
    assert Image.open(io.BytesIO(data)).size == (400, 600)  # stored sideways
    working = decode_working(data, min_long_side=100, min_short_side=100)
    assert working.image.size == (150, 100)
    assert working.full_size == (600, 400)
    assert close_to(imagekit.corner_pixel(working.image, "top-left"), RED)
    assert close_to(imagekit.corner_pixel(working.image, "bottom-right"), WHITE)


@pytest.mark.parametrize("label", sorted(BAD))
def test_a_working_size_refuses_what_decode_image_refuses(label: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        decode_working(BAD[label], UPLOAD_PATH, min_long_side=64, min_short_side=64)
    assert str(refused.value) == REFUSALS[label]


# -- awkward but valid ---------------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(ODD))
def test_odd_image_decodes_to_plain_rgb(label: str) -> None:
    image = decode_image(ODD[label], label)
    assert image.mode == "RGB"
    # A fresh image, not the lazily decoded file that would keep the upload's bytes alive.
    assert not isinstance(image, ImageFile.ImageFile)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    data = imagekit.animated(fmt, colours=("red", "blue", "lime"))  # type: ignore[arg-type]
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = decode_image(data)
    assert image.size == (64, 48)
    assert imagekit.corner_pixel(image, "top-left") == RED


def test_cmyk_jpeg_comes_out_in_rgb_colours() -> None:
    data = imagekit.cmyk_jpeg((0, 255, 255, 0))  # magenta + yellow ink = red
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert close_to(imagekit.corner_pixel(decode_image(data), "top-left"), RED)


def test_16_bit_grey_png_is_scaled_not_clipped() -> None:
    data = imagekit.grey16_png(40_000)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # 40000 / 65535 of white; clipping would give 255.
    assert imagekit.corner_pixel(decode_image(data), "top-left") == (156, 156, 156)


def test_16_bit_rgb_png_is_reduced_to_8_bits() -> None:
    data = imagekit.rgb16_png((65535, 0, 20_000))
    assert data[24:26] == b"\x10\x02"  # IHDR: 16 bits per sample, RGB
    assert imagekit.corner_pixel(decode_image(data), "top-left") == (255, 0, 78)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode: str) -> None:
    data = imagekit.half_transparent(mode)  # type: ignore[arg-type]
    assert Image.open(io.BytesIO(data)).has_transparency_data
    image = decode_image(data)
    assert imagekit.corner_pixel(image, "top-left") == WHITE  # transparent red/grey
    assert imagekit.corner_pixel(image, "bottom-right") == BLACK


@pytest.mark.parametrize(
    ("orientation", "size"), [(1, (60, 40)), (3, (60, 40)), (6, (40, 60)), (8, (40, 60))]
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int]) -> None:
    data = imagekit.exif_jpeg(orientation, size=(60, 40))
    assert Image.open(io.BytesIO(data)).size == (60, 40)  # stored sideways or upside down
    image = decode_image(data)
    assert image.size == size
    marked = imagekit.EXIF_TOP_LEFT_GOES_TO[orientation]
    for corner in ("top-left", "top-right", "bottom-left", "bottom-right"):
        expected = RED if corner == marked else WHITE
        assert close_to(imagekit.corner_pixel(image, corner), expected), corner


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_photo_taken_sideways_or_upside_down_comes_back_upright(orientation: int) -> None:
    upright = imagekit.corner_marked((60, 40))
    data = imagekit.exif_rotated(upright, orientation)  # type: ignore[arg-type]
    image = decode_image(data)
    assert image.size == (60, 40)
    assert close_to(imagekit.corner_pixel(image, "top-left"), RED)
    assert close_to(imagekit.corner_pixel(image, "bottom-right"), WHITE)
