"""Operators' view of a running bot: the Prometheus metrics and the health endpoints, read
over HTTP from a real aiohttp server on 127.0.0.1 while requests go through the service."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.memory import MemoryStore
from adapters.web import create_app, serve
from core import metrics
from core.engine import Engine
from core.errors import CaptionbotError
from core.ports import ChatRef, UserRef
from core.service import Service
from core.settings import EngineSettings, ServiceSettings
from core.types import Origin, Upload
from tests.fakes import FakeCaptioner, FakeReader
from tests.imagekit import encode, noise

WEB = Origin(UserRef("web", "visitor"), ChatRef("web", "visitor"))
LOOPBACK = (ip_network("127.0.0.0/8"),)
DASHBOARD = Path(__file__).parent.parent / "monitoring/grafana/dashboards/captionbot.json"


@asynccontextmanager
async def served(service: Service, **options: Any) -> AsyncIterator[str]:
    app = create_app(service, max_upload_bytes=1 << 20, **options)
    runner = await serve(app, "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics serves, by name and labels, as Prometheus would parse it."""
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Any, float], name: str) -> float:
    return sum(v for (sample, _), v in samples.items() if sample == name)


async def test_the_metrics_move_with_requests_through_the_service(tmp_path: Path) -> None:
    tasks = {"caption": FakeCaptioner(), "ocr": FakeReader()}
    engine_settings = EngineSettings(device="cpu", model_cache=tmp_path)
    async with Engine(tasks, engine_settings) as engine:  # type: ignore[arg-type]
        service = Service(engine, MemoryStore(), ServiceSettings(daily_describe=2))
        async with served(service, metrics_from=LOOPBACK) as base:
            before = await scrape(base)
            image = encode(noise(seed=3))
            await service.caption(WEB, Upload(image))
            await service.caption(WEB, Upload(image))  # the same image: from the store
            for refused in (Upload(b"not an image"), Upload(encode(noise(seed=4)))):
                with pytest.raises(CaptionbotError):
                    await service.caption(WEB, refused)  # a bad file, then the quota
            after = await scrape(base)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"platform": "web", "kind": "caption", "outcome": "ok"}
    assert moved("captionbot_requests_total", **ok) == 2
    refused = {"platform": "web", "kind": "caption", "outcome": "refused"}
    assert moved("captionbot_requests_total", **refused) == 2
    assert moved("captionbot_results_cache_total", task="caption", result="miss") == 1
    assert moved("captionbot_results_cache_total", task="caption", result="hit") == 1
    assert (
        total(after, "captionbot_quota_refusals_total")
        - total(before, "captionbot_quota_refusals_total")
        == 1
    )
    for histogram in ("queue_wait_seconds", "device_seconds", "batch_size"):
        assert moved(f"captionbot_{histogram}_count", task="caption") == 1
    assert moved("captionbot_model_loads_total", task="caption") == 1
    assert value(after, "captionbot_model_loaded", task="caption") == 1
    assert value(after, "captionbot_engine_alive") == 1


async def test_metrics_are_served_only_to_the_networks_named(tmp_path: Path) -> None:
    tasks = {"caption": FakeCaptioner(), "ocr": FakeReader()}
    engine_settings = EngineSettings(device="cpu", model_cache=tmp_path)
    async with Engine(tasks, engine_settings) as engine:  # type: ignore[arg-type]
        service = Service(engine, MemoryStore(), ServiceSettings())
        elsewhere = (ip_network("10.0.0.0/8"),)
        for networks in ((), elsewhere):
            async with (
                served(service, metrics_from=networks) as base,
                aiohttp.ClientSession() as http,
                http.get(base + "/metrics") as response,
            ):
                assert response.status == 404
        # From loopback, but through a reverse proxy: any client of the proxy, so no.
        async with served(service, metrics_from=LOOPBACK) as base, aiohttp.ClientSession() as http:
            for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                proxied = {header: "203.0.113.9"}
                async with http.get(base + "/metrics", headers=proxied) as response:
                    assert response.status == 404
            async with http.get(base + "/metrics") as response:
                assert response.status == 200


