"""Mood and colour labels for an image, by CLIP zero-shot classification.

Scoring (``label_embeddings``, ``zero_shot_logits`` and ``select_labels`` below, tested
directly):

1. Each label is written into each of its kind's prompt templates ("a {} photo"); the
   label's text embedding is the mean of the normalised template embeddings, normalised
   again (CLIP's prompt ensembling). These never change, so ``load`` computes them once.
2. An image's logit for a label is the cosine of the two embeddings times CLIP's learned
   ``logit_scale`` (100 for ``openai/clip-vit-base-patch32``).
3. Softmax runs separately over the moods and over the colours: "joyful" competes with
   "melancholic", never with "vibrant".
4. A label is kept when its probability reaches ``mood.threshold``; the kept labels are
   sorted by score, highest first. An image may get no label, one, or several: a flat
   distribution means CLIP sees none of them, and saying nothing beats the seed's
   always-two-of-each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from core.errors import ConfigError
from core.images import check_image_bytes, decode_working
from core.settings import EngineSettings, MoodSettings
from core.task import output_identity
from core.tasks import _runtime
from core.types import MoodLabel, MoodLabels, MoodRequest

logger = logging.getLogger(__name__)

MOOD = "mood"
COLOUR = "colour"


@dataclass(frozen=True, slots=True)
class PreparedImage:
    # (1, 3, H, W) on the CPU.
    pixel_values: torch.Tensor


# One logit per label, in the task's label order (moods, then colours).
Logits = tuple[float, ...]


@dataclass(frozen=True, slots=True)
class _Label:
    name: str
    kind: str
    templates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Processing:
    path: str
    image_processor: Any
    tokenizer: Any


class MoodTask:
    """The ``mood`` task: ``MoodRequest`` -> ``MoodLabels``."""

    name = "mood"

    def __init__(
        self,
        settings: MoodSettings,
        engine: EngineSettings,
        resolve_model: _runtime.ModelResolver = _runtime.as_given,
    ) -> None:
        if not 0.0 <= settings.threshold <= 1.0:
            raise ConfigError("mood.threshold must be between 0 and 1")
        labels: list[_Label] = []
        kinds = (
            (MOOD, "mood", settings.mood_labels, settings.mood_templates),
            (COLOUR, "colour", settings.colour_labels, settings.colour_templates),
        )
        for kind, key, names, templates in kinds:
            if names and not templates:
                raise ConfigError(f"mood.{key}_templates needs at least one template")
            for template in templates:
                if template.count("{}") != 1 or _formats_badly(template):
                    raise ConfigError(
                        f"mood.{key}_templates: {template!r} must contain {{}} once "
                        "and no other braces"
                    )
            if any(not name.strip() for name in names) or len(set(names)) != len(names):
                raise ConfigError(f"mood.{key}_labels must be distinct, non-empty labels")
            labels += [_Label(name, kind, templates) for name in names]
        if not labels:
            raise ConfigError("mood needs at least one label in mood_labels or colour_labels")
        self.priority = settings.priority
        self.batching = settings.batching
        self._settings = settings
        self._labels = tuple(labels)
        self._files = _runtime.ModelFiles(
            self.name, settings.model, resolve_model, engine.model_cache
        )
        self._device = _runtime.resolve_device(engine.device)
        self._plan = _runtime.plan("mood", settings.precision, self._device, engine.cpu_int8)
        self._model: Any = None
        self._memory_bytes = 0
        self._pixel_dtype = self._plan.dtype
        # (labels, dim) float32 on the device, from load.
        self._label_embeddings: torch.Tensor | None = None
        self._logit_scale = 1.0
        # Preprocess can run before load (the first request triggers loading), so the
        # processor is loaded on first use by whichever thread needs it first.
        self._processing_value: _Processing | None = None
        # Rust tokenizers are not safe to call from two threads at once.
        self._tokenizer_lock = threading.Lock()

    # -- event loop ------------------------------------------------------------------------

    def validate(self, request: MoodRequest) -> None:
        check_image_bytes(request.image, request.name)

    def batch_key(self, item: PreparedImage) -> Hashable:
        # Every image is resized to the model's input size.
        return None

    @property
    def precision(self) -> str:
        """The precision in use, with ``auto`` resolved."""
        return self._plan.precision

    def describe(self) -> str:
        return (
            f"mood model {self._settings.model} on {self._plan.describe()}, "
            f"{len(self._labels)} labels"
        )

    def identity(self) -> str:
        return output_identity(self._settings.model, self._settings, self._plan.describe())

    def memory_bytes(self) -> int:
        # Measured once at load: packing dynamic int8 weights into a state_dict is slow.
        return self._memory_bytes

    # -- CPU pool --------------------------------------------------------------------------

    def preprocess(self, request: MoodRequest) -> PreparedImage:
        # CLIP resizes the shorter side to this, then crops: decode not much more.
        side = self._processing().image_processor.size.shortest_edge
        working = decode_working(
            request.image, request.name, min_long_side=side, min_short_side=side
        )
        return self._prepare(working.image)

    def postprocess(self, raw: Logits) -> MoodLabels:
        return select_labels(
            raw,
            [label.name for label in self._labels],
            [label.kind for label in self._labels],
            self._settings.threshold,
        )

    # -- device thread ---------------------------------------------------------------------

    def fetch(self) -> None:
        """Download the model if it is not here yet (an I/O thread, before ``load``)."""
        self._files.folder()

    @_runtime.first_use
    def load(self) -> None:
        from transformers import AutoModel

        processing = self._processing()
        with _runtime.loading(self.name, self._settings.model):
            _runtime.check_room(self._device, processing.path, self._plan)
            model = AutoModel.from_pretrained(
                processing.path, **self._plan.from_pretrained_kwargs()
            )
        self._model = self._plan.finish(model)
        # Pixels enter through the patch-embedding convolution, so they must match its
        # weights; bitsandbytes and dynamic int8 quantize Linear layers only, never that.
        conv = next((m for m in self._model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        self._pixel_dtype = conv.weight.dtype if conv is not None else self._model.dtype
        self._logit_scale = float(self._model.logit_scale.detach().float().exp())
        self._label_embeddings = self._embed_labels(processing.tokenizer)
        self._memory_bytes = _runtime.state_bytes(self._model)

    def sample(self, size: int) -> list[PreparedImage]:
        processing = self._processing()
        height, width = _input_size(processing.image_processor)
        return [self._prepare(_synthetic_image(i, width, height)) for i in range(size)]

    def forward(self, batch: Sequence[PreparedImage]) -> list[Logits]:
        model = self._model
        labels = self._label_embeddings
        if model is None or labels is None:
            raise RuntimeError("MoodTask.forward called before load()")
        pixel_values = torch.cat([item.pixel_values for item in batch]).to(
            model.device, dtype=self._pixel_dtype
        )
        with torch.inference_mode():
            features = model.get_image_features(pixel_values=pixel_values).pooler_output
            logits = zero_shot_logits(features, labels, self._logit_scale)
        return [tuple(row) for row in logits.cpu().tolist()]

    def unload(self) -> None:
        # The processor stays: it is small, CPU-only and in use by requests in flight.
        self._model = None
        self._label_embeddings = None
        self._memory_bytes = 0
        _runtime.free_memory(self._device)

    # -- internals -------------------------------------------------------------------------

    def _processing(self) -> _Processing:
        if self._processing_value is not None:  # loaded: no lock on the hot path
            return self._processing_value
        with _runtime.FIRST_USE:
            if self._processing_value is None:
                # A failure is remembered by the engine, which tells the operator once.
                with _runtime.loading(self.name, self._settings.model):
                    self._processing_value = _load_processing(self._files.folder())
            return self._processing_value

    def _prepare(self, image: Image.Image) -> PreparedImage:
        processing = self._processing()
        pixels = processing.image_processor(image, return_tensors="pt").pixel_values
        return PreparedImage(pixels)

    def _embed_labels(self, tokenizer: Any) -> torch.Tensor:
        """(labels, dim): every label in every template of its kind, ensembled."""
        model = self._model
        prompts = [
            template.format(label.name) for label in self._labels for template in label.templates
        ]
        with self._tokenizer_lock:
            encoded = tokenizer(
                prompts,
                padding=True,
                truncation=True,
                max_length=model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            )
        with torch.inference_mode():
            features = model.get_text_features(
                input_ids=encoded.input_ids.to(model.device),
                attention_mask=encoded.attention_mask.to(model.device),
            ).pooler_output
        per_label: list[torch.Tensor] = []
        start = 0
        for label in self._labels:
            end = start + len(label.templates)
            per_label.append(label_embeddings(features[start:end].unsqueeze(0))[0])
            start = end
        return torch.stack(per_label)


def _formats_badly(template: str) -> bool:
    try:
        template.format("label")
    except (IndexError, KeyError, ValueError):
        return True
    return False


@_runtime.first_use
def _load_processing(path: str) -> _Processing:
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(path)
    if config.model_type != "clip":
        raise ConfigError(f"{path}: mood needs a CLIP checkpoint, not {config.model_type!r}")
    processor = AutoProcessor.from_pretrained(path)
    return _Processing(path, processor.image_processor, processor.tokenizer)


def _input_size(image_processor: Any) -> tuple[int, int]:
    # CLIP resizes the short side, then centre-crops to this.
    size = image_processor.crop_size
    return int(size.height), int(size.width)


def _synthetic_image(index: int, width: int, height: int) -> Image.Image:
    generator = torch.Generator().manual_seed(index)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


# -- scoring ---------------------------------------------------------------------------------


def label_embeddings(template_embeddings: torch.Tensor) -> torch.Tensor:
    """(labels, templates, dim) -> (labels, dim), float32: normalise each template's
    embedding, average a label's templates, normalise the mean."""
    unit = torch.nn.functional.normalize(template_embeddings.float(), dim=-1)
    return torch.nn.functional.normalize(unit.mean(dim=1), dim=-1)


def zero_shot_logits(
    image_features: torch.Tensor, labels: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """(images, dim) x (labels, dim) unit rows -> (images, labels): cosine times the scale."""
    images = torch.nn.functional.normalize(image_features.float(), dim=-1)
    return logit_scale * images @ labels.to(images.device, torch.float32).T


def select_labels(
    logits: Sequence[float], names: Sequence[str], kinds: Sequence[str], threshold: float
) -> MoodLabels:
    """Softmax within each kind, keep probabilities >= ``threshold``, highest first."""
    scores = torch.tensor(logits, dtype=torch.float64)
    kept: list[MoodLabel] = []
    for kind in dict.fromkeys(kinds):
        members = [i for i, k in enumerate(kinds) if k == kind]
        probabilities = torch.softmax(scores[members], dim=0).tolist()
        kept += [
            MoodLabel(names[i], kind, p)
            for i, p in zip(members, probabilities, strict=True)
            if p >= threshold
        ]
    return MoodLabels(tuple(sorted(kept, key=lambda label: -label.score)))
