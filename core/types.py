"""Values that cross the core boundary: one small frozen dataclass per intent."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CaptionRequest:
    """Describe an image in one sentence, optionally continuing ``prefix``."""

    image: bytes
    name: str = "image"
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class OcrRequest:
    """Read the text in an image."""

    image: bytes
    name: str = "image"


@dataclass(frozen=True, slots=True)
class TagsRequest:
    """Suggest hashtags for what is known about an image."""

    caption: str
    ocr_text: str = ""


@dataclass(frozen=True, slots=True)
class Caption:
    text: str
    # True when the model looped ("a polar polar polar ...") and the text was cut back.
    degenerate: bool = False


@dataclass(frozen=True, slots=True)
class OcrLine:
    text: str
    # Four corners, clockwise from top-left, in pixels of the (EXIF-rotated) image.
    box: tuple[tuple[int, int], ...]
    confidence: float


@dataclass(frozen=True, slots=True)
class OcrResult:
    lines: tuple[OcrLine, ...]

    @property
    def has_text(self) -> bool:
        return bool(self.lines)

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)


@dataclass(frozen=True, slots=True)
class Tags:
    hashtags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TaskStats:
    name: str
    loaded: bool
    queued: int
    batch_size: int
    mean_batch_s: float | None
    eta_s: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    in_flight: int
    max_in_flight: int
    dead: bool
    tasks: tuple[TaskStats, ...] = field(default_factory=tuple)
