"""Telegram's allow-lists: a bot run for one community answers only the users and chats
its operator listed, buttons included."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from bot.fake_telegram import Chat, FakeTelegram
from bot.run import EXIT_OK, run
from tests.test_telegram import (
    SLOW,
    TOKEN,
    answer_to,
    button,
    callback_notes,
    group,
    incoming,
    nothing_more,
    photo,
    replies_to,
    settings_for,
    someone,
)


async def test_only_listed_users_in_listed_chats_get_answers(
    tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    ann, bob, eve = someone("Ann"), someone("Bob"), someone("Eve")
    team = group("The community")
    async with FakeTelegram(TOKEN) as tg:
        settings = settings_for(
            tmp_path,
            model_cache,
            tg,
            allowed_users=[str(ann.id), str(bob.id)],
            allowed_chats=[str(team.id), str(ann.id)],  # a private chat's id is its user's
        )
        ready: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        bot = asyncio.create_task(run(settings, ready=ready.set_result))
        await asyncio.wait({ready, bot}, timeout=180, return_when=asyncio.FIRST_COMPLETED)
        assert ready.done(), f"the bot did not start (status {bot.result() if bot.done() else '-'})"
        try:
            tg.push(in_private := tg.photo_message(ann, photo(51)))
            await answer_to(tg, incoming(tg, in_private), SLOW)
            mention = "@CaptionTestBot"
            tg.push(in_team := tg.photo_message(ann, photo(52), chat=team, caption=mention))
            answer = await answer_to(tg, incoming(tg, in_team), SLOW)
            shown = list(answer.history)

            ignored = [
                tg.photo_message(bob, photo(53)),  # a listed user, in a chat not listed
                tg.photo_message(eve, photo(54), chat=team, caption=mention),
                tg.photo_message(eve, photo(55)),
            ]
            tg.push(*ignored)
            tg.push(tg.callback_query(eve, answer, button(answer, "🔁 Reroll caption")))
            await tg.wait_for(
                lambda: "This bot does not answer you here." in callback_notes(tg), SLOW
            )
            await nothing_more(tg)
            assert all(replies_to(tg, incoming(tg, update)) == [] for update in ignored)
            assert tg.calls("getFile") and len(tg.calls("getFile")) == 2  # nothing downloaded
            assert answer.history == shown  # not rerolled
            assert Chat.private(eve).id not in {m.chat_id for m in tg.bot_messages()}
        finally:
            if not bot.done():  # its handler is installed only while it runs
                os.kill(os.getpid(), signal.SIGTERM)
            assert await asyncio.wait_for(bot, 60) == EXIT_OK
