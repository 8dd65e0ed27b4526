"""``python -m bot run``: the composition root of the long-running bot.

Start order: store -> engine -> service -> adapters. On SIGINT or SIGTERM the service
stops taking work (new requests are told the bot is restarting), gives the requests in
flight ``service.shutdown_grace_s`` to finish and ends the rest with an explicit message;
a second signal cuts the grace short. Then everything stops in reverse start order. A
start that fails part-way closes what had started and exits non-zero with the reason; a
dead engine stops the bot with status 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from core.errors import ConfigError
from core.ports import Store
from core.service import Service
from core.settings import PlatformSwitch, Settings

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_ENGINE_DEAD = 3
_MB = 1024 * 1024
# Host names a loopback-bound playground answers to (DNS-rebinding protection).
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


async def run(settings: Settings, *, ready: Callable[[dict[str, str]], None] | None = None) -> int:
    """Run until a signal or a dead engine; ``ready`` gets the served addresses once up."""
    quiet_libraries()
    with secrets_redacted(_secrets(settings)):
        return await _run(settings, ready)


async def _run(settings: Settings, ready: Callable[[dict[str, str]], None] | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()
    status = EXIT_OK

    def engine_died(reason: str) -> None:
        nonlocal status
        logger.critical("stopping: the engine is dead (%s)", reason)
        status = EXIT_ENGINE_DEAD
        loop.call_soon_threadsafe(stop.set)

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    if settings.profile.name == "tiny":
        logger.warning(
            "profile 'tiny': small random-weight models, so captions, answers and images "
            "are nonsense by design; choose the cpu or gpu profile in config.toml"
        )
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                service, addresses = await _start(stack, settings, engine_died)
            except ConfigError:
                raise
            except Exception as exc:
                # Leaving the stack closes, in reverse order, whatever had started.
                logger.critical("captionbot could not start: %s", exc, exc_info=exc)
                return EXIT_START_FAILED
            logger.info(
                "captionbot is up (profile %s)%s",
                settings.profile.name,
                "".join(f"; {name} on {url}" for name, url in addresses.items()),
            )
            if ready is not None:
                ready(addresses)
            await stop.wait()
            logger.info("stopping")
            await _drain(service, settings.service.shutdown_grace_s, hurry)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return status


async def _start(
    stack: contextlib.AsyncExitStack, settings: Settings, engine_died: Callable[[str], None]
) -> tuple[Service, dict[str, str]]:
    """Start store, engine, service and adapters onto ``stack``; the served addresses."""
    from adapters.http import LinkFetcher
    from adapters.sqlite import SqliteStore
    from bot.wiring import TASK_NAMES, engine_for

    # The store first: one that cannot write is the commonest first-run fault (a folder
    # owned by root), and its one-line reason should come before anything else.
    store = await stack.enter_async_context(
        SqliteStore.open(settings.store.database, settings.store.images_dir)
    )
    names = [n for n in TASK_NAMES if n != "mood" or settings.profile.mood.enabled]
    engine = await stack.enter_async_context(engine_for(settings, names, on_dead=engine_died))
    fetcher = await stack.enter_async_context(LinkFetcher(settings.links))
    service = Service(
        engine, store, settings.service, fetcher=fetcher if settings.links.enabled else None
    )
    addresses: dict[str, str] = {}
    # Each chat platform started adds whether it is connected, for /readyz.
    platforms_up: dict[str, Callable[[], bool]] = {}

    async def readiness() -> dict[str, bool]:
        checks = await service.readiness()
        checks.update({platform: check() for platform, check in platforms_up.items()})
        return checks

    if settings.web.enabled:
        addresses["web"] = await _start_web(stack, service, settings, readiness)
    if settings.telegram.enabled is not False:
        addresses.update(await _start_telegram(stack, service, settings, platforms_up))
    if settings.discord.enabled is not False:
        addresses.update(await _start_discord(stack, service, settings, platforms_up))
    pruning = asyncio.get_running_loop().create_task(
        _prune_forever(store, settings), name="captionbot-prune"
    )
    pruning.add_done_callback(_report_crash)
    stack.push_async_callback(_cancel, pruning)
    return service, addresses


async def _drain(service: Service, grace_s: float, hurry: asyncio.Event) -> None:
    """Let the requests in flight finish within ``grace_s``, or until ``hurry`` is set."""
    finishing = asyncio.ensure_future(service.shutdown(grace_s))
    hurried = asyncio.ensure_future(hurry.wait())
    await asyncio.wait({finishing, hurried}, return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if not finishing.done():
        logger.warning("stopping now: a second signal cut the grace short")
        await service.shutdown(0)
    await finishing


def _token(platform: str, variable: str, enabled: PlatformSwitch) -> str:
    """The platform's token from the environment; "" when it is not set and the platform
    may stay off (said in the log). A platform set to ``enabled = true`` requires it."""
    token = os.environ.get(variable, "")
    if not token and enabled is True:
        raise ConfigError(
            f"{platform}.enabled is true but {variable} is not set: set it (see the README), "
            f'or set {platform}.enabled = "auto" to run without {platform}'
        )
    if not token:
        logger.info(
            "%s: off, as %s is not set (see the README to create a bot)", platform, variable
        )
    return token


async def _start_discord(
    stack: contextlib.AsyncExitStack,
    service: Service,
    settings: Settings,
    platforms_up: dict[str, Callable[[], bool]],
) -> dict[str, str]:
    token = _token("discord", settings.discord.token_env, settings.discord.enabled)
    if not token:
        return {}
    import discord

    from adapters.discord.adapter import connected

    sessions: list[asyncio.Task[None]] = []

    async def connect(client: discord.Client) -> None:
        try:
            await client.login(token)
        except BaseException:  # a wrong token, or Discord out of reach: its session closed
            await client.close()
            raise
        session = asyncio.get_running_loop().create_task(client.connect(), name="discord")
        ready = asyncio.get_running_loop().create_task(client.wait_until_ready())
        await asyncio.wait({session, ready}, return_when=asyncio.FIRST_COMPLETED)
        if session.done():  # refused: a wrong token, or an intent the portal did not grant
            ready.cancel()
            await client.close()
            session.result()
        sessions.append(session)

    adapter = await connected(service, settings.discord, connect)
    logger.info("discord: up as %s", adapter.client.user)

    async def close() -> None:
        await adapter.close()
        await asyncio.gather(*sessions, return_exceptions=True)

    stack.push_async_callback(close)
    platforms_up["discord"] = adapter.connected
    return {"discord": f"@{adapter.client.user}"}


async def _start_telegram(
    stack: contextlib.AsyncExitStack,
    service: Service,
    settings: Settings,
    platforms_up: dict[str, Callable[[], bool]],
) -> dict[str, str]:
    telegram = settings.telegram
    token = _token("telegram", telegram.token_env, telegram.enabled)
    if not token:
        return {}
    from adapters.telegram import TelegramAdapter

    adapter = await stack.enter_async_context(TelegramAdapter(service, telegram, token))
    platforms_up["telegram"] = adapter.connected
    return {"telegram": f"@{adapter.chatbot.bot_username}"}


async def _start_web(
    stack: contextlib.AsyncExitStack,
    service: Service,
    settings: Settings,
    readiness: Callable[[], Awaitable[dict[str, bool]]],
) -> str:
    from adapters.web import create_app, serve
    from bot.config import metrics_networks

    loopback = settings.web.host in LOOPBACK_NAMES
    app = create_app(
        service,
        max_upload_bytes=int(settings.web.max_upload_mb * _MB),
        allowed_hosts=LOOPBACK_NAMES if loopback else None,
        read_timeout_s=settings.web.read_timeout_s,
        readiness=readiness,
        metrics_from=metrics_networks(settings.web),
    )
    runner = await serve(app, settings.web.host, settings.web.port)
    stack.push_async_callback(runner.cleanup)
    host, port = _bound_address(runner)
    return f"http://{host}:{port}/"


def _bound_address(runner: object) -> tuple[str, int]:
    # The port is 0 in tests (any free port); the runner knows the one it got.
    address = runner.addresses[0]  # type: ignore[attr-defined]
    return str(address[0]), int(address[1])


async def _prune_forever(store: Store, settings: Settings) -> None:
    """Apply the retention limits now and then; images past them are deleted with results."""
    while True:
        try:
            deleted = await store.prune(
                datetime.now(UTC),
                settings.store.retention_days,
                int(settings.store.max_total_mb * _MB),
            )
        except Exception:
            # A full disk or a locked database now is no reason to keep images forever.
            logger.exception(
                "retention failed; it runs again in %g s", settings.store.prune_every_s
            )
        else:
            if deleted:
                logger.info("retention deleted %d images", deleted)
        await asyncio.sleep(settings.store.prune_every_s)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s stopped", task.get_name(), exc_info=task.exception())


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _secrets(settings: Settings) -> list[str]:
    names = (
        settings.telegram.token_env,
        settings.telegram.webhook_secret_env,
        settings.discord.token_env,
    )
    return [os.environ[name] for name in names if os.environ.get(name)]


@contextlib.contextmanager
def secrets_redacted(secrets: Iterable[str]) -> Iterator[None]:
    """Log records, from any library, with these values blanked out while inside.

    A bot token is part of every Bot API URL, and a library may put a URL into a message
    or an exception at any level; blanking at the record's creation covers every handler.
    """
    hidden = [secret for secret in secrets if secret]
    previous = logging.getLogRecordFactory()

    def redacting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when it formats
            return record
        if any(secret in message for secret in hidden):
            record.msg, record.args = _blank(message, hidden), None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = _blank(text, hidden)
        if record.stack_info:
            record.stack_info = _blank(record.stack_info, hidden)
        return record

    if hidden:
        logging.setLogRecordFactory(redacting)
    try:
        yield
    finally:
        if logging.getLogRecordFactory() is redacting:
            logging.setLogRecordFactory(previous)


def _blank(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[secret]")
    return text


def configure_logging(verbose: bool) -> None:
    """Plain lines on stderr; chatty libraries turned down."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_libraries()


def quiet_libraries() -> None:
    """Libraries whose debug lines carry request data (aiosqlite logs SQL parameters,
    aiohttp's access log every request line) or only noise."""
    for noisy in ("aiosqlite", "aiohttp.access", "httpx", "httpcore", "easyocr", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
