"""An answer as the text of one chat message, rebuilt as its parts arrive.

Sections come in a fixed order (caption, text in the image, hashtags, social caption, an
answer to a question); a later part of the same kind replaces an earlier one (a draft by
the next draft, then by the caption); a status line (place in line, warming up, step i
of n) shows only while the work is under way. Everything is plain text: model output and
user text are never read as markup by any platform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from core.types import (
    Answer,
    Caption,
    GeneratedImage,
    OcrResult,
    Part,
    SocialCaption,
    SocialDraft,
    StepProgress,
    Tags,
    Unavailable,
    Waiting,
    WarmingUp,
)

# What each task's work is called in a status line.
_DOING = {
    # Whole requests waiting for room when the bot is full, then the tasks within them.
    "describe": "describing the image",
    "ask": "answering",
    "reroll": "a new caption",
    "caption": "describing the image",
    "ocr": "reading the text in it",
    "tags": "making hashtags",
    "mood": "making hashtags",
    "vqa": "answering",
    "write": "writing the social caption",
    "reimagine": "making the image",
}
_TITLES = {
    "ocr": "Text in the image",
    "social": "Social caption",
}


def waiting_line(part: Waiting | WarmingUp) -> str:
    """Where a request stands, in words; never counting the user among those ahead."""
    doing = _DOING.get(part.task, part.task)
    if isinstance(part, WarmingUp):
        if part.eta_s is None:
            return f"⏳ Warming up for {doing}; the first start can take a minute…"
        return f"⏳ Warming up for {doing}, about {max(1, round(part.eta_s))} s…"
    eta = f", about {max(1, round(part.eta_s))} s" if part.eta_s >= 1 else ""
    if part.ahead == 0:
        return f"⏳ You are next for {doing}{eta}…"
    ahead = "1 request is" if part.ahead == 1 else f"{part.ahead} requests are"
    return f"⏳ {ahead} ahead of you for {doing}{eta}…"


@dataclass
class AnswerView:
    """What one answer message shows; ``apply`` each part, then ``text()``."""

    # Shown until the first part arrives.
    opening: str = "👀 Looking at your image…"
    question: str = ""
    caption: str | None = None
    ocr: str | None = None
    tags: str | None = None
    social: str | None = None
    answer: str | None = None
    # "—" lines for parts that could not be made, by part.
    missing: dict[str, str] = field(default_factory=dict)
    status: str = ""
    done: bool = False

    @classmethod
    def of_answer(cls, shown: str) -> AnswerView:
        """The view of an answer the service stored (for a reroll, after a restart)."""
        values = json.loads(shown)
        view = cls(done=True)
        view.caption = values.get("caption") or None
        ocr = values.get("ocr")
        view.ocr = None if ocr is None else (ocr or "(none)")
        tags = values.get("tags")
        view.tags = " ".join(tags) if tags else None
        view.social = values.get("social") or None
        view.answer = values.get("answer") or None
        view.question = values.get("question", "")
        return view

    def apply(self, part: Part) -> None:
        match part:
            case Waiting() | WarmingUp():
                self.status = waiting_line(part)
            case StepProgress():
                self.status = f"🎨 Step {part.step} of {part.total}…"
            case Caption():
                self.caption, self.status = part.text, ""
            case OcrResult():
                self.ocr = part.text or "(none)"
            case Tags():
                self.tags = " ".join(part.hashtags) or None
            case SocialDraft():
                self.social, self.status = part.text, "✍️ Writing…"
            case SocialCaption():
                self.social, self.status = part.text, ""
            case Answer():
                self.answer, self.status = part.text, ""
            case Unavailable():
                self.missing[part.part] = part.reason
            case GeneratedImage():
                self.status = ""

    def finish(self, error: str | None = None) -> None:
        """No more parts: the status line goes, and an error, if any, takes its place."""
        self.done = True
        self.status = f"⚠️ {error}" if error else ""

    def text(self) -> str:
        blocks: list[str] = []
        if self.question:
            blocks.append(f"❓ {self.question}")
        if self.answer is not None:
            blocks.append(self.answer)
        if self.caption is not None:
            blocks.append(self.caption)
        elif "caption" in self.missing:
            blocks.append(f"— {self.missing['caption']}")
        for name, value in (("ocr", self.ocr), ("tags", self.tags), ("social", self.social)):
            if value is not None:
                title = _TITLES.get(name)
                blocks.append(f"{title}:\n{value}" if title else value)
            elif name in self.missing:
                blocks.append(f"— {self.missing[name]}")
        if self.status:
            blocks.append(self.status)
        if not blocks:
            blocks.append(self.opening)
        return "\n\n".join(blocks)
