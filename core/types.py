"""Values that cross the core boundary: one small frozen dataclass per intent."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.ports import ChatRef, UserRef


@dataclass(frozen=True, slots=True)
class CaptionRequest:
    """Describe an image in one sentence, optionally continuing ``prefix``."""

    image: bytes
    name: str = "image"
    prefix: str = ""
    # Sample instead of searching for the likeliest sentence: a new caption on each call
    # (a reroll), never cached.
    sample: bool = False


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
    # Not loaded: about how long until it is, counting the loads the device does first;
    # None when one of those models was never loaded on this machine.
    ready_in_s: float | None = None


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


# -- what a request is about -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """Who asked, where, in which message, and in reply to what."""

    user: UserRef
    chat: ChatRef
    # The platform message carrying the request (None on the web and the command line).
    message_id: str | None = None
    # The message it replies to, and which of that message's images when it has several.
    reply_to: str | None = None
    reply_position: int | None = None
    # Shown to the caption writer as metadata (data, never instructions).
    author: str = ""
    chat_title: str = ""
    # A one-to-one chat (a DM): its user decides its settings.
    private: bool = False
    # The platform says this user administers the chat (group admin, Manage Server).
    chat_admin: bool = False


@dataclass(frozen=True, slots=True)
class Upload:
    """Image bytes a user sent; ``position`` is its place among its message's images."""

    data: bytes
    name: str = "image"
    position: int = 0
    # The message carrying it, when not the request's own (a context menu's target).
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Link:
    """An http(s) link to an image, sent instead of the file."""

    url: str
    position: int = 0


@dataclass(frozen=True, slots=True)
class Stored:
    """An image the bot already keeps (a journalled job being answered after a restart)."""

    sha256: str
    position: int = 0


@dataclass(frozen=True, slots=True)
class FromAnswer:
    """The image an earlier answer is about, by the handle on its buttons."""

    handle: str


# None: the image replied to, else the chat's last image.
ImageInput = Upload | Link | Stored | FromAnswer | None


# -- parts of an answer, in the order they may arrive -------------------------------------


@dataclass(frozen=True, slots=True)
class Waiting:
    """This request waits its turn: ``ahead`` requests for ``task`` come first."""

    task: str
    ahead: int
    eta_s: float


@dataclass(frozen=True, slots=True)
class WarmingUp:
    """The model for ``task`` is loading; ``eta_s`` is None before any load was timed."""

    task: str
    eta_s: float | None


@dataclass(frozen=True, slots=True)
class SocialDraft:
    """The social caption as written so far; the next draft or the caption replaces it."""

    text: str


@dataclass(frozen=True, slots=True)
class Unavailable:
    """One part of an answer could not be made; the rest of the answer goes on."""

    part: str  # caption, ocr, tags, social
    reason: str  # one sentence for the user


Part = (
    Waiting
    | WarmingUp
    | Caption
    | OcrResult
    | Tags
    | SocialDraft
    | SocialCaption
    | Answer
    | StepProgress
    | GeneratedImage
    | Unavailable
)
