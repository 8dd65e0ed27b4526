"""Answer a question about an image with BLIP VQA, or with a BLIP-2 checkpoint and a prompt.

The family is read from the checkpoint's config: ``blip`` runs ``BlipForQuestionAnswering``
(``Salesforce/blip-vqa-base``); ``blip-2`` runs ``Blip2ForConditionalGeneration`` on
``vqa.prompt`` ("Question: {question} Answer:") and decodes only what follows the prompt.

Questions differ in length, so each item keeps its own token ids and ``forward`` pads the
batch: BLIP on the right (its question encoder masks the padding), BLIP-2 on the left (the
OPT decoder continues the last token of every row and takes positions from the mask). Any
questions may therefore share a forward.

An answer must not depend on the other questions in its batch, and transformers gets in the
way twice: ``BlipForQuestionAnswering.generate`` gives the answer decoder an all-ones mask
over the question, and (transformers 5.23) BLIP's text layers drop any cross-attention mask
on the way in. So ``forward`` runs the same three steps itself (vision encoder, question
encoder, answer decoder) with the question's real mask, and ``load`` hooks the decoder's
cross-attention so that mask arrives; a test checks batched answers equal one-by-one ones.

Answer text rules, applied in ``postprocess`` (``clean_answer``, tested directly):

1. A BLIP-2 model that runs on into a new turn of its prompt ("two Question: what ...",
   "two\\nQuestion: ...") is cut there, and an echoed "Answer:" at the start is dropped.
2. Whitespace is collapsed; U+FFFD and control characters (byte-level tokenizers decode
   stray bytes to them) and punctuation or quotes at either end are removed: answers are
   short phrases.
3. The first letter is capitalised ("Two", "Yes", "A red car").

An answer with nothing left is an error (``InferenceFailed``): the task never invents an
answer such as "I don't know", which a reader would take for the model's.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from core.errors import ConfigError, InferenceFailed, InvalidRequest
from core.images import check_image_bytes, decode_working
from core.settings import EngineSettings, VqaSettings
from core.task import output_identity
from core.tasks import _runtime
from core.tasks._text import collapse_repetition
from core.types import Answer, AskRequest

logger = logging.getLogger(__name__)

_EDGE_PUNCTUATION = ".,;:!?-–—\"'“”‘’()[]{}"
_SAMPLE_QUESTIONS = (
    "What is in the picture?",
    "How many people are there?",
    "What colour is the car parked on the left side of the street?",
    "Is it raining?",
)


@dataclass(frozen=True, slots=True)
class PreparedQuestion:
    # (1, 3, H, W) on the CPU.
    pixel_values: torch.Tensor
    # The question (BLIP) or the whole prompt with its image tokens (BLIP-2), unpadded.
    input_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GeneratedAnswer:
    # Only the answer's tokens: never the prompt.
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Processing:
    """Everything preprocess and postprocess need from the checkpoint; no model weights."""

    path: str
    model_type: str
    processor: Any
    pad_token_id: int


class VqaTask:
    """The ``vqa`` task: ``AskRequest`` -> ``Answer``."""

    name = "vqa"

    def __init__(
        self,
        settings: VqaSettings,
        engine: EngineSettings,
        resolve_model: _runtime.ModelResolver = _runtime.as_given,
    ) -> None:
        if settings.max_new_tokens < 1:
            raise ConfigError("vqa.max_new_tokens must be at least 1")
        if not 0 <= settings.min_new_tokens <= settings.max_new_tokens:
            raise ConfigError("vqa.min_new_tokens must be between 0 and vqa.max_new_tokens")
        if settings.num_beams < 1:
            raise ConfigError("vqa.num_beams must be at least 1")
        if settings.max_question_chars < 1:
            raise ConfigError("vqa.max_question_chars must be at least 1")
        try:
            settings.prompt.format(question="")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(
                "vqa.prompt may contain no braces other than {question}, e.g. "
                "'Question: {question} Answer:'"
            ) from None
        if "{question}" not in settings.prompt:
            raise ConfigError("vqa.prompt must contain {question}")
        self.priority = settings.priority
        self.batching = settings.batching
        self._settings = settings
        self._files = _runtime.ModelFiles(
            self.name, settings.model, resolve_model, engine.model_cache
        )
        self._device = _runtime.resolve_device(engine.device)
        self._plan = _runtime.plan("vqa", settings.precision, self._device, engine.cpu_int8)
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

    def validate(self, request: AskRequest) -> None:
        question = " ".join(request.question.split())
        if not question:
            raise InvalidRequest("The question is empty; ask something about the image.")
        limit = self._settings.max_question_chars
        if len(question) > limit:
            raise InvalidRequest(f"The question is longer than {limit} characters.")
        check_image_bytes(request.image, request.name)

    def batch_key(self, item: PreparedQuestion) -> Hashable:
        # Padding lets questions of any length share a forward.
        return None

    @property
    def precision(self) -> str:
        """The precision in use, with ``auto`` resolved."""
        return self._plan.precision

    def describe(self) -> str:
        return f"vqa model {self._settings.model} on {self._plan.describe()}"

    def identity(self) -> str:
        return output_identity(self._settings.model, self._settings, self._plan.describe())

    def memory_bytes(self) -> int:
        # Measured once at load: packing dynamic int8 weights into a state_dict is slow.
        return self._memory_bytes

    # -- CPU pool --------------------------------------------------------------------------

    def preprocess(self, request: AskRequest) -> PreparedQuestion:
        # The processor shrinks every image to the model's input: decode not much more.
        side = max(_input_size(self._processing().processor.image_processor))
        image = decode_working(
            request.image, request.name, min_long_side=side, min_short_side=side
        ).image
        return self._prepare(image, " ".join(request.question.split()))

    def postprocess(self, raw: GeneratedAnswer) -> Answer:
        processing = self._processing()
        with self._tokenizer_lock:
            decoded = processing.processor.tokenizer.decode(
                list(raw.token_ids), skip_special_tokens=True
            )
        prompt = self._settings.prompt if processing.model_type == "blip-2" else ""
        text = clean_answer(decoded, prompt)
        if not text:
            logger.warning("vqa model returned no usable answer: %r", decoded)
            raise InferenceFailed("The model could not answer this question about the image.")
        return Answer(text)

    # -- device thread ---------------------------------------------------------------------

    def fetch(self) -> None:
        """Download the model if it is not here yet (an I/O thread, before ``load``)."""
        self._files.folder()

    @_runtime.first_use
    def load(self) -> None:
        from transformers import AutoModelForVisualQuestionAnswering

        processing = self._processing()
        with _runtime.loading(self.name, self._settings.model):
            _runtime.check_room(self._device, processing.path, self._plan)
            model = AutoModelForVisualQuestionAnswering.from_pretrained(
                processing.path, **self._plan.from_pretrained_kwargs()
            )
        self._model = self._plan.finish(model)
        if processing.model_type == "blip":
            _mask_question_padding(self._model)
        # Pixels enter through the patch-embedding convolution, so they must match its
        # weights; bitsandbytes and dynamic int8 quantize Linear layers only, never that.
        conv = next((m for m in self._model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        self._pixel_dtype = conv.weight.dtype if conv is not None else self._model.dtype
        self._memory_bytes = _runtime.state_bytes(self._model)

    def sample(self, size: int) -> list[PreparedQuestion]:
        processing = self._processing()
        height, width = _input_size(processing.processor.image_processor)
        return [
            self._prepare(
                _synthetic_image(i, width, height), _SAMPLE_QUESTIONS[i % len(_SAMPLE_QUESTIONS)]
            )
            for i in range(size)
        ]

    def forward(self, batch: Sequence[PreparedQuestion]) -> list[GeneratedAnswer]:
        model = self._model
        if model is None:
            raise RuntimeError("VqaTask.forward called before load()")
        processing = self._processing()
        device = model.device
        blip2 = processing.model_type == "blip-2"
        input_ids, attention_mask = _pad(
            [item.input_ids for item in batch], processing.pad_token_id, left=blip2
        )
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        pixel_values = torch.cat([item.pixel_values for item in batch]).to(
            device, dtype=self._pixel_dtype
        )
        generation = {
            "max_new_tokens": self._settings.max_new_tokens,
            "min_new_tokens": self._settings.min_new_tokens,
            "num_beams": self._settings.num_beams,
            # Answers are deterministic: some checkpoints ship do_sample=True.
            "do_sample": False,
        }
        with torch.inference_mode():
            if blip2:
                output = model.generate(
                    pixel_values=pixel_values,
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    **generation,
                )
                # A decoder-only model returns the prompt too; every row has the same width.
                answers = output[:, input_ids.shape[1] :]
            else:
                answers = _blip_answer(model, pixel_values, input_ids, attention_mask, generation)
        return [GeneratedAnswer(tuple(row)) for row in answers.cpu().tolist()]

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

    def _prepare(self, image: Image.Image, question: str) -> PreparedQuestion:
        processing = self._processing()
        text = (
            self._settings.prompt.format(question=question)
            if processing.model_type == "blip-2"
            else question
        )
        # The processor tokenizes too (BLIP-2 adds its <image> tokens), so it needs the lock.
        with self._tokenizer_lock:
            encoded = processing.processor(images=image, text=text, return_tensors="pt")
        return PreparedQuestion(encoded["pixel_values"], tuple(encoded["input_ids"][0].tolist()))


def _blip_answer(
    model: Any,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation: dict[str, Any],
) -> torch.Tensor:
    """``BlipForQuestionAnswering.generate`` with the question's padding masked out."""
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    question = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    ).last_hidden_state
    text_config = model.config.text_config
    start = torch.full(
        (input_ids.shape[0], 1), text_config.bos_token_id, dtype=torch.long, device=input_ids.device
    )
    output = model.text_decoder.generate(
        input_ids=start,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        encoder_hidden_states=question,
        encoder_attention_mask=attention_mask,
        **generation,
    )
    return output[:, 1:]  # without the [DEC] start token


