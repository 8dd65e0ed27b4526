"""``python -m bot bench caption|overhead``: side-by-side throughput, printed as JSON.

These machines are noisy, so every figure that matters is a ratio of runs made one after
the other in the same process, on the same model architecture and token count.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from core.engine import Engine
from core.errors import InferenceFailed
from core.settings import BatchSettings, CaptionSettings, EngineSettings
from core.types import CaptionRequest

# BLIP base architecture (ViT-B/16 at 384 px + BERT-base decoder, 224 M parameters) with
# random weights: the compute of Salesforce/blip-image-captioning-base without a download.
BENCH_MODEL = "random/blip-base"

T = TypeVar("T")


def run_bench(args: argparse.Namespace) -> int:
    if args.which == "overhead":
        result = asyncio.run(bench_overhead(args.items))
    else:
        result = bench_caption(args.images, args.tokens, _cache_dir(args), args.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
    return 0


def _cache_dir(args: argparse.Namespace) -> Path:
    from bot.cli import settings_from

    return Path(settings_from(args).engine.model_cache)


# -- caption ----------------------------------------------------------------------------


def bench_caption(
    images: int, tokens: int, cache_dir: Path, model: str = BENCH_MODEL
) -> dict[str, Any]:
    """The seed tool's loop (fp32, one ``generate`` per image) against the engine."""
    import torch

    from core.tiny import resolve_model

    torch.manual_seed(0)
    folder = resolve_model(model, cache_dir)
    pictures = [_picture(i) for i in range(images)]

    seed_rate = _seed_loop(folder, pictures, tokens)
    base = CaptionSettings(
        model=folder,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        num_beams=1,
        no_repeat_ngram_size=0,
        batching=BatchSettings(batch_size=None, max_batch_size=8, max_wait_ms=50),
    )
    engine_settings = EngineSettings(device="cpu", model_cache=cache_dir, max_in_flight=4 * images)
    fp32 = asyncio.run(_engine_run(replace(base, precision="none"), engine_settings, pictures))
    chosen = asyncio.run(_engine_run(replace(base, precision="auto"), engine_settings, pictures))
    return {
        "model": model,
        "images": images,
        "tokens_per_image": tokens,
        "threads": torch.get_num_threads(),
        "seed_loop_images_per_s": round(seed_rate, 3),
        "engine_fp32_images_per_s": round(fp32.rate, 3),
        "engine_images_per_s": round(chosen.rate, 3),
        "speedup": round(chosen.rate / seed_rate, 2),
        "speedup_fp32": round(fp32.rate / seed_rate, 2),
        "loop_lag_p99_ms": round(max(fp32.lag_p99_ms, chosen.lag_p99_ms), 2),
        "precision": chosen.precision,
        "batch_size": chosen.batch_size,
        "batch_size_fp32": fp32.batch_size,
    }


def _picture(index: int) -> bytes:
    from PIL import Image

    # Distinct, photo-sized inputs so decoding and resizing cost what they would for users.
    image = Image.new(
        "RGB", (640, 480), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    )
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _seed_loop(folder: str, pictures: list[bytes], tokens: int) -> float:
    """What the seed tool does: fp32, one image at a time, in order."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()

    def caption(data: bytes) -> str:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
        return str(processor.decode(ids[0], skip_special_tokens=True))

    caption(pictures[0])  # warm-up, as the engine gets its own at load time
    started = time.perf_counter()
    for data in pictures:
        caption(data)
    return len(pictures) / (time.perf_counter() - started)


@dataclass
class EngineRun:
    rate: float
    lag_p99_ms: float
    precision: str
    batch_size: int


async def _engine_run(
    caption: CaptionSettings, settings: EngineSettings, pictures: list[bytes]
) -> EngineRun:
    from core.tasks.caption import CaptionTask

    task = CaptionTask(caption, settings)
    async with Engine({"caption": task}, settings) as engine:
        await engine.ensure_loaded("caption")
        requests = [CaptionRequest(data, f"bench{i}") for i, data in enumerate(pictures)]
        started = time.perf_counter()
        work = asyncio.gather(*(engine.run("caption", r) for r in requests), return_exceptions=True)
        lags, outcomes = await _measure_lag(work)
        elapsed = time.perf_counter() - started
        for outcome in outcomes:
            # Random weights may decode to punctuation only, which the caption clean-up
            # refuses after the device did the full work; anything else is a real failure.
            if isinstance(outcome, BaseException) and not isinstance(outcome, InferenceFailed):
                raise outcome
        return EngineRun(
            rate=len(pictures) / elapsed,
            lag_p99_ms=_percentile(lags, 99) * 1000,
            precision=task.precision,
            batch_size=engine.batch_size("caption"),
        )


async def _measure_lag(work: Awaitable[T], tick_s: float = 0.01) -> tuple[list[float], T]:
    """How late a 10 ms timer fires on the event loop while ``work`` runs, and its result."""
    future = asyncio.ensure_future(work)
    lags: list[float] = []
    while not future.done():
        before = time.perf_counter()
        await asyncio.sleep(tick_s)
        lags.append(max(0.0, time.perf_counter() - before - tick_s))
    return lags or [0.0], await future


def _percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


# -- overhead ---------------------------------------------------------------------------


@dataclass
class NoopTask:
    """A task whose phases do nothing: what is left is the engine's own cost."""

    name: str = "noop"
    priority: int = 0
    batching: BatchSettings = field(
        default_factory=lambda: BatchSettings(batch_size=64, max_wait_ms=1)
    )

    def validate(self, request: int) -> None:
        pass

    def preprocess(self, request: int) -> int:
        return request

    def batch_key(self, item: int) -> Hashable:
        return None

    def load(self) -> None:
        pass

    def sample(self, size: int) -> list[int]:
        return list(range(size))

    def forward(self, batch: Sequence[int]) -> Sequence[int]:
        return batch

    def postprocess(self, raw: int) -> int:
        return raw

    def unload(self) -> None:
        pass

    def describe(self) -> str:
        return "no-op"


async def bench_overhead(items: int, concurrency: int = 256) -> dict[str, Any]:
    settings = EngineSettings(device="cpu", max_in_flight=concurrency * 2)
    latencies: list[float] = []
    async with Engine({"noop": NoopTask()}, settings) as engine:
        await engine.ensure_loaded("noop")

        async def one(value: int) -> None:
            started = time.perf_counter()
            await engine.run("noop", value)
            latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await _bounded(items, concurrency, one)
        elapsed = time.perf_counter() - started
    # Overhead per item when it is alone: run sequentially, no batch companions to wait for.
    alone: list[float] = []
    async with Engine(
        {"noop": NoopTask(batching=BatchSettings(batch_size=1, max_wait_ms=0))}, settings
    ) as engine:
        for value in range(500):
            t0 = time.perf_counter()
            await engine.run("noop", value)
            alone.append(time.perf_counter() - t0)
    return {
        "items": items,
        "concurrency": concurrency,
        "items_per_s": round(items / elapsed),
        "overhead_p50_ms": round(statistics.median(alone) * 1000, 3),
        "overhead_p99_ms": round(_percentile(alone, 99) * 1000, 3),
        "loaded_latency_p50_ms": round(statistics.median(latencies) * 1000, 3),
    }


async def _bounded(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> None:
    queue = iter(range(count))

    async def worker() -> None:
        for value in queue:
            await one(value)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_bench(argparse.Namespace(which="overhead", json=True, items=20000)))