async def test_readyz_turns_unready_when_the_engine_dies_while_healthz_stays_up(
    tmp_path: Path,
) -> None:
    gate = threading.Event()  # never opened while the test runs: the forward hangs
    tasks = {"caption": FakeCaptioner(gate=gate), "ocr": FakeReader()}
    engine_settings = EngineSettings(device="cpu", model_cache=tmp_path, forward_timeout_s=0.5)
    engine = Engine(tasks, engine_settings)  # type: ignore[arg-type]
    await engine.start()
    try:
        service = Service(engine, MemoryStore(), ServiceSettings())
        async with served(service) as base, aiohttp.ClientSession() as http:
            async with http.get(base + "/readyz") as response:
                assert response.status == 200
                assert await response.json() == {
                    "ready": True,
                    "checks": {"store": True, "engine": True},
                }
            with pytest.raises(CaptionbotError):
                await service.caption(WEB, Upload(encode(noise(seed=5))))
            async with http.get(base + "/readyz") as response:
                assert response.status == 503
                body = await response.json()
                assert body["ready"] is False and body["checks"]["engine"] is False
            async with http.get(base + "/healthz") as response:
                assert response.status == 200
                assert await response.json() == {"status": "ok"}
    finally:
        gate.set()
        await asyncio.wait_for(engine.aclose(), 30)


async def test_readiness_names_each_part_it_was_given(tmp_path: Path) -> None:
    tasks = {"caption": FakeCaptioner(), "ocr": FakeReader()}
    engine_settings = EngineSettings(device="cpu", model_cache=tmp_path)
    async with Engine(tasks, engine_settings) as engine:  # type: ignore[arg-type]
        service = Service(engine, MemoryStore(), ServiceSettings())
        platforms = {"telegram": True, "discord": False}

        async def readiness() -> dict[str, bool]:
            return {**await service.readiness(), **platforms}

        async with served(service, readiness=readiness) as base, aiohttp.ClientSession() as http:
            async with http.get(base + "/readyz") as response:
                assert response.status == 503
                assert (await response.json())["checks"] == {
                    "store": True,
                    "engine": True,
                    "telegram": True,
                    "discord": False,
                }
            platforms["discord"] = True
            async with http.get(base + "/readyz") as response:
                assert response.status == 200


def test_the_grafana_dashboard_asks_only_for_metrics_the_bot_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    asked = {name for query in queries for name in re.findall(r"captionbot_[a-z_]+", query)}
    served = {
        sample_name
        for family in metrics.REGISTRY.collect()
        for sample_name in (
            family.name,
            f"{family.name}_total",
            f"{family.name}_bucket",
            f"{family.name}_sum",
            f"{family.name}_count",
        )
    }
    assert asked and asked <= served, sorted(asked - served)
    # Every metric the bot serves is on the dashboard somewhere.
    assert {family.name for family in metrics.REGISTRY.collect()} <= {
        re.sub(r"_(total|bucket|sum|count)$", "", name) for name in asked
    }


def test_discords_own_429_waits_are_counted() -> None:
    import adapters.discord.adapter  # noqa: F401  (installs the counter, as running it does)

    def counted() -> float:
        sample = "captionbot_platform_rate_limited_total"
        return metrics.REGISTRY.get_sample_value(sample, {"platform": "discord"}) or 0.0

    before = counted()
    # What discord.py's HTTP client logs when it waits out a 429.
    logging.getLogger("discord.http").warning(
        "We are being rate limited. %s %s responded with 429. Retrying in %.2f seconds.",
        "PATCH",
        "https://discord.com/api/v10/channels/1/messages/2",
        1.5,
    )
    logging.getLogger("discord.http").warning("an unrelated warning")
    assert counted() == before + 1