def _mask_question_padding(model: Any) -> None:
    """Make the answer decoder's cross-attention honour its mask.

    ``BlipTextAttention`` hands the mask to its inner attention as ``attention_mask``,
    which that module ignores when cross-attending in favour of an ``encoder_attention_mask``
    nobody passes; the hook passes it. Where a later transformers passes it itself, the
    hook does nothing.
    """
    for layer in model.text_decoder.bert.encoder.layer:
        layer.crossattention.self.register_forward_pre_hook(_pass_cross_mask, with_kwargs=True)


def _pass_cross_mask(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if (
        kwargs.get("encoder_hidden_states") is not None
        and kwargs.get("encoder_attention_mask") is None
    ):
        kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
    return args, kwargs


def _pad(
    rows: Sequence[Sequence[int]], pad: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids: list[list[int]] = []
    mask: list[list[int]] = []
    for row in rows:
        fill = width - len(row)
        if left:
            ids.append([pad] * fill + list(row))
            mask.append([0] * fill + [1] * len(row))
        else:
            ids.append(list(row) + [pad] * fill)
            mask.append([1] * len(row) + [0] * fill)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


@_runtime.first_use
def _load_processing(path: str) -> _Processing:
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ("blip", "blip-2"):
        raise ConfigError(
            f"{path}: vqa needs a BLIP VQA or BLIP-2 checkpoint, not {config.model_type!r}"
        )
    processor = AutoProcessor.from_pretrained(path)
    if config.model_type == "blip-2" and processor.num_query_tokens != config.num_query_tokens:
        # The processor inserts one <image> token per query; with a wrong count a prompted
        # generate silently ignores the image.
        raise ConfigError(
            f"{path}: the BLIP-2 processor's num_query_tokens ({processor.num_query_tokens}) "
            f"differs from the model's ({config.num_query_tokens}); use a current checkpoint"
        )
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        raise ConfigError(f"{path}: the tokenizer has no padding token to batch questions with")
    return _Processing(path, config.model_type, processor, pad)


def _input_size(image_processor: Any) -> tuple[int, int]:
    size = image_processor.size
    height = size.height or size.shortest_edge
    width = size.width or size.shortest_edge
    return int(height), int(width)


def _synthetic_image(index: int, width: int, height: int) -> Image.Image:
    generator = torch.Generator().manual_seed(index)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


# -- answer text -----------------------------------------------------------------------------


def clean_answer(decoded: str, prompt: str = "") -> str:
    """Apply the answer text rules of this module; empty when nothing is left.

    ``prompt`` is the BLIP-2 prompt template; its text around ``{question}`` ("Question:",
    "Answer:") marks where a model that runs on starts a new turn.
    """
    head, _, tail = prompt.partition("{question}")
    head, tail = head.strip(), tail.strip()
    text = decoded.strip()
    if tail:
        text = re.sub(f"^{re.escape(tail)}", "", text, flags=re.IGNORECASE)
    text = text.strip().split("\n", 1)[0]
    for marker in (head, tail):
        if marker:
            text = re.split(re.escape(marker), text, maxsplit=1, flags=re.IGNORECASE)[0]
    text = "".join(" " if char == "\ufffd" or not char.isprintable() else char for char in text)
    text = " ".join(text.split()).strip(_EDGE_PUNCTUATION + " ")
    # Random or undertrained weights loop ("street street street"); one is the answer.
    text, _ = collapse_repetition(text)
    return text[:1].upper() + text[1:]
