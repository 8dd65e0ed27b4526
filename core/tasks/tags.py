"""Suggest hashtags from a caption and the text found in the image, with a T5 tag generator.

The model (``fabiochiu/t5-base-tag-generation`` by default) reads the caption followed by
the OCR text, truncated to ``MAX_INPUT_TOKENS``, and writes comma-separated tags with
deterministic beam search. Each tag becomes one hashtag:

- lowercase; apostrophes dropped ("Rock 'n' Roll" -> ``#rock_n_roll``);
- each run of characters other than letters and digits (spaces, hyphens, ``&``, ``_``)
  becomes one underscore, with none at either end ("Street Art" -> ``#street_art``), the
  style of the bot's other labels (``#pastel_colors``); letters of any script are kept;
- tags left empty or purely numeric ("2023") are dropped;
- duplicates after normalisation are dropped, keeping the first; at most ``max_tags``.

No tags at all is a valid answer (``Tags(())``), not an error.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from core.errors import ConfigError, InvalidRequest
from core.settings import EngineSettings, TagsSettings
from core.task import output_identity
from core.tasks import _runtime
from core.tasks._text import collapse_repetition
from core.types import Tags, TagsRequest

logger = logging.getLogger(__name__)

# The tag model was trained on inputs of up to 512 tokens.
MAX_INPUT_TOKENS = 512

_APOSTROPHES = re.compile(r"['’ʼ`]")
# Letters and digits of any script: \w without the underscore.
_WORD = re.compile(r"[^\W_]+")

_SAMPLES = (
    "A cat sitting on a red couch next to a window.",
    "Street art painted on a brick wall in the city. OPEN 24 HOURS",
    "A bowl of fruit on a wooden table in a kitchen.",
    "Two people riding bicycles down a busy street at sunset.",
    "A polar bear swimming in cold blue water.",
    "A plate of rice with vegetables and chicken. MENU Lunch special",
    "A mountain lake surrounded by green trees and snow.",
    "A group of children playing football in the park.",
)

TokenIds = tuple[int, ...]


class TagsTask:
    """The ``tags`` task: ``TagsRequest`` -> ``Tags``."""

    name = "tags"

    def __init__(
        self,
        settings: TagsSettings,
        engine: EngineSettings,
        resolve_model: _runtime.ModelResolver = _runtime.as_given,
    ) -> None:
        if settings.max_new_tokens < 1:
            raise ConfigError("tags.max_new_tokens must be at least 1")
        if not 0 <= settings.min_new_tokens <= settings.max_new_tokens:
            raise ConfigError("tags.min_new_tokens must be between 0 and tags.max_new_tokens")
        if settings.num_beams < 1:
            raise ConfigError("tags.num_beams must be at least 1")
        if settings.max_tags < 1:
            raise ConfigError("tags.max_tags must be at least 1")
        self.priority = settings.priority
        self.batching = settings.batching
        self._settings = settings
        self._files = _runtime.ModelFiles(
            self.name, settings.model, resolve_model, engine.model_cache
        )
        self._device = _runtime.resolve_device(engine.device)
        self._plan = _runtime.plan("tags", settings.precision, self._device, engine.cpu_int8)
        self._model: Any = None
        # Preprocess can run before load (the first request triggers loading), so the
        # tokenizer is loaded on first use by whichever thread needs it first.
        self._tokenizer_value: Any = None
        # transformers reconfigures truncation and padding on the shared Rust tokenizer on
        # every call, so two threads using it at once fail with "Already borrowed".
        self._tokenizer_lock = threading.Lock()

    # -- event loop ------------------------------------------------------------------------

    def validate(self, request: TagsRequest) -> None:
        if not request.caption.strip() and not request.ocr_text.strip():
            raise InvalidRequest(
                "There is nothing to tag: the caption and the image text are both empty."
            )

    def batch_key(self, item: TokenIds) -> Hashable:
        return None

    def describe(self) -> str:
        return f"tags model {self._settings.model} on {self._plan.describe()}"

    def identity(self) -> str:
        return output_identity(self._settings.model, self._settings, self._plan.describe())

    # -- CPU pool --------------------------------------------------------------------------

    def preprocess(self, request: TagsRequest) -> TokenIds:
        return self._encode(f"{request.caption} {request.ocr_text}")

    def postprocess(self, raw: TokenIds) -> Tags:
        tokenizer = self._tokenizer()
        with self._tokenizer_lock:
            text = tokenizer.decode(list(raw), skip_special_tokens=True)
        return Tags(hashtags(text, self._settings.max_tags))

    # -- device thread ---------------------------------------------------------------------

    def fetch(self) -> None:
        """Download the model if it is not here yet (an I/O thread, before ``load``)."""
        self._files.folder()

    @_runtime.first_use
    def load(self) -> None:
        from transformers import AutoModelForSeq2SeqLM

        self._tokenizer()
        path = self._files.folder()
        with _runtime.loading(self.name, self._settings.model):
            _runtime.check_room(self._device, path, self._plan)
            model = AutoModelForSeq2SeqLM.from_pretrained(
                path, **self._plan.from_pretrained_kwargs()
            )
        self._model = self._plan.finish(model)

    def sample(self, size: int) -> list[TokenIds]:
        return [self._encode(_SAMPLES[i % len(_SAMPLES)]) for i in range(size)]

    def forward(self, batch: Sequence[TokenIds]) -> list[TokenIds]:
        model = self._model
        if model is None:
            raise RuntimeError("TagsTask.forward called before load()")
        width = max(len(ids) for ids in batch)
        pad = model.config.pad_token_id
        input_ids = torch.tensor([[*ids, *[pad] * (width - len(ids))] for ids in batch])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                num_beams=self._settings.num_beams,
                min_new_tokens=self._settings.min_new_tokens,
                max_new_tokens=self._settings.max_new_tokens,
                # Sampling made the seed project's tags change from run to run.
                do_sample=False,
            )
        return [tuple(row) for row in output.cpu().tolist()]

    def memory_bytes(self) -> int:
        return _runtime.state_bytes(self._model)

    def unload(self) -> None:
        # The tokenizer stays: it is small, CPU-only and in use by requests in flight.
        self._model = None
        _runtime.free_memory(self._device)

    # -- internals -------------------------------------------------------------------------

    def _tokenizer(self) -> Any:
        if self._tokenizer_value is not None:  # loaded: no lock on the hot path
            return self._tokenizer_value
        with _runtime.FIRST_USE:
            if self._tokenizer_value is None:
                from transformers import AutoTokenizer

                # A failure is remembered by the engine, which tells the operator once.
                with _runtime.loading(self.name, self._settings.model):
                    self._tokenizer_value = AutoTokenizer.from_pretrained(self._files.folder())
            return self._tokenizer_value

    def _encode(self, text: str) -> TokenIds:
        tokenizer = self._tokenizer()
        with self._tokenizer_lock:
            ids = tokenizer(
                " ".join(text.split()), truncation=True, max_length=MAX_INPUT_TOKENS
            ).input_ids
        return tuple(ids)


def hashtags(generated: str, max_tags: int) -> tuple[str, ...]:
    """Turn the model's comma-separated tags into at most ``max_tags`` distinct hashtags."""
    seen: dict[str, None] = {}
    for tag in generated.split(","):
        hashtag = to_hashtag(tag)
        if hashtag is not None:
            seen.setdefault(hashtag)
        if len(seen) == max_tags:
            break
    return tuple(seen)


def to_hashtag(tag: str) -> str | None:
    """``"Street Art"`` -> ``"#street_art"``; ``None`` for a tag with no letters."""
    words = _WORD.findall(_APOSTROPHES.sub("", tag.lower()))
    if not words or all(word.isdigit() for word in words):
        return None
    # A tag that loops ("front riding front riding front riding") keeps one round.
    return "#" + "_".join(collapse_repetition(" ".join(words))[0].split())
