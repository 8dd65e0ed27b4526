"""``python -m bot run`` in-process: start, serve, stop on a signal, fail to start cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from bot.config import parse_settings
from bot.run import EXIT_OK, EXIT_START_FAILED, run
from core.errors import ConfigError
from core.settings import Settings
from tests import imagekit


def settings_for(tmp_path: Path, model_cache: Path, port: int = 0) -> Settings:
    return parse_settings(
        {
            "profile": "tiny",
            "engine": {"device": "cpu", "model_cache": str(model_cache)},
            "store": {
                "database": str(tmp_path / "bot.sqlite3"),
                "images_dir": str(tmp_path / "images"),
            },
            "web": {"port": port},
            # Telegram is tested against its fake server in tests/test_telegram.py, and
            # Discord against simcord in tests/test_discord.py.
            "telegram": {"enabled": False},
            "discord": {"enabled": False},
        }
    )


async def test_the_bot_serves_then_stops_on_sigterm(
    tmp_path: Path,
    model_cache: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As `make run` on a fresh machine: no Telegram token, so the web page alone."""
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    monkeypatch.delenv("DISCORD_BOT_TOKEN", raising=False)
    settings = settings_for(tmp_path, model_cache)
    settings = dataclasses.replace(
        settings,
        telegram=dataclasses.replace(settings.telegram, enabled="auto"),
        discord=dataclasses.replace(settings.discord, enabled="auto"),
    )
    ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    with caplog.at_level(logging.INFO):
        bot = asyncio.create_task(run(settings, ready=ready.set_result))
        addresses = await asyncio.wait_for(ready, 60)
        assert set(addresses) == {"web"}
        url = addresses["web"]
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "api/status") as response:
                assert response.status == 200
                assert isinstance(await response.json(), dict)
            # A page on another site that rebinds its name to 127.0.0.1 is not served.
            rebound = {"Host": "attacker.example:8080"}
            async with http.get(url + "api/status", headers=rebound) as response:
                assert response.status == 421
                assert "host name" in (await response.json())["detail"]
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the bot, not the test runner
        assert await asyncio.wait_for(bot, 60) == EXIT_OK
    messages = [r.getMessage() for r in caplog.records]
    assert any("captionbot is up (profile tiny)" in m for m in messages)
    assert "telegram: off, as TELEGRAM_BOT_TOKEN is not set (see the README to create a bot)" in (
        messages
    )
    assert "discord: off, as DISCORD_BOT_TOKEN is not set (see the README to create a bot)" in (
        messages
    )
    assert any(m == "stopping" for m in messages)
    assert (tmp_path / "bot.sqlite3").exists()


