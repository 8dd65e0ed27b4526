"""Telegram in webhook mode: ``bot.run`` registers its webhook with the secret, and its
listener, behind the operator's reverse proxy, takes updates only from whoever holds it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.fake_telegram import FakeTelegram
from bot.run import EXIT_OK, run
from tests.test_telegram import (
    ANSWER_BUTTONS,
    SLOW,
    TOKEN,
    answer_to,
    incoming,
    labels,
    nothing_more,
    photo,
    replies_to,
    settings_for,
    someone,
)

SECRET = "webhook-secret-only-telegram-knows"
PUBLIC_URL = "https://bot.example.org/telegram/updates"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_webhook_mode_takes_updates_only_with_the_secret(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    port = free_port()
    hook = f"http://127.0.0.1:{port}/telegram/updates"
    ann = someone("Ann")
    async with FakeTelegram(TOKEN) as tg:
        settings = settings_for(
            tmp_path,
            model_cache,
            tg,
            mode="webhook",
            webhook_url=PUBLIC_URL,
            webhook_listen=f"127.0.0.1:{port}",
        )
        ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        bot = asyncio.create_task(run(settings, ready=ready.set_result))
        await asyncio.wait({ready, bot}, timeout=180, return_when=asyncio.FIRST_COMPLETED)
        assert ready.done(), f"the bot did not start (status {bot.result() if bot.done() else '-'})"
        try:
            [registered] = tg.calls("setWebhook")
            assert registered.params["url"] == PUBLIC_URL
            assert registered.params["secret_token"] == SECRET
            assert tg.calls("getUpdates") == []

            update = tg.photo_message(ann, photo(41))
            sent = incoming(tg, update)
            body = json.dumps(update)
            refusals: list[tuple[int, dict[str, Any]]] = [
                (403, {}),
                (403, {"X-Telegram-Bot-Api-Secret-Token": "guess"}),
                (400, {"X-Telegram-Bot-Api-Secret-Token": SECRET, "_body": "{not json"}),
                (400, {"X-Telegram-Bot-Api-Secret-Token": SECRET, "_body": "[1, 2]"}),
                (400, {"X-Telegram-Bot-Api-Secret-Token": SECRET, "_body": '{"no": "id"}'}),
            ]
            async with aiohttp.ClientSession() as http:
                for status, headers in refusals:
                    data = headers.pop("_body", body)
                    async with http.post(hook, data=data, headers=headers) as response:
                        assert response.status == status, (headers, data)
                await nothing_more(tg, 1.0)
                assert replies_to(tg, sent) == []

                secret = {"X-Telegram-Bot-Api-Secret-Token": SECRET}
                for _ in range(2):  # Telegram retries a webhook it thinks failed
                    async with http.post(hook, data=body, headers=secret) as response:
                        assert response.status == 200
            answer = await answer_to(tg, sent, SLOW)
            assert labels(answer) == ANSWER_BUTTONS
            await nothing_more(tg, 2.0)
            assert replies_to(tg, sent) == [answer]
        finally:
            if not bot.done():  # its handler is installed only while it runs
                os.kill(os.getpid(), signal.SIGTERM)
            assert await asyncio.wait_for(bot, 60) == EXIT_OK
