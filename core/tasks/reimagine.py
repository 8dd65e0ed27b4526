"""Make an image from a prompt with Stable Diffusion: txt2img, or img2img on a given image.

One checkpoint (SD 1.x or 2.x, a diffusers folder or hub id) is loaded once; the img2img
pipeline is made from the txt2img one with ``from_pipe``, so both share every weight.

Rules:

1. Size: txt2img makes a square ``size`` x ``size`` image. img2img keeps the input's aspect
   ratio with its longer side ``size``; both sides are rounded down to multiples of 8 (what
   the VAE and UNet need) and the input is centre-cropped by those few pixels, never
   squashed. An input too long and narrow for that to leave 64 pixels across gets a
   shorter side of 64 and a longer side past ``size`` (at most 1280 at the 20:1 limit).
2. Steps, guidance and strength default to the settings; a request may override each one
   within the configured bounds. img2img runs ``int(steps * strength)`` denoising steps,
   which must be at least one.
3. Every image has its own seed (the request's, or a fresh random one) and its own
   ``torch.Generator`` on the CPU, so an image is reproducible from its seed whatever it
   was batched with and on whichever device. Requests with equal mode, size, steps,
   strength and guidance share one pipeline call.
4. With ``safety_checker`` on (the default) the checkpoint's checker must exist: loading a
   checkpoint without one fails. A flagged image is never returned; its caller gets
   ``ContentFlagged`` with ``FLAGGED_MESSAGE``, and the count of flagged images is logged.
5. ``forward_streaming`` publishes ``StepProgress`` after every denoising step and
   interrupts the pipeline once every caller of the batch has gone away.

Precision (``_runtime`` resolves the dtype):

| precision | CUDA                                      | CPU                                 |
|-----------|-------------------------------------------|-------------------------------------|
| ``none``  | fp16                                      | fp32                                |
| ``bf16``  | bf16                                      | bf16                                |
| ``int8``  | UNet bitsandbytes 8-bit, the rest fp16    | ConfigError                         |
| ``nf4``   | UNet bitsandbytes NF4, the rest bf16/fp16 | ConfigError                         |
| ``auto``  | ``none``                                  | ``bf16`` if native bf16, else fp32  |

diffusers' bitsandbytes quantizer refuses to run without a GPU ("No GPU found"), and
dynamic int8 only touches Linear layers while a UNet's time goes to convolutions, so on a
CPU int8 and nf4 are rejected at start rather than silently ignored.
"""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image, ImageOps

from core.errors import ConfigError, ContentFlagged, InferenceFailed, InvalidRequest
from core.images import check_image_bytes, decode_working
from core.settings import EngineSettings, Precision, ReimagineSettings
from core.streams import Stream
from core.task import output_identity
from core.tasks import _runtime
from core.types import GeneratedImage, ReimagineRequest, StepProgress

logger = logging.getLogger(__name__)

Mode = Literal["txt2img", "img2img"]

# diffusers' check_inputs requires sides divisible by 8 (SD's VAE downsamples by 8).
SIZE_MULTIPLE = 8
# SD's UNet halves 8-pixel latents three times; below 64 pixels there is nothing left.
MIN_SIDE = 64
# Seeds a person can read and type back; torch accepts any of them.
MAX_SEED = 2**32 - 1
# Warm-up and batch-size measurement need representative shapes, not a finished image.
SAMPLE_STEPS = 2
SAMPLE_PROMPT = "a photograph of a mountain lake surrounded by trees at sunrise"
FLAGGED_MESSAGE = "The generated image was flagged by the safety checker and was not sent."


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """One request, checked and resolved: every number the pipeline call needs."""

    prompt: str
    # img2img only: the input, already cropped and resized to ``width`` x ``height``.
    image: Image.Image | None
    width: int
    height: int
    steps: int
    guidance: float
    # img2img only.
    strength: float | None
    seed: int

    @property
    def mode(self) -> Mode:
        return "txt2img" if self.image is None else "img2img"


@dataclass(frozen=True, slots=True)
class RawImage:
    # None when the image was flagged or the batch was cancelled.
    image: Image.Image | None
    seed: int
    steps: int
    flagged: bool = False
    cancelled: bool = False


