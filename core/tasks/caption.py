"""Caption an image in one sentence with BLIP, BLIP-2, GIT, a ViT-GPT2 encoder-decoder or
Kosmos-2.

The model family is read from the checkpoint's config, so switching captioner is a change
of ``caption.model`` only. A ``prefix`` ("a photography of") makes the caption continue it.

Kosmos-2 (``microsoft/kosmos-2-patch14-224``) is prompted with its own "<grounding>An image
of": the grounding tag makes it mark phrases with boxes, and "An image of" is its lead-in,
not the user's, so it is dropped from the caption. A prefix takes the lead-in's place
("<grounding>a photography of") and is kept like any prefix. The processor's
``post_process_generation`` turns the tagged text into clean text and grounded phrases,
which become ``Caption.entities`` (``grounded_caption``). The tags cost about six tokens per
phrase, so Kosmos-2 wants ``caption.max_new_tokens`` near 128 rather than BLIP's 30, and the
n-gram guard sees them too: with ``no_repeat_ngram_size = 3`` two phrases boxed from the
same corner patch cannot both write "</phrase><object><patch_index_N>" (0 turns it off).

Caption text rules, applied in ``postprocess`` (pure functions below, tested directly):

1. The prefix the model echoes back is removed and the caption is ``prefix + continuation``,
   so the prefix appears exactly once whether or not the model family echoes its prompt.
2. BLIP's "arafed"/"araffe" artefact words are removed.
3. A word or phrase repeated three or more times in a row ("a polar polar polar bear") is
   cut back to its first occurrence and the caption is marked ``degenerate``.
4. The first letter is capitalised and the sentence ends with a full stop.

A caption with nothing left beyond the prefix is an error (``NoUsableText``): the task
never invents filler text, and an empty string would push the check into every adapter.

Kosmos-2's entities follow the text through these rules: each phrase is found again in the
final caption (so ``caption.text[start:end] == entity.text``), and a phrase the rules
removed is dropped with its boxes. Boxes are ``(x0, y0, x1, y1)`` fractions in 0..1.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from core.errors import ConfigError, InvalidRequest, NoUsableText
from core.images import decode_working
from core.settings import CaptionSettings, EngineSettings
from core.task import output_identity
from core.tasks import _runtime
from core.tasks._text import collapse_repetition
from core.types import Caption, CaptionRequest, Entity

logger = logging.getLogger(__name__)

MAX_PREFIX_CHARS = 200

_ARTEFACTS = re.compile(r"\bar{1,2}af{1,2}(?:e|ed|es|y|ay|ly)?\b", re.IGNORECASE)
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?])")
_EDGE_PUNCTUATION = ".,;:!?-–—\"'()[]"

# Kosmos-2's own prompt: the tag asks for grounded phrases, the words are its lead-in.
KOSMOS_GROUNDING = "<grounding>"
KOSMOS_LEAD_IN = "An image of"

# (phrase, (start, end), boxes) as Kosmos2Processor.post_process_generation gives them.
RawEntity = tuple[str, tuple[int, int], Sequence[Sequence[float]]]


@dataclass(frozen=True, slots=True)
class PreparedCaption:
    # One item's model inputs (batch dimension 1) on the CPU; items with equal prefixes
    # have identical prompt tensors, so they concatenate into one batch.
    inputs: dict[str, torch.Tensor]
    prefix: str
    # A reroll: sampled, so each call gives another caption.
    sample: bool = False


@dataclass(frozen=True, slots=True)
class GeneratedCaption:
    token_ids: tuple[int, ...]
    prefix: str


@dataclass(frozen=True, slots=True)
class _Processing:
    """Everything preprocess and postprocess need from the checkpoint; no model weights."""

    path: str
    model_type: str
    processor: Any
    image_processor: Any
    tokenizer: Any
    decoder_start_token_id: int | None


class CaptionTask:
    """The ``caption`` task: ``CaptionRequest`` -> ``Caption``."""

    name = "caption"

    def __init__(
        self,
        settings: CaptionSettings,
        engine: EngineSettings,
        resolve_model: _runtime.ModelResolver = _runtime.as_given,
    ) -> None:
        if settings.max_new_tokens < 1:
            raise ConfigError("caption.max_new_tokens must be at least 1")
        if not 0 <= settings.min_new_tokens <= settings.max_new_tokens:
            raise ConfigError("caption.min_new_tokens must be between 0 and caption.max_new_tokens")
        if settings.num_beams < 1:
            raise ConfigError("caption.num_beams must be at least 1")
        self.priority = settings.priority
        self.batching = settings.batching
        self._settings = settings
        self._files = _runtime.ModelFiles(
            self.name, settings.model, resolve_model, engine.model_cache
        )
        self._device = _runtime.resolve_device(engine.device)
        self._plan = _runtime.plan("caption", settings.precision, self._device, engine.cpu_int8)
        self._model: Any = None
        self._memory_bytes = 0
        self._pixel_dtype = self._plan.dtype
        # Preprocess can run before load (the first request triggers loading), so the
        # processor is loaded on first use by whichever thread needs it first.
        self._processing_value: _Processing | None = None
        # transformers reconfigures truncation and padding on the shared Rust tokenizer on
        # every call, so two threads using it at once fail with "Already borrowed".
        self._tokenizer_lock = threading.Lock()

    # -- event loop ------------------------------------------------------------------------

    def validate(self, request: CaptionRequest) -> None:
        if len(request.prefix) > MAX_PREFIX_CHARS:
            raise InvalidRequest(
                f"The caption prefix is longer than {MAX_PREFIX_CHARS} characters."
            )

    def batch_key(self, item: PreparedCaption) -> Hashable:
        return item.prefix, item.sample

    @property
    def precision(self) -> str:
        """The precision in use, with ``auto`` resolved."""
        return self._plan.precision

    def describe(self) -> str:
        return f"caption model {self._settings.model} on {self._plan.describe()}"

    def identity(self) -> str:
        return output_identity(self._settings.model, self._settings, self._plan.describe())

    def memory_bytes(self) -> int:
        # Measured once at load: packing dynamic int8 weights into a state_dict is slow.
        return self._memory_bytes

    # -- CPU pool --------------------------------------------------------------------------

    def preprocess(self, request: CaptionRequest) -> PreparedCaption:
        # The processor shrinks every image to the model's input: decode not much more.
        side = max(_input_size(self._processing().image_processor))
        image = decode_working(
            request.image, request.name, min_long_side=side, min_short_side=side
        ).image
        prepared = self._prepare(image, request.prefix or self._settings.prefix)
        return dataclasses.replace(prepared, sample=request.sample) if request.sample else prepared

    def postprocess(self, raw: GeneratedCaption) -> Caption:
        processing = self._processing()
        with self._tokenizer_lock:
            decoded = processing.tokenizer.decode(list(raw.token_ids), skip_special_tokens=True)
        if processing.model_type == "kosmos-2":
            # The grounding tags are ordinary added tokens, so the decoded text keeps them.
            text, entities = processing.processor.post_process_generation(decoded)
            caption = grounded_caption(text, entities, raw.prefix)
        else:
            caption = clean_caption(decoded, raw.prefix)
        if not caption.text:
            logger.warning("caption model returned no usable text: %r", decoded)
            raise NoUsableText("The caption model could not describe this image.")
        return caption

    # -- device thread ---------------------------------------------------------------------

    def fetch(self) -> None:
        """Download the model if it is not here yet (an I/O thread, before ``load``)."""
        self._files.folder()

    @_runtime.first_use
    def load(self) -> None:
        from transformers import AutoModelForImageTextToText

        processing = self._processing()
        with _runtime.loading(self.name, self._settings.model):
            _runtime.check_room(self._device, processing.path, self._plan)
            model = AutoModelForImageTextToText.from_pretrained(
                processing.path, **self._plan.from_pretrained_kwargs()
            )
        self._model = self._plan.finish(model)
        # Pixels enter through the patch-embedding convolution, so they must match its
        # weights; bitsandbytes and dynamic int8 quantize Linear layers only, never that.
        conv = next((m for m in self._model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        self._pixel_dtype = conv.weight.dtype if conv is not None else self._model.dtype
        self._memory_bytes = _runtime.state_bytes(self._model)

    def sample(self, size: int) -> list[PreparedCaption]:
        processing = self._processing()
        height, width = _input_size(processing.image_processor)
        return [
            self._prepare(_synthetic_image(i, width, height), self._settings.prefix)
            for i in range(size)
        ]

    def forward(self, batch: Sequence[PreparedCaption]) -> list[GeneratedCaption]:
        model = self._model
        if model is None:
            raise RuntimeError("CaptionTask.forward called before load()")
        device = model.device
        inputs: dict[str, torch.Tensor] = {}
        for key in batch[0].inputs:
            stacked = torch.cat([item.inputs[key] for item in batch])
            if stacked.is_floating_point():
                inputs[key] = stacked.to(device, dtype=self._pixel_dtype)
            else:
                inputs[key] = stacked.to(device)
        # Captions are deterministic (some checkpoints ship do_sample=True), except a
        # reroll, which samples nucleus-style for a different but still likely sentence.
        search: dict[str, Any] = (
            {"do_sample": True, "top_p": 0.9, "temperature": 1.0, "num_beams": 1}
            if batch[0].sample
            else {"do_sample": False, "num_beams": self._settings.num_beams}
        )
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=self._settings.max_new_tokens,
                min_new_tokens=self._settings.min_new_tokens,
                no_repeat_ngram_size=self._settings.no_repeat_ngram_size,
                **search,
            )
        rows = output.cpu().tolist()
        return [
            GeneratedCaption(tuple(row), item.prefix) for row, item in zip(rows, batch, strict=True)
        ]

    def unload(self) -> None:
        # The processor stays: it is small, CPU-only and in use by requests in flight.
        self._model = None
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

    def _prepare(self, image: Image.Image, prefix: str) -> PreparedCaption:
        prefix = " ".join(prefix.split())
        processing = self._processing()
        if processing.processor is not None and processing.model_type != "git":
            text = prefix or None
            if processing.model_type == "kosmos-2":
                text = KOSMOS_GROUNDING + (prefix or KOSMOS_LEAD_IN)
            # The processor tokenizes too (BLIP-2 adds its <image> tokens), so it needs the lock.
            with self._tokenizer_lock:
                encoded = processing.processor(images=image, text=text, return_tensors="pt")
            return PreparedCaption(dict(encoded), prefix)
        pixels = processing.image_processor(image, return_tensors="pt").pixel_values
        inputs = {"pixel_values": pixels}
        if prefix:
            with self._tokenizer_lock:
                ids = processing.tokenizer(prefix, add_special_tokens=False).input_ids
            if processing.model_type == "git":
                # GIT continues a [CLS]-led prompt; a plain encode's final [SEP] would end it.
                prompt = torch.tensor([[processing.tokenizer.cls_token_id, *ids]])
                inputs["input_ids"] = prompt
                inputs["attention_mask"] = torch.ones_like(prompt)
            else:
                prompt = torch.tensor([[processing.decoder_start_token_id, *ids]])
                inputs["decoder_input_ids"] = prompt
        return PreparedCaption(inputs, prefix)


@_runtime.first_use
def _load_processing(path: str) -> _Processing:
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "vision-encoder-decoder":
        # These checkpoints ship an image processor and a tokenizer but no processor class.
        return _Processing(
            path=path,
            model_type=config.model_type,
            processor=None,
            image_processor=AutoImageProcessor.from_pretrained(path),
            tokenizer=AutoTokenizer.from_pretrained(path),
            decoder_start_token_id=config.decoder_start_token_id,
        )
    processor = AutoProcessor.from_pretrained(path)
    if config.model_type == "blip-2" and processor.num_query_tokens != config.num_query_tokens:
        # The processor inserts one <image> token per query; with a wrong count a prompted
        # generate silently ignores the image.
        raise ConfigError(
            f"{path}: the BLIP-2 processor's num_query_tokens ({processor.num_query_tokens}) "
            f"differs from the model's ({config.num_query_tokens}); use a current checkpoint"
        )
    return _Processing(
        path=path,
        model_type=config.model_type,
        processor=processor,
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        decoder_start_token_id=None,
    )


def _input_size(image_processor: Any) -> tuple[int, int]:
    size = image_processor.size
    height = size.height or size.shortest_edge
    width = size.width or size.shortest_edge
    return int(height), int(width)


def _synthetic_image(index: int, width: int, height: int) -> Image.Image:
    generator = torch.Generator().manual_seed(index)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


# -- caption text ----------------------------------------------------------------------------


def clean_caption(decoded: str, prefix: str = "") -> Caption:
    """Apply the caption text rules of this module; ``text`` is empty when nothing is left."""
    prefix = " ".join(prefix.split())
    body = strip_echo(decoded, prefix)
    text = f"{prefix} {body}" if prefix else body
    text, degenerate = collapse_repetition(strip_artefacts(text))
    if not strip_echo(text, prefix).strip(_EDGE_PUNCTUATION + " "):
        return Caption("", degenerate)
    return Caption(_as_sentence(text), degenerate)


def grounded_caption(text: str, entities: Sequence[RawEntity], prefix: str = "") -> Caption:
    """Kosmos-2's post-processed text and phrases as a ``Caption`` with ``entities``.

    Without ``prefix`` the model's lead-in ("An image of") is dropped; with one, the prefix
    rules of ``clean_caption`` apply. Each phrase that has boxes is found again in the final
    text, in order, nearest to where it was; phrases without words (Kosmos-2 names a box
    without a phrase "<patch_index_…>") or no longer in the text are dropped.
    """
    prefix = " ".join(prefix.split())
    body = text if prefix else strip_echo(text, KOSMOS_LEAD_IN)
    caption = clean_caption(body, prefix)
    if not caption.text:
        return caption
    # How far the text moved left, to break ties between repeats of a phrase.
    shift = len(text) - len(body)
    found: list[Entity] = []
    cursor = 0
    for name, (start, _end), boxes in sorted(entities, key=lambda entity: entity[1][0]):
        phrase = " ".join(name.split())
        if not phrase or phrase.startswith("<") or not boxes:
            continue
        pattern = re.compile(re.escape(phrase), re.IGNORECASE)
        hits = list(pattern.finditer(caption.text, cursor))
        if not hits:
            continue
        hit = min(hits, key=lambda match: abs(match.start() - (start - shift)))
        found.append(Entity(hit.group(), hit.span(), tuple(_unit_box(box) for box in boxes)))
        cursor = hit.end()
    return Caption(caption.text, caption.degenerate, tuple(found))


def _unit_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    """Corners in order and inside the image: a random or confused model can give a
    lower-right patch above or left of the upper-left one."""
    x0, y0, x1, y1 = (min(1.0, max(0.0, float(value))) for value in box)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def strip_echo(text: str, prefix: str) -> str:
    """``text`` without a leading copy of ``prefix``, ignoring case and spacing.

    Tokenizers lowercase ("A Photo" comes back "a photo") and respace ("it's" -> "it ' s"),
    so the comparison skips whitespace on both sides.
    """
    position = 0
    for char in prefix:
        if char.isspace():
            continue
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text) or text[position].casefold() != char.casefold():
            return text
        position += 1
    return text[position:].strip()


def strip_artefacts(text: str) -> str:
    """Remove BLIP's "arafed"/"araffe" non-words and tidy the spacing they leave.

    Also drops U+FFFD and other unprintable characters: a byte-level tokenizer that stops
    inside a multi-byte character decodes the stray bytes to them, and they mean nothing
    to a reader.
    """
    readable = "".join(c if c.isprintable() and c != "\ufffd" else " " for c in text)
    return _tidy(_ARTEFACTS.sub(" ", readable))


def _tidy(text: str) -> str:
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))


def _as_sentence(text: str) -> str:
    text = text.strip().rstrip(",;:-–— ")
    if not text.endswith((".", "!", "?")):
        text += "."
    return text[0].upper() + text[1:]
