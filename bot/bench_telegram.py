"""``python -m bot bench telegram``: many people post a photo to the bot at the same moment.

The bot runs as operators run it, ``python -m bot run`` in its own process on the tiny
profile, polling the fake Bot API server (``bot.fake_telegram``) that this process owns,
so the clocks that matter are the server's: when each update was pushed, and when each
message and edit of the answer arrived. One warm-up photo is answered first, so that the
figures are the bot's steady state rather than its first model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bot.bench import STATUS_PREFIXES, Timing, picture, waits
from bot.fake_telegram import FakeTelegram, StoredMessage, User

TOKEN = "424242:BENCH-token"
# Generous bounds for a busy 2-core machine; the figures, not these, are the result.
START_TIMEOUT_S = 600.0
ANSWER_TIMEOUT_S = 600.0


def bench_telegram(users: int, cache_dir: Path) -> dict[str, Any]:
    return asyncio.run(_bench(users, cache_dir))


async def _bench(users: int, cache_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="captionbot-bench-") as folder:
        async with FakeTelegram(TOKEN) as tg:
            config = _config(Path(folder), cache_dir, tg)
            log = Path(folder) / "bot.log"
            bot = await _start(config, log)
            try:
                await tg.wait_for(lambda: tg.calls("getUpdates"), START_TIMEOUT_S)
                warm = _member(0)
                tg.push(update := tg.photo_message(warm, picture(0)))
                await tg.wait_for(lambda: _answer(tg, update), START_TIMEOUT_S)

                members = [_member(number) for number in range(1, users + 1)]
                updates = [tg.photo_message(m, picture(i + 1)) for i, m in enumerate(members)]
                posted = time.monotonic()
                tg.push(*updates)
                with contextlib.suppress(AssertionError):  # reported as unanswered
                    await tg.wait_for(
                        lambda: all(_answer(tg, u) for u in updates), ANSWER_TIMEOUT_S
                    )
                timings = [_timing(tg, u, posted) for u in updates]
                busiest = max(tg.max_per_window(1.0, chat_id=m.id) for m in members)
                floods = sum(1 for call in tg.calls() if call.status == 429)
            finally:
                if bot.returncode is None:
                    bot.send_signal(signal.SIGTERM)
                exit_code = await asyncio.wait_for(bot.wait(), 120)
            errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
    return _report(users, timings, busiest, floods, exit_code, errors)


def _config(folder: Path, cache_dir: Path, tg: FakeTelegram) -> Path:
    config = folder / "config.toml"
    config.write_text(
        'profile = "tiny"\n'
        f'[engine]\ndevice = "cpu"\nmodel_cache = "{cache_dir.resolve()}"\n'
        f'[store]\ndatabase = "{folder / "bot.sqlite3"}"\nimages_dir = "{folder / "images"}"\n'
        "[web]\nenabled = false\n[discord]\nenabled = false\n"
        f'[telegram]\napi_base_url = "{tg.base_url}"\nfile_base_url = "{tg.base_file_url}"\n'
    )
    return config


async def _start(config: Path, log: Path) -> asyncio.subprocess.Process:
    environment = {
        **os.environ,
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    with log.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "run",
            "--config",
            str(config),
            env=environment,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )


def _member(number: int) -> User:
    return User(700_000 + number, f"Member {number}", f"member{number}")


def _replies(tg: FakeTelegram, update: dict[str, Any]) -> list[StoredMessage]:
    message = update["message"]
    chat, message_id = message["chat"]["id"], message["message_id"]
    return [
        m
        for m in tg.bot_messages(chat)
        if m.reply_to is not None and m.reply_to.message_id == message_id
    ]


def _answer(tg: FakeTelegram, update: dict[str, Any]) -> StoredMessage | None:
    """The finished answer: the reply that got its buttons (a refusal has none)."""
    return next((m for m in _replies(tg, update) if m.buttons), None)


def _timing(tg: FakeTelegram, update: dict[str, Any], posted: float) -> Timing:
    replies = _replies(tg, update)
    if not replies:
        return Timing(None, None, None)
    first_message = min(m.sent_at for m in replies) - posted
    parts = [
        revision.at
        for m in replies
        for revision in m.revisions
        if revision.text and not revision.text.startswith(STATUS_PREFIXES)
    ]
    first_part = min(parts) - posted if parts else None
    answer = _answer(tg, update)
    full = answer.revisions[-1].at - posted if answer is not None else None
    return Timing(first_message, first_part, full)


def _report(
    users: int,
    timings: list[Timing],
    busiest: int,
    floods: int,
    exit_code: int,
    errors: list[str],
) -> dict[str, Any]:
    return {
        "users": users,
        **waits(timings, users),
        # Messages and edits (sends included) in any one second, in the busiest chat.
        "max_messages_per_chat_in_1s": busiest,
        "rate_limited_429": floods,
        "bot_errors_logged": len(errors),
        "bot_exit_code": exit_code,
        "profile": "tiny",
        "warm": True,
    }