class ReimagineTask:
    """The ``reimagine`` task: ``ReimagineRequest`` -> ``GeneratedImage``."""

    name = "reimagine"

    def __init__(
        self,
        settings: ReimagineSettings,
        engine: EngineSettings,
        resolve_model: _runtime.ModelResolver = _runtime.as_given,
    ) -> None:
        _check_settings(settings)
        self.priority = settings.priority
        self.batching = settings.batching
        self._settings = settings
        self._size = settings.size // SIZE_MULTIPLE * SIZE_MULTIPLE
        self._device = _runtime.resolve_device(engine.device)
        self._plan = _runtime.plan(
            "reimagine", _precision(settings.precision, self._device), self._device
        )
        # SD repositories carry fp16 copies of every component: half the download, and
        # no fp32 weights cast down at every load.
        self._variant = "fp16" if self._plan.dtype == torch.float16 else None
        self._files = _runtime.ModelFiles(
            self.name,
            settings.model,
            resolve_model,
            engine.model_cache,
            layout="diffusers",
            variant=self._variant,
            without=() if settings.safety_checker else ("safety_checker", "feature_extractor"),
        )
        self._txt2img: Any = None
        self._img2img: Any = None
        # Only the device thread changes it.
        self._flagged = 0

    # -- event loop ------------------------------------------------------------------------

    def validate(self, request: ReimagineRequest) -> None:
        if not request.text.strip():
            raise InvalidRequest("The prompt is empty.")
        if len(request.text) > self._settings.max_prompt_chars:
            raise InvalidRequest(
                f"The prompt is longer than {self._settings.max_prompt_chars} characters."
            )
        if request.image is not None:
            check_image_bytes(request.image, request.name)
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequest(f"The seed must be between 0 and {MAX_SEED}.")
        self._numbers(request)

    def batch_key(self, item: PreparedImage) -> Hashable:
        return (item.mode, item.width, item.height, item.steps, item.strength, item.guidance)

    @property
    def precision(self) -> str:
        """The precision in use, with ``auto`` resolved."""
        return self._plan.precision

    @property
    def pipelines(self) -> tuple[Any, Any]:
        """The loaded txt2img and img2img pipelines (they share their components)."""
        if self._txt2img is None:
            raise RuntimeError("the reimagine model is not loaded")
        return self._txt2img, self._img2img

    @property
    def flagged_images(self) -> int:
        """Images the safety checker withheld since start."""
        return self._flagged

    def describe(self) -> str:
        checker = "on" if self._settings.safety_checker else "off"
        return (
            f"reimagine model {self._settings.model} on {self._plan.describe()}, "
            f"{self._size} px, safety checker {checker}"
        )

    def identity(self) -> str:
        return output_identity(self._settings.model, self._settings, self._plan.describe())

    def render_partial(self, partial: object) -> object:
        # StepProgress is already what a caller shows ("step 12 of 20").
        return partial

    def memory_bytes(self) -> int:
        """Bytes of the loaded weights and buffers (UNet, VAE, text encoder, safety checker)."""
        pipeline = self._txt2img
        if pipeline is None:
            return 0
        return sum(
            tensor.numel() * tensor.element_size()
            for component in pipeline.components.values()
            if isinstance(component, torch.nn.Module)
            for tensor in component.state_dict().values()
        )

    # -- CPU pool --------------------------------------------------------------------------

    def preprocess(self, request: ReimagineRequest) -> PreparedImage:
        steps, guidance, strength = self._numbers(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        if request.image is None:
            width = height = self._size
            image = None
        else:
            # Decoded no smaller than any size fit_size can ask for, and sized from the
            # full picture, so a large upload gets exactly the size a small one would.
            working = decode_working(
                request.image, request.name, min_long_side=self._size, min_short_side=MIN_SIDE
            )
            width, height = fit_size(*working.full_size, self._size)
            # fit crops the few pixels the rounding to multiples of 8 removed: no squashing.
            image = ImageOps.fit(working.image, (width, height), Image.Resampling.LANCZOS)
        return PreparedImage(
            prompt=request.text,
            image=image,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            strength=strength,
            seed=seed,
        )

    def postprocess(self, raw: RawImage) -> GeneratedImage:
        if raw.cancelled:
            raise InferenceFailed("The image generation was cancelled.")
        if raw.flagged:
            raise ContentFlagged(FLAGGED_MESSAGE)
        assert raw.image is not None  # only flagged and cancelled items have none
        buffer = io.BytesIO()
        raw.image.save(buffer, "PNG")
        return GeneratedImage(
            png=buffer.getvalue(),
            seed=raw.seed,
            width=raw.image.width,
            height=raw.image.height,
            steps=raw.steps,
        )

    # -- device thread ---------------------------------------------------------------------

    def fetch(self) -> None:
        """Download the model if it is not here yet (an I/O thread, before ``load``)."""
        self._files.folder()

    @_runtime.first_use
    def load(self) -> None:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        path = self._files.folder()
        kwargs: dict[str, Any] = {"dtype": self._plan.dtype}
        if self._variant is not None and _runtime.has_variant(path, self._variant):
            kwargs["variant"] = self._variant
        if not self._settings.safety_checker:
            # Not even loaded: SD 1.5's checker is a 300 M-parameter CLIP vision model.
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if self._plan.quantization_config is not None:
            kwargs["quantization_config"] = _unet_quantization(self._plan)
        with _runtime.loading(self.name, self._settings.model):
            txt2img = StableDiffusionPipeline.from_pretrained(path, **kwargs)
            if self._settings.safety_checker and txt2img.safety_checker is None:
                raise ConfigError(
                    f"reimagine.model {self._settings.model!r} has no safety checker; "
                    "use a checkpoint with one or set reimagine.safety_checker = false"
                )
            txt2img.to(self._device)
        # from_pipe casts the shared components to its dtype argument (fp32 when omitted),
        # which would silently undo fp16/bf16 for both pipelines.
        img2img = StableDiffusionImg2ImgPipeline.from_pipe(txt2img, dtype=self._plan.dtype)
        for pipeline in (txt2img, img2img):
            # One tqdm bar per call is noise in a bot's logs; StepProgress replaces it.
            pipeline.set_progress_bar_config(disable=True)
        self._txt2img, self._img2img = txt2img, img2img

    def sample(self, size: int) -> list[PreparedImage]:
        steps = min(max(SAMPLE_STEPS, self._settings.min_steps), self._settings.max_steps)
        return [
            PreparedImage(
                prompt=SAMPLE_PROMPT,
                image=None,
                width=self._size,
                height=self._size,
                steps=steps,
                guidance=self._settings.guidance,
                strength=None,
                seed=index,
            )
            for index in range(size)
        ]

    def forward(self, batch: Sequence[PreparedImage]) -> list[RawImage]:
        return self.forward_streaming(batch, [None] * len(batch))

    def forward_streaming(
        self, batch: Sequence[PreparedImage], streams: Sequence[Stream[object] | None]
    ) -> list[RawImage]:
        txt2img, img2img = self.pipelines
        first = batch[0]
        steps_run = 0

        def on_step_end(
            pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal steps_run
            steps_run = step + 1
            progress = StepProgress(step + 1, pipeline.num_timesteps)
            for stream in streams:
                if stream is not None:
                    stream.publish(progress)
            # A caller without a stream cannot cancel, so its presence keeps the work going.
            if all(stream is not None and stream.cancelled for stream in streams):
                # diffusers skips the remaining steps (it still decodes the latents once).
                pipeline._interrupt = True
            return tensors

        # 1. Per-item generators on the CPU: the same seed gives the same image anywhere.
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
        common: dict[str, Any] = {
            "prompt": [item.prompt for item in batch],
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "generator": generators,
            "callback_on_step_end": on_step_end,
            "output_type": "pil",
        }
        # 2. Denoise and decode the whole batch in one call.
        with torch.inference_mode():
            if first.mode == "txt2img":
                pipeline = txt2img
                output = pipeline(**common, width=first.width, height=first.height)
            else:
                pipeline = img2img
                output = pipeline(
                    **common, image=[item.image for item in batch], strength=first.strength
                )
        # 3. Withhold what the safety checker flagged; drop everything nobody waits for.
        if pipeline.interrupt:
            return [RawImage(None, item.seed, steps_run, cancelled=True) for item in batch]
        flags = output.nsfw_content_detected or [False] * len(batch)
        raws = []
        for item, image, flagged in zip(batch, output.images, flags, strict=True):
            if flagged:
                self._flagged += 1
                logger.warning(
                    "reimagine: the safety checker flagged an image (%d since start)",
                    self._flagged,
                )
            raws.append(RawImage(None if flagged else image, item.seed, steps_run, flagged))
        return raws

    def unload(self) -> None:
        self._txt2img = None
        self._img2img = None
        _runtime.free_memory(self._device)

    # -- internals -------------------------------------------------------------------------

    def _numbers(self, request: ReimagineRequest) -> tuple[int, float, float | None]:
        """Steps, guidance and strength with defaults applied; InvalidRequest if out of bounds."""
        s = self._settings
        steps = s.steps if request.steps is None else request.steps
        guidance = s.guidance if request.guidance is None else request.guidance
        if not s.min_steps <= steps <= s.max_steps:
            raise InvalidRequest(f"Steps must be between {s.min_steps} and {s.max_steps}.")
        if not s.min_guidance <= guidance <= s.max_guidance:
            raise InvalidRequest(
                f"Guidance must be between {s.min_guidance:g} and {s.max_guidance:g}."
            )
        if request.image is None:
            if request.strength is not None:
                raise InvalidRequest("Strength applies only when an image is given.")
            return steps, guidance, None
        strength = s.strength if request.strength is None else request.strength
        if not s.min_strength <= strength <= s.max_strength:
            raise InvalidRequest(
                f"Strength must be between {s.min_strength:g} and {s.max_strength:g}."
            )
        if int(steps * strength) < 1:
            raise InvalidRequest(
                f"{steps} steps at strength {strength:g} leave no step to run; "
                "raise the steps or the strength."
            )
        return steps, guidance, strength


def fit_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """``width`` x ``height`` scaled so the longer side is ``longest``, both sides rounded
    down to multiples of 8; an image too long and narrow for that to leave 64 pixels across
    is scaled so its shorter side is 64 instead, its longer side past ``longest``."""
    long_side, short_side = max(width, height), min(width, height)
    if short_side * longest // long_side >= MIN_SIDE:
        fitted_long, fitted_short = longest, short_side * longest // long_side
    else:
        # decode_image's MAX_ASPECT keeps this at most 20 x 64 = 1280 long.
        fitted_long, fitted_short = long_side * MIN_SIDE // short_side, MIN_SIDE
    fitted = (fitted_long, fitted_short) if width >= height else (fitted_short, fitted_long)
    new_width, new_height = (side // SIZE_MULTIPLE * SIZE_MULTIPLE for side in fitted)
    return new_width, new_height


def _check_settings(s: ReimagineSettings) -> None:
    if s.size < MIN_SIDE:
        raise ConfigError(f"reimagine.size must be at least {MIN_SIDE}")
    if not 1 <= s.min_steps <= s.steps <= s.max_steps:
        raise ConfigError("reimagine needs 1 <= min_steps <= steps <= max_steps")
    if not 0 <= s.min_guidance <= s.guidance <= s.max_guidance:
        raise ConfigError("reimagine needs 0 <= min_guidance <= guidance <= max_guidance")
    if not 0 < s.min_strength <= s.strength <= s.max_strength <= 1:
        raise ConfigError("reimagine needs 0 < min_strength <= strength <= max_strength <= 1")
    if int(s.steps * s.strength) < 1:
        raise ConfigError("reimagine.steps * reimagine.strength must give at least one step")
    if s.max_prompt_chars < 1:
        raise ConfigError("reimagine.max_prompt_chars must be at least 1")


def _precision(setting: Precision, device: torch.device) -> Precision:
    """Resolve ``auto`` for diffusion and refuse what cannot run on ``device``."""
    if device.type == "cuda":
        return setting
    if setting == "auto":
        # _runtime's CPU fallback is dynamic int8, which diffusion cannot use (see the table).
        return "bf16" if _runtime.cpu_has_native_bf16() else "none"
    if setting in ("int8", "nf4"):
        raise ConfigError(
            f"reimagine.precision = {setting!r} needs a CUDA GPU (bitsandbytes quantization "
            "in diffusers); on a CPU use 'none', 'bf16' or 'auto'"
        )
    return setting


@_runtime.first_use
def _unet_quantization(plan: _runtime.Plan) -> Any:
    """diffusers' bitsandbytes config for the UNet only: it holds about 80% of the weights,
    while the VAE is convolutions (not quantized) and the text encoder is small."""
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig

    if plan.precision == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=plan.dtype,
            bnb_4bit_use_double_quant=True,
        )
    # A mapping, not quant_backend: that form checks the diffusers and transformers config
    # signatures match, which differs between versions.
    return PipelineQuantizationConfig(quant_mapping={"unet": config})
