"""Decoding untrusted image bytes into a clean RGB picture, or a one-line reason why not.

``decode_image`` runs on the CPU thread pool, several calls at once, so it touches no
process-wide state: no ``warnings.catch_warnings`` (it swaps the global filter list and
is not thread-safe before Python 3.14) and no Pillow globals (``LOAD_TRUNCATED_IMAGES``
stays False, so a truncated file raises instead of decoding half grey).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from pathlib import PurePosixPath

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from core.errors import InvalidRequest

logger = logging.getLogger(__name__)

# Pillow's own bomb limit (about 89 M pixels) lets a 12 KB PNG expand to 270 MB of RGB;
# 40 M pixels covers any real photo while keeping one decode under ~120 MB.
MAX_PIXELS = 40_000_000
MIN_SIDE = 8
# Every task shrinks an image to a working size, and a strip much longer than it is wide
# runs out of pixels across on the way (40000x8 is under one pixel high at OCR's 1280,
# and a 224-pixel CLIP input of it would be 1.1 million pixels long). At 20:1 every task
# still has something to work on: 64 pixels across at OCR's 1280, 224x4480 for CLIP, a
# 64x1280 Stable Diffusion canvas. Telegram's Bot API draws the same line for photos.
MAX_ASPECT = 20
MAX_BYTES = 50 * 1024 * 1024
# What chat clients and cameras send. Pillow would otherwise also try some thirty rarer
# formats on untrusted bytes, EPS among them, which it decodes by running Ghostscript.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
_FORMAT_NAMES = "JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF"
_MAX_NAME_CHARS = 60


def check_image_bytes(data: bytes, name: str = "image") -> None:
    """Reject empty or oversized uploads without decoding them; cheap enough for the loop."""
    if not data:
        raise InvalidRequest(f"{display_name(name)} is empty (0 bytes).")
    if len(data) > MAX_BYTES:
        raise InvalidRequest(
            f"{display_name(name)} is larger than {MAX_BYTES // (1024 * 1024)} MB."
        )


@dataclass(frozen=True, slots=True)
class WorkingImage:
    """An upload decoded for one task, at the size that task works at."""

    # Upright RGB, reduced by a whole factor from the full picture (or not at all).
    image: Image.Image
    # (width, height) of the full upright picture: what coordinates are reported in.
    full_size: tuple[int, int]


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Return ``data`` as an upright RGB image; raise ``InvalidRequest`` with the reason.

    Animations (GIF, WebP, APNG) give their first frame, transparency is composited on
    white, EXIF orientation is applied and 16-bit samples are scaled to 8 bits.
    """
    return _decode(data, name, None).image


def decode_working(
    data: bytes, name: str = "image", *, min_long_side: int, min_short_side: int
) -> WorkingImage:
    """``decode_image`` for a task that shrinks the picture anyway: it comes back reduced
    by the largest whole factor that leaves its longer side at least ``min_long_side``
    and its shorter side at least ``min_short_side`` pixels (never enlarged), so a large
    upload costs the task what one under twice its working size does.

    A JPEG is reduced by libjpeg while decoding (1/2, 1/4 or 1/8 scale), which also
    saves most of the decode; other formats are decoded in full, then reduced.
    """
    return _decode(data, name, (min_long_side, min_short_side))


def _decode(data: bytes, name: str, working: tuple[int, int] | None) -> WorkingImage:
    check_image_bytes(data, name)
    label = display_name(name)
    limit = f"more than the {MAX_PIXELS // 1_000_000} megapixels this bot accepts"
    try:
        # Opening reads only the header, and leaves an animation on its first frame.
        image = Image.open(BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise InvalidRequest(f"{label} is {width}x{height} pixels, {limit}.")
        if min(width, height) < MIN_SIDE:
            raise InvalidRequest(
                f"{label} is only {width}x{height} pixels; "
                f"at least {MIN_SIDE}x{MIN_SIDE} is needed."
            )
        if max(width, height) > MAX_ASPECT * min(width, height):
            long_way, short_way = ("wide", "high") if width > height else ("high", "wide")
            raise InvalidRequest(
                f"{label} is {width}x{height} pixels, more than {MAX_ASPECT} times as "
                f"{long_way} as it is {short_way}."
            )
        factor = 1 if working is None else _whole_factor((width, height), working)
        if factor > 1:
            # Only JPEG honours a draft; libjpeg still reads every block, so a truncated
            # file fails as it does at full size.
            image.draft(None, (-(-width // factor), -(-height // factor)))
        image.load()
        # Orientations 5 to 8 turn the picture a quarter, swapping its sides.
        turned = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
        # Always a new, file-less image (a copy when there is nothing to rotate), so the
        # result does not keep the upload's bytes alive.
        upright = _to_rgb(ImageOps.exif_transpose(image))
        if working is not None:
            # What the draft left to do, or all of it for formats without one.
            rest = _whole_factor(upright.size, working)
            if rest > 1:
                upright = upright.reduce(rest)
        return WorkingImage(upright, (height, width) if turned else (width, height))
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow refuses sizes above twice its limit at open; between its limit and twice
        # it only warns (an exception when warnings are errors), and the check above,
        # lower than Pillow's, would refuse the image anyway.
        raise InvalidRequest(f"{label} has {limit}.") from None
    except UnidentifiedImageError:
        raise InvalidRequest(
            f"{label} is not an image this bot can read ({_FORMAT_NAMES})."
        ) from None
    except Exception as exc:
        # Pillow's plugins raise a zoo of types on hostile input (OSError for truncation,
        # SyntaxError, struct.error, IndexError, ValueError, ...): all of them are facts
        # about these bytes, not faults of the bot.
        logger.info("could not decode %s: %r", label, exc)
        raise InvalidRequest(f"{label} is damaged or truncated and cannot be read.") from exc


def _whole_factor(size: tuple[int, int], working: tuple[int, int]) -> int:
    """The largest whole factor that keeps the sides of ``size`` at least ``working``'s
    (longer side, shorter side); at least 1."""
    (short, long), (min_long, min_short) = sorted(size), working
    return max(1, min(long // min_long, short // min_short))


def display_name(name: str) -> str:
    """The file name as it may appear in a message: no folders, one line, not too long."""
    base = PurePosixPath(name.replace("\\", "/")).name
    printable = "".join(char for char in base if char.isprintable()).strip()
    if len(printable) > _MAX_NAME_CHARS:
        printable = printable[: _MAX_NAME_CHARS - 1] + "…"
    return printable or "image"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale ("I" is how older Pillow decoders gave it): scale to 8 bits, as
        # convert("L") alone clips everything above 255 to white.
        image = image.point(lambda value: value / 256).convert("L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        # Transparent areas become white, as chat clients show them, not black.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")
