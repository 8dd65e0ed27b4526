"""Images for tests: rendered text, and every awkward or hostile upload the bot must survive.

Everything is built in memory, deterministically, in milliseconds:
``from tests import imagekit``.

- Pictures (``PIL.Image.Image``): ``text_image`` (DejaVu Sans), ``solid``, ``noise``,
  ``corner_marked``.
- Uploads (``bytes``): ``encode`` any picture, or ``text_png``, ``blank_png``; hostile ones
  (``not_an_image``, ``eps_document``, ``truncated_jpeg``, ``bomb_png``, ...) and awkward
  ones (``animated``, ``cmyk_jpeg``, ``grey16_png``, ``rgb16_png``, ``half_transparent``,
  ``exif_jpeg``, ``exif_rotated``); ``raw_png`` writes what Pillow will not.
- ``bad_images()``: every upload ``decode_image`` must refuse with ``InvalidRequest``, and
  ``odd_images()`` every one it must turn into RGB, by label: parametrize over them.
- ``corner_pixel``: the colour near one corner, to check where a marked corner ended up.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
Size = tuple[int, int]
Colour = str | tuple[int, ...]
Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]
# EXIF orientation -> where the stored top-left corner appears once the image is upright.
EXIF_TOP_LEFT_GOES_TO: dict[int, Corner] = {
    1: "top-left",
    3: "bottom-right",
    6: "top-right",
    8: "bottom-left",
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112
# The turn that undoes each orientation's correction (ImageOps.exif_transpose's inverse).
_STORED_TURN = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


# -- pictures ------------------------------------------------------------------------------


def font(size: int = 36) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, which EasyOCR reads back reliably."""
    return ImageFont.truetype(str(FONT_PATH), size)


def text_image(
    text: str | Sequence[str],
    size: Size = (400, 120),
    *,
    font_size: int = 36,
    origin: tuple[int, int] = (20, 20),
    line_spacing: float = 1.6,
    colour: Colour = "black",
    background: Colour = "white",
) -> Image.Image:
    """Black-on-white text, one string per line, starting at ``origin``."""
    lines = [text] if isinstance(text, str) else list(text)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    face = font(font_size)
    x, y = origin
    for line in lines:
        draw.text((x, y), line, font=face, fill=colour)
        y += round(font_size * line_spacing)
    return image


