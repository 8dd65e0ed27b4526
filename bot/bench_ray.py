"""``python -m bot bench caption --backend ray --replicas 1,2``: the captioner on Ray Serve.

The same real-size architecture, precision and images as ``bench caption``, through the
engine three ways in one run: on this process's device (the baseline), then as a Ray
Serve deployment with each number of replicas asked for. Ray is started here, on this
machine's cores, split evenly between the replicas (Ray gives each replica's PyTorch as
many threads as the cores it reserved), so on one machine the figures show what the Ray
round trips cost and how the replicas share it; the gain from replicas comes with more
machines or GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters.ray import RayBackend, RayExecutor
from bot.bench import BENCH_MODEL, cpu_auto_precision, picture, run_engine
from core.engine import Engine
from core.errors import InferenceFailed
from core.executor import usable_cores
from core.settings import (
    BatchSettings,
    CaptionSettings,
    EngineSettings,
    RayDeployment,
    RaySettings,
)
from core.types import CaptionRequest


def bench_caption_ray(
    images: int, tokens: int, cache_dir: Path, replicas: Sequence[int], model: str = BENCH_MODEL
) -> dict[str, Any]:
    from core.tasks.caption import CaptionTask
    from core.tiny import resolve_model

    cores = usable_cores()
    settings = EngineSettings(device="cpu", model_cache=cache_dir, max_in_flight=4 * images)
    caption = CaptionSettings(
        model=resolve_model(model, cache_dir),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        num_beams=1,
        no_repeat_ngram_size=0,
        precision="auto",
        batching=BatchSettings(batch_size=None, max_batch_size=8, max_wait_ms=50),
    )
    requests = [CaptionRequest(picture(i), f"bench{i}") for i in range(images)]
    make = functools.partial(CaptionTask, caption, settings)
    local = asyncio.run(run_engine("caption", make(), settings, requests))

    # Ray's own lines (its workers', and the raylet's as Serve shuts down) are printed on
    # stdout, which is the JSON's: they go to stderr instead.
    with contextlib.redirect_stdout(sys.stderr):
        on_ray = _on_ray(cores, settings, make, requests, replicas, local.rate)
    return {
        "model": model,
        "images": images,
        "tokens_per_image": tokens,
        "precision": cpu_auto_precision(),
        "cores": cores,
        "local_images_per_s": round(local.rate, 3),
        "local_batch_size": local.batch_size,
        "ray": on_ray,
    }


def _on_ray(
    cores: int,
    settings: EngineSettings,
    make: Any,
    requests: Sequence[CaptionRequest],
    replicas: Sequence[int],
    local_rate: float,
) -> dict[str, dict[str, float | int]]:
    backend = RayBackend(RaySettings(num_cpus=cores), settings, replica_logs=False)
    backend.start()
    on_ray: dict[str, dict[str, float | int]] = {}
    try:
        for count in replicas:
            deployment = RayDeployment(replicas=count, cpus=cores / count)
            rate, batch = asyncio.run(_ray_run(deployment, make, settings, requests))
            on_ray[str(count)] = {
                "images_per_s": round(rate, 3),
                "replica_batch_size": batch,
                "vs_local": round(rate / local_rate, 2),
            }
    finally:
        backend.stop()
    return on_ray


async def _ray_run(
    deployment: RayDeployment,
    make: Any,
    settings: EngineSettings,
    requests: Sequence[CaptionRequest],
) -> tuple[float, int]:
    """Images per second through the engine on ``deployment``, and each replica's batch."""
    # Ray is up (``backend.start``): a backend for this one deployment only makes tasks.
    remote = RayBackend(RaySettings(tasks={"caption": deployment}), settings).tasks(
        {"caption": make}
    )
    try:
        async with Engine(remote, settings, executor=RayExecutor()) as engine:
            await engine.ensure_loaded("caption")
            started = time.perf_counter()
            outcomes = await asyncio.gather(
                *(engine.run("caption", r) for r in requests), return_exceptions=True
            )
            elapsed = time.perf_counter() - started
            for outcome in outcomes:
                # As in bench caption: random weights may decode to punctuation only.
                if isinstance(outcome, BaseException) and not isinstance(outcome, InferenceFailed):
                    raise outcome
            per_replica = engine.batch_size("caption") // deployment.replicas
            return len(requests) / elapsed, per_replica
    finally:
        await asyncio.to_thread(remote["caption"].unload)
