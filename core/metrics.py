"""What the bot counts and times, for Prometheus (``prometheus-client``).

The metrics live in one registry of their own, ``REGISTRY``, which the web adapter serves
at ``/metrics``; the code that sees an event records it here (one line at each place).
What the engine holds at a given moment (models loaded, their memory, queues) is read
from ``Engine.stats`` when Prometheus scrapes, rather than kept up to date in gauges.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from core.types import EngineStats

REGISTRY = CollectorRegistry()

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "captionbot_requests",
    "Requests by platform, use case and outcome (ok, refused, failed, cancelled).",
    ["platform", "kind", "outcome"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "captionbot_queue_wait_seconds",
    "Time a model request waited before its batch reached the device.",
    ["task"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
DEVICE_TIME = Histogram(
    "captionbot_device_seconds",
    "Device time of the batch that carried a model request.",
    ["task"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "captionbot_batch_size",
    "Requests per batch run on the device.",
    ["task"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
    registry=REGISTRY,
)
RESULTS_CACHE = Counter(
    "captionbot_results_cache",
    "Model results found in the store (hit) or computed (miss).",
    ["task", "result"],
    registry=REGISTRY,
)
MODEL_LOADS = Counter(
    "captionbot_model_loads", "Models loaded onto the device.", ["task"], registry=REGISTRY
)
MODEL_UNLOADS = Counter(
    "captionbot_model_unloads", "Models unloaded from the device.", ["task"], registry=REGISTRY
)
MODEL_LOAD_TIME = Histogram(
    "captionbot_model_load_seconds",
    "Time to load a model, its batch-size measurement included.",
    ["task"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
WARMING_UP = Counter(
    "captionbot_warming_up_waits",
    "Requests told to wait while their model was loading.",
    ["task"],
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "captionbot_platform_rate_limited",
    "Times a chat platform asked the bot to slow down (HTTP 429).",
    ["platform"],
    registry=REGISTRY,
)
RECOVERED = Counter(
    "captionbot_journal_recovered",
    "Journalled events answered after a restart.",
    ["platform"],
    registry=REGISTRY,
)
QUOTA_REFUSALS = Counter(
    "captionbot_quota_refusals",
    "Requests refused by a daily quota or the per-user limit on requests at once.",
    ["limit"],
    registry=REGISTRY,
)


class _EngineCollector(Collector):
    """The engine's state at scrape time, from the engine most recently started."""

    def __init__(self) -> None:
        self._stats: weakref.WeakMethod[Callable[[], EngineStats]] | None = None

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        # Weakly: a finished engine (tests start many) is not kept alive by its metrics.
        self._stats = weakref.WeakMethod(stats)

    def collect(self) -> Iterator[Metric]:
        read = self._stats() if self._stats is not None else None
        stats = read() if read is not None else None
        loaded = GaugeMetricFamily(
            "captionbot_model_loaded", "1 if the model is loaded.", labels=["task"]
        )
        memory = GaugeMetricFamily(
            "captionbot_model_resident_bytes",
            "Device memory a loaded model takes, as measured after its load.",
            labels=["task"],
        )
        queued = GaugeMetricFamily(
            "captionbot_queued_requests", "Requests waiting for the device.", labels=["task"]
        )
        in_flight = GaugeMetricFamily(
            "captionbot_engine_in_flight", "Model requests admitted and not finished."
        )
        alive = GaugeMetricFamily("captionbot_engine_alive", "1 while the device thread is alive.")
        if stats is not None:
            for task in stats.tasks:
                loaded.add_metric([task.name], 1.0 if task.loaded else 0.0)
                memory.add_metric(
                    [task.name], (task.memory_mb or 0.0) * 1024 * 1024 if task.loaded else 0.0
                )
                queued.add_metric([task.name], float(task.queued))
            in_flight.add_metric([], float(stats.in_flight))
            alive.add_metric([], 0.0 if stats.dead else 1.0)
        yield from (loaded, memory, queued, in_flight, alive)


ENGINE = _EngineCollector()
REGISTRY.register(ENGINE)
