"""``config.toml`` -> typed, validated ``core.settings.Settings``, once, at start."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from adapters.ray.backend import cluster_address
from core.errors import ConfigError
from core.service import DESCRIBE_PARTS
from core.settings import (
    BatchSettings,
    CaptionSettings,
    DiscordSettings,
    EngineSettings,
    LinkSettings,
    MoodSettings,
    OcrSettings,
    Profile,
    RayDeployment,
    RaySettings,
    ReimagineSettings,
    ServiceSettings,
    Settings,
    StoreSettings,
    TagsSettings,
    TelegramSettings,
    VqaSettings,
    WebSettings,
    WriteSettings,
)

TASK_SETTINGS: dict[str, type[Any]] = {
    "caption": CaptionSettings,
    "ocr": OcrSettings,
    "tags": TagsSettings,
    "mood": MoodSettings,
    "vqa": VqaSettings,
    "write": WriteSettings,
    "reimagine": ReimagineSettings,
}

# The built-in profiles: what each changes from the settings' own defaults.
# config.toml repeats these values so operators see them; a test keeps the two equal.
BUILTIN_PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "gpu": {
        "caption": {
            "model": "Salesforce/blip2-opt-2.7b",
            "precision": "int8",
            "max_new_tokens": 40,
            "num_beams": 3,
            "max_batch_size": 16,
        },
        "ocr": {},
        "tags": {"precision": "none", "max_batch_size": 16},
        "mood": {"precision": "none", "max_batch_size": 16},
        "vqa": {"precision": "none", "max_batch_size": 16},
        "write": {},
        "reimagine": {"precision": "none"},
    },
    "cpu": {
        "caption": {"model": "Salesforce/blip-image-captioning-base", "precision": "auto"},
        "ocr": {"precision": "int8"},
        "tags": {"precision": "auto", "num_beams": 4},
        "mood": {},
        "vqa": {},
        "write": {
            "model": "Qwen/Qwen2.5-0.5B-Instruct",
            "precision": "auto",
            "max_new_tokens": 100,
        },
        "reimagine": {"size": 384, "steps": 15, "max_steps": 30, "max_batch_size": 1},
    },
    "tiny": {
        "caption": {
            "model": "tiny/blip2-opt",
            "precision": "none",
            "max_new_tokens": 12,
            "max_batch_size": 4,
        },
        "ocr": {"precision": "int8"},
        "tags": {
            "model": "tiny/t5-tags",
            "precision": "none",
            "num_beams": 2,
            "min_new_tokens": 4,
            "max_new_tokens": 16,
            "max_batch_size": 4,
        },
        "mood": {"model": "tiny/clip", "precision": "none", "max_batch_size": 4},
        "vqa": {"model": "tiny/blip-vqa", "precision": "none", "max_batch_size": 4},
        "write": {
            "model": "tiny/llama-chat",
            "precision": "none",
            "max_new_tokens": 24,
            "max_batch_size": 2,
        },
        "reimagine": {
            "model": "tiny/stable-diffusion",
            "precision": "none",
            "size": 128,
            "steps": 4,
            "max_steps": 10,
            # The tiny checkpoint has no safety checker; real ones do.
            "safety_checker": False,
        },
    },
}

DEFAULT_PROFILE = "tiny"


def load_settings(path: Path | None = None, profile: str | None = None) -> Settings:
    """Read ``path`` (or use the built-in defaults) and select ``profile``.

    Relative paths in the file are taken from the file's folder, so a bot started as
    ``python -m bot run --config /etc/captionbot/config.toml`` from anywhere finds the same
    data and models.
    """
    if path is None:
        return parse_settings({}, profile)
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return anchored(parse_settings(document, profile), path.resolve().parent)


def anchored(settings: Settings, base: Path) -> Settings:
    """``settings`` with relative paths made relative to ``base``.

    Paths are the store's files, the model cache and ``ocr.model_dir``; a model or adapter
    name counts as a path only when written ``./name`` or ``../name``, since ``org/name``
    is a hub id.
    """

    def at(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    def local(name: str) -> str:
        return str(base / name) if name.startswith(("./", "../")) else name

    tasks: dict[str, Any] = {}
    for task in TASK_SETTINGS:
        values = getattr(settings.profile, task)
        changes: dict[str, Any] = {}
        if hasattr(values, "model"):
            changes["model"] = local(values.model)
        if task == "write" and values.adapter:
            changes["adapter"] = local(values.adapter)
        if task == "ocr" and values.model_dir is not None:
            changes["model_dir"] = str(at(Path(values.model_dir)))
        tasks[task] = dataclasses.replace(values, **changes)
    return dataclasses.replace(
        settings,
        engine=dataclasses.replace(settings.engine, model_cache=at(settings.engine.model_cache)),
        store=dataclasses.replace(
            settings.store,
            database=at(settings.store.database),
            images_dir=at(settings.store.images_dir),
        ),
        profile=dataclasses.replace(settings.profile, **tasks),
    )


def parse_settings(document: dict[str, Any], profile: str | None = None) -> Settings:
    _reject_unknown(
        document,
        {"profile", "engine", "profiles", "service", "store", "web", "links"}
        | {"telegram", "discord", "ray"},
        "",
    )
    engine = _build(EngineSettings, _table(document, "engine", ""), "engine")
    _check_engine(engine)
    service = _build(ServiceSettings, _table(document, "service", ""), "service")
    unknown_parts = sorted(set(service.describe_parts) - set(DESCRIBE_PARTS))
    if unknown_parts:
        raise ConfigError(
            f"service.describe_parts: unknown part {unknown_parts[0]!r}; "
            f"parts: {', '.join(DESCRIBE_PARTS)}"
        )
    store = _build(StoreSettings, _table(document, "store", ""), "store")
    web = _build(WebSettings, _table(document, "web", ""), "web")
    links = _build(LinkSettings, _table(document, "links", ""), "links")
    telegram = _build(TelegramSettings, _table(document, "telegram", ""), "telegram")
    _check_telegram(telegram)
    discord = _build(DiscordSettings, _table(document, "discord", ""), "discord")
    _check_discord(discord)
    if links.timeout_s < 1:
        raise ConfigError("links.timeout_s must be at least 1 second")
    if not 0 <= web.port < 65536:
        raise ConfigError(f"web.port must be between 0 and 65535; got {web.port}")
    metrics_networks(web)  # refuses a malformed network now, not at the first scrape
    tables = _table(document, "profiles", "")
    names = set(BUILTIN_PROFILES) | set(tables)
    chosen = profile or _typed(document.get("profile", DEFAULT_PROFILE), str, "profile")
    if chosen not in names:
        raise ConfigError(
            f"profile {chosen!r} is not defined; choose one of {', '.join(sorted(names))}"
        )
    for name in sorted(names):  # validate every profile, not only the chosen one
        _build_profile(name, _table(tables, name, "profiles."))
    profile_settings = _build_profile(chosen, _table(tables, chosen, "profiles."))
    ray = _build_ray(_table(document, "ray", ""))
    return Settings(engine, profile_settings, service, store, web, links, telegram, discord, ray)


def _build_ray(table: dict[str, Any]) -> RaySettings:
    top = {key: value for key, value in table.items() if key not in TASK_SETTINGS}
    _reject_unknown(top, {"address", "num_cpus"}, "ray.")
    deployments: dict[str, RayDeployment] = {}
    for task in TASK_SETTINGS:
        if task not in table:
            continue
        deployment = _build(RayDeployment, _table(table, task, "ray."), f"ray.{task}")
        if deployment.replicas < 1:
            raise ConfigError(f"ray.{task}.replicas must be at least 1")
        if deployment.max_replicas and deployment.max_replicas < deployment.replicas:
            raise ConfigError(f"ray.{task}.max_replicas must be 0 or at least replicas")
        if deployment != RayDeployment():  # the defaults are what an unnamed task gets
            deployments[task] = deployment
    address = _typed(top.get("address", ""), str, "ray.address")
    if address:
        cluster_address(address)  # ConfigError for what is not an address
    num_cpus = _convert(top.get("num_cpus", 0), int, "ray.num_cpus")
    return RaySettings(address=address, num_cpus=num_cpus, tasks=deployments)


def _build_profile(name: str, table: dict[str, Any]) -> Profile:
    where = f"profiles.{name}"
    _reject_unknown(table, set(TASK_SETTINGS), f"{where}.")
    built: dict[str, Any] = {}
    for task, cls in TASK_SETTINGS.items():
        values = dict(BUILTIN_PROFILES.get(name, {}).get(task, {}))
        values.update(_table(table, task, f"{where}."))
        built[task] = _build(cls, values, f"{where}.{task}")
    return Profile(name=name, **built)


def _build(cls: type[Any], values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    batch_fields = (
        {f.name for f in dataclasses.fields(BatchSettings)} if "batching" in fields else set()
    )
    _reject_unknown(values, (fields - {"batching"}) | batch_fields, f"{where}.")
    kwargs: dict[str, Any] = {}
    batch_kwargs: dict[str, Any] = {}
    batch_hints = typing.get_type_hints(BatchSettings)
    for key, value in values.items():
        if key in batch_fields:
            batch_kwargs[key] = _convert(value, batch_hints[key], f"{where}.{key}")
        else:
            kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    if batch_fields:
        # Each task has its own batching defaults (OCR runs one image at a time).
        kwargs["batching"] = dataclasses.replace(cls().batching, **batch_kwargs)
        _check_batching(kwargs["batching"], where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # pragma: no cover - every field is checked above
        raise ConfigError(f"{where}: {exc}") from None


def _check_engine(engine: EngineSettings) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", engine.device):
        raise ConfigError(
            f"engine.device must be auto, cpu, cuda or cuda:N (a GPU's number); "
            f"got {engine.device!r}"
        )
    if engine.cpu_workers < 1:
        raise ConfigError("engine.cpu_workers must be at least 1")
    if engine.max_in_flight < 1:
        raise ConfigError("engine.max_in_flight must be at least 1")
    for key in ("forward_timeout_s", "load_timeout_s"):
        if getattr(engine, key) < 1:
            raise ConfigError(f"engine.{key} must be at least 1 second")
    unknown = sorted(set(engine.pinned) - set(TASK_SETTINGS))
    if unknown:
        raise ConfigError(
            f"engine.pinned names unknown task {unknown[0]!r}; tasks: {', '.join(TASK_SETTINGS)}"
        )


def _check_telegram(telegram: TelegramSettings) -> None:
    for key in ("allowed_users", "allowed_chats"):
        for value in getattr(telegram, key):
            if not re.fullmatch(r"-?\d+", value):
                raise ConfigError(f"telegram.{key} holds numeric ids as text; got {value!r}")
    for key in ("api_base_url", "file_base_url"):
        if not getattr(telegram, key).startswith(("https://", "http://")):
            raise ConfigError(f"telegram.{key} must be an http(s) URL")
    if telegram.max_download_mb <= 0:
        raise ConfigError("telegram.max_download_mb must be more than 0")
    if telegram.mode == "webhook":
        if not telegram.webhook_url.startswith("https://"):
            raise ConfigError("telegram.webhook_url must be the https URL Telegram posts to")
        host, _, port = telegram.webhook_listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("telegram.webhook_listen wants HOST:PORT, e.g. 127.0.0.1:8443")


def metrics_networks(web: WebSettings) -> tuple[IPv4Network | IPv6Network, ...]:
    """The networks whose clients may read /metrics (none when metrics are off)."""
    if not web.metrics:
        return ()
    networks = []
    for value in web.metrics_from:
        try:
            networks.append(ip_network(value, strict=False))
        except ValueError:
            raise ConfigError(
                f'web.metrics_from holds networks like "127.0.0.0/8" or addresses; got {value!r}'
            ) from None
    return tuple(networks)


def _check_discord(discord: DiscordSettings) -> None:
    for key in ("allowed_guilds", "allowed_channels", "allowed_roles"):
        for value in getattr(discord, key):
            if not re.fullmatch(r"\d+", value):
                raise ConfigError(f"discord.{key} holds numeric ids as text; got {value!r}")
    if discord.test_guild and not re.fullmatch(r"\d+", discord.test_guild):
        raise ConfigError(f"discord.test_guild is a numeric server id; got {discord.test_guild!r}")
    if discord.max_download_mb <= 0:
        raise ConfigError("discord.max_download_mb must be more than 0")


def _check_batching(batching: BatchSettings, where: str) -> None:
    if batching.max_batch_size < 1:
        raise ConfigError(f"{where}.max_batch_size must be at least 1")
    if batching.batch_size is not None and batching.batch_size > batching.max_batch_size:
        raise ConfigError(f"{where}.batch_size must not exceed max_batch_size")
    if batching.max_wait_ms < 0:
        raise ConfigError(f"{where}.max_wait_ms must not be negative")


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        # Exactly: TOML's 1 is not true, nor "true" the boolean.
        if not any(type(value) is type(choice) and value == choice for choice in args):
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key} must be one of {choices}; got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        # Optional values are written as 0 (numbers) or "" (text) in TOML, which has no null.
        inner = next(a for a in args if a is not type(None))
        if value in (0, ""):
            return None
        return _convert(value, inner, key)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key} must be a list of strings; got {value!r}")
        return tuple(value)
    if hint is Path:
        return Path(_typed(value, str, key))
    if hint is bool:
        return _typed(value, bool, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        if value < 0:
            raise ConfigError(f"{key} must not be negative; got {value!r}")
        return float(value)
    if hint is int:
        number = _typed(value, int, key)
        if number < 0:
            raise ConfigError(f"{key} must not be negative; got {value!r}")
        return number
    return _typed(value, hint, key)


def _typed(value: Any, kind: type[Any], key: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {kind.__name__}; got {value!r}")
    return value


def _table(document: dict[str, Any], key: str, prefix: str) -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{prefix}{key} must be a table")
    return value


def _reject_unknown(table: dict[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        allowed_keys = ", ".join(sorted(allowed))
        raise ConfigError(
            f"unknown configuration key {prefix}{unknown[0]}; allowed here: {allowed_keys}"
        )
