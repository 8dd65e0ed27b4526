"""Model residency with real (tiny) models: a budget smaller than all models together."""

from __future__ import annotations

from pathlib import Path

from core.engine import Engine
from core.settings import BatchSettings, CaptionSettings, EngineSettings, TagsSettings
from core.tasks.caption import CaptionTask
from core.tasks.tags import TagsTask
from core.tiny import resolve_model
from core.types import Caption, CaptionRequest, Tags, TagsRequest
from tests import imagekit

MB = 1024 * 1024


def tasks(cache: Path) -> dict[str, CaptionTask | TagsTask]:
    engine = EngineSettings(device="cpu", model_cache=cache)
    fixed = BatchSettings(batch_size=1)
    return {
        "blip2": CaptionTask(
            CaptionSettings(model="tiny/blip2-opt", precision="none", batching=fixed),
            engine,
            resolve_model=resolve_model,
        ),
        "blip": CaptionTask(
            CaptionSettings(model="tiny/blip-caption", precision="none", batching=fixed),
            engine,
            resolve_model=resolve_model,
        ),
        "tags": TagsTask(
            TagsSettings(model="tiny/t5-tags", precision="none", batching=fixed),
            engine,
            resolve_model=resolve_model,
        ),
    }


def measured_sizes(cache: Path) -> dict[str, int]:
    sizes = {}
    for name, task in tasks(cache).items():
        task.load()
        sizes[name] = task.memory_bytes()
        task.unload()
    return sizes


async def test_the_least_recently_used_model_makes_room_and_every_request_succeeds(
    model_cache: Path, single_torch_thread: None
) -> None:
    sizes = measured_sizes(model_cache)
    # Any two models fit, all three do not.
    budget = max(a + b for a in sizes.values() for b in sizes.values()) + 1024
    assert budget < sum(sizes.values())
    models = tasks(model_cache)
    settings = EngineSettings(device="cpu", model_cache=model_cache, memory_budget_mb=budget / MB)
    image = imagekit.encode(imagekit.noise())
    resident_peaks: list[float] = []
    async with Engine(models, settings) as engine:  # type: ignore[arg-type]
        for name in ["blip2", "blip", "tags", "blip2", "tags", "blip"]:
            if name == "tags":
                outcome = await engine.run(name, TagsRequest("a cat on a couch"))
                assert isinstance(outcome.value, Tags)
            else:
                outcome = await engine.run(name, CaptionRequest(image))
                assert isinstance(outcome.value, Caption)
            stats = engine.stats()
            resident_peaks.append(stats.resident_mb)
            assert stats.resident_mb * MB <= budget
            assert sum(task.memory_bytes() for task in models.values()) <= budget
        loaded = {t.name for t in engine.stats().tasks if t.loaded}
    # Loading "tags" evicted blip2 (least recent), "blip2" evicted blip, and so on.
    assert len(loaded) == 2
    assert max(resident_peaks) * MB > max(sizes.values())  # two models really were resident