async def test_a_platform_required_without_its_token_stops_the_start_with_the_fix(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISCORD_BOT_TOKEN", raising=False)
    settings = settings_for(tmp_path, model_cache)
    settings = dataclasses.replace(
        settings, discord=dataclasses.replace(settings.discord, enabled=True)
    )
    with pytest.raises(ConfigError, match=r"DISCORD_BOT_TOKEN is not set.*enabled = \"auto\""):
        await run(settings)


async def test_a_failed_start_cleans_up_and_says_why(
    tmp_path: Path, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.CRITICAL):
            status = await run(settings_for(tmp_path, model_cache, port))
    assert status == EXIT_START_FAILED
    assert any("could not start" in r.getMessage() for r in caplog.records)
    # The store was closed in order: a second start can open the same database.
    ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    bot = asyncio.create_task(run(settings_for(tmp_path, model_cache), ready=ready.set_result))
    await asyncio.wait_for(ready, 60)
    os.kill(os.getpid(), signal.SIGINT)
    assert await asyncio.wait_for(bot, 60) == EXIT_OK


async def test_secrets_and_session_ids_never_reach_the_log(
    tmp_path: Path,
    model_cache: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "123456:AAF-very-secret-token"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", secret)
    monkeypatch.setenv("DISCORD_BOT_TOKEN", secret)
    ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    with caplog.at_level(logging.DEBUG):
        bot = asyncio.create_task(run(settings_for(tmp_path, model_cache), ready=ready.set_result))
        url = (await asyncio.wait_for(ready, 60))["web"]
        form = aiohttp.FormData()
        form.add_field("image", imagekit.encode(imagekit.noise()), filename="x.png")
        form.add_field("question", "what is it?")
        # unsafe: keep cookies from an IP address (127.0.0.1), which the default jar drops.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.post(url + "api/ask", data=form) as response:
                assert response.status == 200
            session = next(c.value for c in http.cookie_jar if c.key == "captionbot_session")
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(bot, 60) == EXIT_OK
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "request platform=web task=vqa" in logged  # the request was logged...
    assert secret not in logged  # ...but never a token
    assert session not in logged  # ...nor a session id


async def test_sigterm_lets_work_finish_within_the_grace_and_tells_the_rest(
    tmp_path: Path, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """30 describes and 4 reimagines in flight at SIGTERM: every one gets its last part or
    an explicit "restarting" error; none is cut off; new requests are refused meanwhile."""
    settings = settings_for(tmp_path, model_cache)
    settings = dataclasses.replace(
        settings,
        engine=dataclasses.replace(settings.engine, max_in_flight=512),
        service=dataclasses.replace(settings.service, shutdown_grace_s=1.0),
    )
    ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    with caplog.at_level(logging.INFO):
        bot = asyncio.create_task(run(settings, ready=ready.set_result))
        url = (await asyncio.wait_for(ready, 60))["web"]
        # No cookies kept: every request is a new browser, so per-user limits do not bite.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            started = asyncio.Event()
            begun = 0

            async def describe(seed: int) -> list[dict[str, object]]:
                nonlocal begun
                form = aiohttp.FormData()
                form.add_field(
                    "image", imagekit.encode(imagekit.noise(seed=seed)), filename="x.png"
                )
                async with http.post(url + "api/describe", data=form) as response:
                    assert response.status == 200
                    lines = []
                    async for raw in response.content:
                        lines.append(json.loads(raw))
                        if len(lines) == 1:
                            begun += 1
                            if begun == 30:
                                started.set()
                    return lines

            async def reimagine(seed: int) -> tuple[int, bytes]:
                form = aiohttp.FormData(default_to_multipart=True)
                form.add_field("text", "a lighthouse at dusk")
                form.add_field("steps", "10")
                form.add_field("seed", str(seed))
                async with http.post(url + "api/imagine", data=form) as response:
                    return response.status, await response.read()

            describes = [asyncio.ensure_future(describe(seed)) for seed in range(30)]
            reimagines = [asyncio.ensure_future(reimagine(seed)) for seed in range(4)]
            await asyncio.wait_for(started.wait(), 120)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.2)
            late = aiohttp.FormData()
            late.add_field("image", imagekit.encode(imagekit.noise(seed=99)), filename="y.png")
            async with http.post(url + "api/describe", data=late) as refused:
                assert refused.status == 503
                assert "restarting" in (await refused.json())["detail"]
                assert int(refused.headers["Retry-After"]) > 0
            streams = await asyncio.wait_for(asyncio.gather(*describes), 60)
            images = await asyncio.wait_for(asyncio.gather(*reimagines), 60)
        assert await asyncio.wait_for(bot, 60) == EXIT_OK
    endings = [lines[-1] for lines in streams]
    for ending in endings:
        assert ending["part"] == "social" or (
            ending["part"] == "error"
            and ending["status"] == 503
            and "restarting" in str(ending["detail"])
        ), ending
    for status, body in images:
        assert (status == 200 and body.startswith(b"\x89PNG")) or (
            status == 503 and b"restarting" in body
        ), (status, body[:100])
    messages = [r.getMessage() for r in caplog.records]
    assert any("requests in flight; waiting up to 1 s" in m for m in messages), messages
    # 30 OCR runs alone take far longer than the 1 s grace: most were cut, and counted.
    cut = sum(e["part"] == "error" for e in endings) + sum(s == 503 for s, _ in images)
    assert cut > 0
    assert any(f"{cut} requests did not finish within 1 s" in m for m in messages), messages
