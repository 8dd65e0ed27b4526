"""Telegram across a kill: ``python -m bot run`` in its own process, polling the fake Bot
API server this test owns, is SIGKILLed mid-answer and started again.

In one process the journal, the update offsets and the first imports all look fine; only a
real kill shows whether a half-sent answer is finished once, in the message it began.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bot.fake_telegram import FakeTelegram
from tests.test_telegram import (
    ANSWER_BUTTONS,
    SLOW,
    TOKEN,
    answer_to,
    button,
    callback_notes,
    incoming,
    labels,
    nothing_more,
    photo,
    replies_to,
    someone,
)

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, model_cache: Path, fake: FakeTelegram) -> Path:
    config = folder / "config.toml"
    config.write_text(
        'profile = "tiny"\n'
        f'[engine]\ndevice = "cpu"\nmodel_cache = "{model_cache}"\n'
        '[store]\ndatabase = "data/bot.sqlite3"\nimages_dir = "data/images"\n'
        "[web]\nenabled = false\n[discord]\nenabled = false\n"
        f'[telegram]\napi_base_url = "{fake.base_url}"\nfile_base_url = "{fake.base_file_url}"\n'
    )
    return config


@asynccontextmanager
async def bot_process(
    folder: Path, config: Path, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    environment = {
        **os.environ,
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONPATH": str(ROOT),
    }
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "-v",
            "run",
            "--config",
            str(config),
            cwd=folder,
            env=environment,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def polling(fake: FakeTelegram, since: int) -> None:
    """Wait until a bot started after call number ``since`` polls for updates."""
    await fake.wait_for(lambda: fake.calls("getUpdates")[since:], 240)


async def test_a_bot_killed_mid_answer_finishes_it_once_after_a_restart(
    tmp_path: Path, model_cache: Path
) -> None:
    ann = someone("Ann")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    async with FakeTelegram(TOKEN) as tg:
        config = write_config(tmp_path, model_cache, tg)

        async with bot_process(tmp_path, config, first_log) as first:
            await polling(tg, 0)
            tg.push(update_a := tg.photo_message(ann, photo(31)))
            answer_a = await answer_to(tg, incoming(tg, update_a), 240)
            assert labels(answer_a) == ANSWER_BUTTONS

            tg.push(update_b := tg.photo_message(ann, photo(32)))
            b = incoming(tg, update_b)
            await tg.wait_for(lambda: replies_to(tg, b), SLOW)
            # Edits to a chat are paced a second apart: this is before the next one.
            await asyncio.sleep(0.3)
            first.send_signal(signal.SIGKILL)
            assert await first.wait() == -signal.SIGKILL
        [begun] = replies_to(tg, b)
        # The buttons come with the final edit: without them the answer is unfinished.
        # (Its first message may show parts already: it waited its turn behind answer
        # A's last edit, and the tiny models are quick.)
        assert not begun.buttons, "killed too late to test"

        polls = len(tg.calls("getUpdates"))
        async with bot_process(tmp_path, config, second_log) as second:
            await polling(tg, polls)
            tg.push(dict(update_b))  # Telegram redelivers an update it was not sure of
            finished = await answer_to(tg, b, SLOW)
            await nothing_more(tg, 3.0)
            # Finished in the message the killed run began; nothing said twice.
            assert replies_to(tg, b) == [finished] and finished is begun
            assert labels(finished) == ANSWER_BUTTONS
            assert "Text in the image:" in (finished.text or "")

            # A button on an answer from before the kill.
            reroll = button(answer_a, "🔁 Reroll caption")
            tg.push(tg.callback_query(ann, answer_a, reroll))
            await tg.wait_for(lambda: "A new caption." in callback_notes(tg), SLOW)
            assert labels(answer_a) == ANSWER_BUTTONS

            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), 60) == 0

    logs = first_log.read_text() + second_log.read_text()
    assert "recovered 1 unanswered telegram events" in second_log.read_text()
    assert "was delivered again" in second_log.read_text()
    assert "telegram: up as @CaptionTestBot" in logs
    assert TOKEN.split(":")[1] not in logs
