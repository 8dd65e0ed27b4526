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
    # Grounded phrases with their boxes, from captioners that give them (Kosmos-2).
    entities: tuple[Entity, ...] = ()


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
    # Measured after the model's last load; None before it has loaded once.
    memory_mb: float | None = None
    # Forwards run since start.
    batches: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    in_flight: int
    max_in_flight: int
    dead: bool
    tasks: tuple[TaskStats, ...] = field(default_factory=tuple)
    resident_mb: float = 0.0
    budget_mb: float | None = None


@dataclass(frozen=True, slots=True)
class Entity:
    """A phrase of a grounded caption (Kosmos-2) and where it is in the image."""

    text: str
    # Character span of the phrase in the caption text.
    span: tuple[int, int]
    # Boxes as (x0, y0, x1, y1) fractions of the image width and height.
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass(frozen=True, slots=True)
class AskRequest:
    """Answer a question about an image."""

    image: bytes
    question: str
    name: str = "image"


@dataclass(frozen=True, slots=True)
class Answer:
    text: str


@dataclass(frozen=True, slots=True)
class PostContext:
    """What is known about a post, for the social-caption writer. All text is data."""

    caption: str
    ocr_text: str = ""
    hashtags: tuple[str, ...] = ()
    author: str = ""
    date: str = ""
    platform: str = ""
    chat: str = ""


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """Write a ready-to-post social caption; ``style`` overrides the configured tone."""

    context: PostContext
    style: str = ""


@dataclass(frozen=True, slots=True)
class SocialCaption:
    text: str
    # True when the model's text was cut to the configured length limit.
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class MoodRequest:
    """Mood and colour labels for an image."""

    image: bytes
    name: str = "image"


@dataclass(frozen=True, slots=True)
class MoodLabel:
    name: str
    kind: str  # "mood" or "colour"
    score: float

    @property
    def hashtag(self) -> str:
        return "#" + "_".join(self.name.lower().split())


@dataclass(frozen=True, slots=True)
class MoodLabels:
    labels: tuple[MoodLabel, ...]

    @property
    def hashtags(self) -> tuple[str, ...]:
        return tuple(label.hashtag for label in self.labels)


@dataclass(frozen=True, slots=True)
class ReimagineRequest:
    """Make an image from ``text``: img2img on ``image`` when given, else txt2img.

    Unset numbers take the configured defaults; set ones must lie in the configured bounds.
    """

    text: str
    image: bytes | None = None
    name: str = "image"
    strength: float | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    png: bytes
    seed: int
    width: int
    height: int
    steps: int


@dataclass(frozen=True, slots=True)
class StepProgress:
    """Reported while a long forward runs: step ``step`` of ``total``."""

    step: int
    total: int
