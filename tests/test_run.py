"""``python -m bot run`` in-process: start, serve, stop on a signal, fail to start cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from bot.config import parse_settings
from bot.run import EXIT_OK, EXIT_START_FAILED, run
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
        }
    )


async def test_the_bot_serves_then_stops_on_sigterm(
    tmp_path: Path, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    with caplog.at_level(logging.INFO):
        bot = asyncio.create_task(run(settings_for(tmp_path, model_cache), ready=ready.set_result))
        addresses = await asyncio.wait_for(ready, 60)
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
    assert any(m == "stopping" for m in messages)
    assert (tmp_path / "bot.sqlite3").exists()


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