def solid(size: Size = (64, 48), colour: Colour = "white", mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def corner_marked(
    size: Size = (60, 40), *, mark: Colour = "red", background: Colour = "white"
) -> Image.Image:
    """A plain image whose top-left quarter is ``mark``: shows rotations and flips."""
    image = Image.new("RGB", size, background)
    width, height = size
    ImageDraw.Draw(image).rectangle((0, 0, width // 2 - 1, height // 2 - 1), fill=mark)
    return image


def corner_pixel(image: Image.Image, corner: Corner, inset: int = 3) -> tuple[int, ...]:
    """The pixel ``inset`` pixels in from ``corner`` (away from JPEG's edge artefacts)."""
    width, height = image.size
    x = inset if corner.endswith("left") else width - 1 - inset
    y = inset if corner.startswith("top") else height - 1 - inset
    pixel = image.getpixel((x, y))
    assert isinstance(pixel, tuple)
    return pixel


# -- uploads -------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """``image`` saved as ``fmt`` (any Pillow save options in ``params``)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def text_png(text: str | Sequence[str], size: Size = (400, 120), **options: Any) -> bytes:
    """A PNG of ``text_image(text, size, **options)``."""
    return encode(text_image(text, size, **options))


def blank_png(size: Size = (400, 120), colour: Colour = "white") -> bytes:
    return encode(solid(size, colour))


def raw_png(
    width: int,
    height: int,
    *,
    bit_depth: int,
    colour_type: int,
    rows: Sequence[bytes] = (),
) -> bytes:
    """A PNG written by hand, for what Pillow cannot write (16-bit RGB, lying headers).

    ``rows`` are unfiltered scanlines; fewer than ``height`` makes a PNG whose pixel data
    ends early. ``colour_type`` 0 is greyscale, 2 RGB, 6 RGBA.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def noise(size: Size = (256, 192), seed: int = 0) -> Image.Image:
    """Deterministic noise: compresses badly, so an encoded file has plenty of pixel data."""
    width, height = size
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(width * height * 3))


# -- hostile uploads -----------------------------------------------------------------------


def not_an_image() -> bytes:
    """Plain text, as in a ``notes.txt`` renamed to ``photo.jpg``."""
    return b"These are my holiday notes, not a photo.\n"


def eps_document() -> bytes:
    """PostScript, which Pillow can open but decodes by running Ghostscript."""
    return encode(solid((64, 48), "red"), "EPS")


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` of a file, as an interrupted upload leaves it."""
    return data[: int(len(data) * keep)]


def truncated_jpeg(keep: float = 0.6) -> bytes:
    return truncated(encode(noise(), "JPEG", quality=90), keep)


def truncated_png(keep: float = 0.6) -> bytes:
    return truncated(encode(noise()), keep)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG of under 100 bytes whose header declares ``width`` x ``height`` pixels.

    It carries almost no pixel data, so if a decoder did not refuse it from the header it
    would fail as truncated: a test must check the refusal is about size.
    """
    return raw_png(width, height, bit_depth=1, colour_type=0, rows=[b"\x00"])


def bad_images() -> dict[str, bytes]:
    """Uploads that must be refused with ``InvalidRequest``, by a short label."""
    return {
        "zero bytes": b"",
        "text named .jpg": not_an_image(),
        "eps document": eps_document(),
        "truncated jpeg": truncated_jpeg(),
        "truncated png": truncated_png(),
        "bomb png (10 gigapixels)": bomb_png(),
        "bomb png (49 megapixels)": bomb_png(7_000, 7_000),
        "1x1 png": encode(solid((1, 1), "red")),
    }


# -- awkward but valid uploads ----------------------------------------------------------------


def animated(
    fmt: Literal["GIF", "WEBP", "PNG"],
    colours: Sequence[Colour] = ("red", "blue", "lime"),
    size: Size = (64, 48),
) -> bytes:
    """An animation with one solid frame per colour; the first frame is ``colours[0]``."""
    frames = [solid(size, colour) for colour in colours]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(frames[0], fmt, loop=0, **params)


def cmyk_jpeg(colour: tuple[int, int, int, int] = (0, 255, 255, 0)) -> bytes:
    """A CMYK JPEG, as print workflows export; the default ink is pure red."""
    return encode(solid((64, 48), colour, mode="CMYK"), "JPEG", quality=95)


def grey16_png(value: int = 40_000, size: Size = (64, 48)) -> bytes:
    """A 16-bit greyscale PNG (Pillow mode ``I;16``) filled with ``value`` of 65535."""
    return encode(Image.new("I;16", size, value))


def rgb16_png(colour: tuple[int, int, int] = (65535, 0, 20_000), size: Size = (64, 48)) -> bytes:
    """A 48-bit RGB PNG (16 bits per channel), which Pillow reads but cannot write."""
    width, height = size
    row = struct.pack(">HHH", *colour) * width
    return raw_png(width, height, bit_depth=16, colour_type=2, rows=[row] * height)


def half_transparent(mode: Literal["RGBA", "LA", "P"], size: Size = (64, 48)) -> bytes:
    """A PNG whose left half is fully transparent and right half opaque black."""
    width, height = size
    if mode == "P":
        image = Image.new("P", size, 0)
        image.putpalette([255, 0, 0, 0, 0, 0])  # index 0 (transparent) is red underneath
        image.paste(1, (width // 2, 0, width, height))
        return encode(image, transparency=0)
    transparent = (255, 0, 0, 0) if mode == "RGBA" else (128, 0)
    image = Image.new(mode, size, transparent)
    image.paste((0, 0, 0, 255) if mode == "RGBA" else (0, 255), (width // 2, 0, width, height))
    return encode(image)


def exif_jpeg(orientation: int, size: Size = (60, 40)) -> bytes:
    """A ``corner_marked`` JPEG stored as it is, tagged with EXIF ``orientation``."""
    return _tagged_jpeg(corner_marked(size), orientation)


def exif_rotated(upright: Image.Image, orientation: Literal[3, 6, 8]) -> bytes:
    """``upright`` as a camera held upside down (3) or sideways (6, 8) stores it.

    The pixels are turned away from upright and the EXIF tag says how to turn them back.
    """
    stored = upright.transpose(_STORED_TURN[orientation])
    return _tagged_jpeg(stored, orientation)


def _tagged_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def odd_images() -> dict[str, bytes]:
    """Valid uploads that are easy to get wrong, by a short label; all must decode."""
    return {
        "animated gif": animated("GIF"),
        "animated webp": animated("WEBP"),
        "animated png": animated("PNG"),
        "cmyk jpeg": cmyk_jpeg(),
        "16-bit grey png": grey16_png(),
        "16-bit rgb png": rgb16_png(),
        "rgba png": half_transparent("RGBA"),
        "la png": half_transparent("LA"),
        "p png with transparency": half_transparent("P"),
        "exif orientation 6 jpeg": exif_jpeg(6),
        "8x8 png": encode(solid((8, 8), "red")),
    }
