"""``python -m bot doctor`` on this machine (no GPU, tiny profile) and the single checks on
folders, tokens, databases, hub caches and pins made to fail."""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from adapters.sqlite.migrations import MIGRATIONS
from bot import doctor
from bot.config import load_settings, parse_settings
from bot.doctor import (
    Finding,
    Hub,
    ModelUse,
    Pins,
    add_doctor_arguments,
    check_backend,
    check_disk,
    check_memory,
    check_models,
    check_packages,
    check_platforms,
    check_python,
    check_schema,
    counted_parameters,
    read_pins,
    run_doctor,
)
from core.settings import Settings

TOKENS = ("TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN", "TELEGRAM_WEBHOOK_SECRET")
WriteConfig = Callable[..., Path]


@pytest.fixture(autouse=True)
def no_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TOKENS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def write_config(tmp_path: Path, model_cache: Path) -> WriteConfig:
    """A tiny-profile config with its data in ``tmp_path``; keyword arguments replace
    sections (TOML text) or the store's paths."""

    def write(
        *,
        database: Path | None = None,
        images: Path | None = None,
        telegram: str = 'enabled = "auto"',
        discord: str = "enabled = false",
        engine: str = "",
        extra: str = "",
    ) -> Path:
        data = tmp_path / "data"
        path = tmp_path / "config.toml"
        path.write_text(
            'profile = "tiny"\n'
            f'[engine]\ndevice = "cpu"\nmodel_cache = "{model_cache}"\n{engine}\n'
            f'[store]\ndatabase = "{database or data / "bot.sqlite3"}"\n'
            f'images_dir = "{images or data / "images"}"\n'
            f"[telegram]\n{telegram}\n[discord]\n{discord}\n{extra}"
        )
        return path

    return write


def run(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    """The exit status, the printed lines, and everything printed (stdout and stderr)."""
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    add_doctor_arguments(commands.add_parser("doctor"))
    status = run_doctor(parser.parse_args(["doctor", "--config", str(config)]))
    out, err = capsys.readouterr()
    return status, out.splitlines(), out + err


def line(lines: list[str], start: str) -> str:
    matches = [text for text in lines if text.startswith(start)]
    assert len(matches) == 1, (start, lines)
    return matches[0]


def settings_of(config: Path) -> Settings:
    return load_settings(config)


# -- the command ---------------------------------------------------------------------------


def test_this_machine_is_ready_with_a_check_mark_for_every_area(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines, _ = run(write_config(), capsys)

    assert status == 0
    assert all(text[:2] in ("✓ ", "! ") for text in lines), lines
    for area in (
        "python",
        "backend: local",
        "package torch",
        "package python-telegram-bot",
        "device: cpu",
        "profile: tiny",
        "memory",
        "model ocr",
        "model caption: tiny/blip2-opt",
        "model reimagine: tiny/stable-diffusion",
        "discord: off",
        "data folder",
        "disk",
        "database: none yet",
    ):
        line(lines, f"✓ {area}")
    off = line(lines, "! telegram: ")
    assert "TELEGRAM_BOT_TOKEN is not set" in off and "fix: set TELEGRAM_BOT_TOKEN" in off


def test_a_data_folder_under_a_regular_file_blocks(
    write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Root may write anywhere, but nobody can make a folder inside a file.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the data folder should go")
    config = write_config(database=blocker / "data" / "bot.sqlite3", images=blocker / "images")

    status, lines, _ = run(config, capsys)

    assert status == 1
    data = line(lines, "✗ data folder: ")
    assert f"{blocker} is a file" in data
    assert "— fix: move" in data and "[store] database and images_dir" in data


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_a_data_folder_without_write_permission_blocks(
    write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    try:
        status, lines, _ = run(
            write_config(database=parent / "data" / "bot.sqlite3", images=parent / "images"),
            capsys,
        )
    finally:
        parent.chmod(0o700)

    assert status == 1
    data = line(lines, "✗ data folder: ")
    assert f"cannot write in {parent}" in data and f"chown -R {os.getuid()}" in data


def test_a_required_platform_without_its_token_blocks(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines, _ = run(write_config(telegram="enabled = true"), capsys)

    assert status == 1
    telegram = line(lines, "✗ telegram: ")
    assert telegram.endswith(
        '— fix: set TELEGRAM_BOT_TOKEN in .env, or set [telegram] enabled = "auto"/false'
    )


def test_tokens_that_are_set_are_never_printed(
    write_config: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secrets = {
        "TELEGRAM_BOT_TOKEN": "123456789:AAfake-telegram-token_value",
        "DISCORD_BOT_TOKEN": "MTAfake.discord.token-value",
        "TELEGRAM_WEBHOOK_SECRET": "fake-webhook-secret_42",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    config = write_config(
        telegram='enabled = true\nmode = "webhook"\n'
        'webhook_url = "https://bot.example.org/telegram/updates"',
        discord="enabled = true",
    )

    status, lines, printed = run(config, capsys)

    assert status == 0
    line(lines, "✓ telegram: token set in TELEGRAM_BOT_TOKEN")
    line(lines, "✓ telegram webhook: secret set in TELEGRAM_WEBHOOK_SECRET")
    line(lines, "✓ discord: token set in DISCORD_BOT_TOKEN")
    for value in secrets.values():
        assert value not in printed
        assert value.split(":")[-1] not in printed


def test_a_database_newer_than_the_code_blocks(
    write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "data" / "bot.sqlite3"
    database.parent.mkdir()
    newer = len(MIGRATIONS) + 1
    with sqlite3.connect(database) as db:
        db.execute(f"PRAGMA user_version = {newer}")

    status, lines, _ = run(write_config(database=database), capsys)

    assert status == 1
    schema = line(lines, "✗ database: ")
    assert f"schema version {newer}, newer than the {len(MIGRATIONS)}" in schema
    assert "— fix: upgrade captionbot" in schema


def test_a_budget_smaller_than_one_model_warns_but_does_not_block(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    # EasyOCR's English weights alone are about 94 MB.
    status, lines, _ = run(write_config(engine="memory_budget_mb = 10.0"), capsys)

    assert status == 0
    memory = line(lines, "! memory: ")
    assert "ocr alone needs more than memory_budget_mb = 10" in memory
    ocr_bytes = doctor.ocr_bytes(settings_of(write_config()).profile.ocr)
    assert ocr_bytes is not None and ocr_bytes > 10 * doctor.MB
    ocr_mb = math.ceil(ocr_bytes / doctor.MB)
    assert f"fix: raise [engine] memory_budget_mb to at least {ocr_mb}," in memory


# -- single checks -------------------------------------------------------------------------


def test_the_schema_check_reads_older_current_and_foreign_files(tmp_path: Path) -> None:
    known = len(MIGRATIONS)
    older, current, foreign = tmp_path / "older.db", tmp_path / "current.db", tmp_path / "x.db"
    for path, version in ((older, known - 1), (current, known)):
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version = {version}")
    foreign.write_bytes(b"this is not a database, only text long enough to have a header" * 4)

    assert check_schema(older) == Finding(
        "database", "ok", f"{older}: schema version {known - 1}, migrated to {known} at start"
    )
    assert check_schema(current).message.endswith("current")
    assert check_schema(foreign).level == "blocking"
    assert check_schema(tmp_path / "absent.db").level == "ok"
    assert not (tmp_path / "absent.db").exists()  # the doctor creates nothing


def test_pins_come_from_pyproject_and_a_package_outside_them_blocks(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nrequires-python = ">=3.99"\n'
        'dependencies = ["torch>=99", "surely-not-installed-package>=1"]\n'
        '[project.optional-dependencies]\nchat = ["discord.py>=99"]\n'
    )
    pins = read_pins(pyproject)

    assert check_python(pins).level == "blocking"
    torch, absent, discord = check_packages(
        pins,
        running=frozenset(),
        packages=("torch", "surely-not-installed-package", "discord.py"),
    )
    assert torch.level == "blocking" and "pyproject wants >=99" in torch.message
    assert absent.level == "blocking" and absent.message.startswith("not installed")
    # Discord will not run, so its library being too old is only worth knowing.
    assert discord.level == "warn"
    assert check_packages(pins, frozenset({"discord"}), ("discord.py",))[0].level == "blocking"


def test_the_real_pins_accept_what_is_installed() -> None:
    pins = read_pins(doctor.PYPROJECT)
    assert pins.packages["torch"] == SpecifierSet("==2.14.1")
    assert [f.level for f in check_packages(pins, frozenset({"telegram", "discord"}))] == [
        "ok"
    ] * len(doctor.KEY_PACKAGES)
    assert check_packages(Pins(SpecifierSet(), {}), frozenset(), ("discord.py",))[0].level == "ok"


def test_a_webhook_secret_telegram_would_refuse_blocks(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123:abc")
    monkeypatch.setenv("TELEGRAM_WEBHOOK_SECRET", "has spaces")
    settings = settings_of(
        write_config(telegram='mode = "webhook"\nwebhook_url = "https://bot.example.org/updates"')
    )

    findings = check_platforms(settings, os.environ)

    webhook = next(f for f in findings if f.name == "telegram webhook")
    assert webhook.level == "blocking" and "has spaces" not in webhook.line


def _safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """A safetensors file whose header names ``tensors`` (shape per name), zero-filled."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in tensors.items():
        size = 4
        for dimension in shape:
            size *= dimension
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))


def _cached(hub_cache: Path, repo: str, files: dict[str, str | dict[str, list[int]]]) -> Path:
    """A repository in a hub cache laid out as huggingface_hub lays it out."""
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snapshot = folder / "snapshots" / "0123abcd"
    for name, content in files.items():
        target = snapshot / name
        if isinstance(content, dict):
            _safetensors(target, content)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
    return snapshot


def test_hub_models_are_found_in_the_cache_and_incomplete_ones_are_not(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    hub_cache = tmp_path / "hub"
    _cached(hub_cache, "acme/whole", {"config.json": "{}", "model.safetensors": {"w": [1024]}})
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    _cached(
        hub_cache,
        "acme/sharded",
        {
            "config.json": "{}",
            "model.safetensors.index.json": json.dumps(index),
            "model-1.safetensors": {"a": [4]},
        },
    )
    settings = settings_of(
        write_config(
            extra='[profiles.tiny.caption]\nmodel = "acme/whole"\n'
            '[profiles.tiny.vqa]\nmodel = "acme/sharded"\n'
            '[profiles.tiny.write]\nmodel = "meta-llama/Llama-2-7b-chat-hf"\n'
        )
    )
    online = Hub(hub_cache, offline=False, has_token=False)

    by_name = {f.name: f for f in check_models(settings, online)}

    assert by_name["model caption"].level == "ok"
    assert "acme/whole in the hub cache" in by_name["model caption"].message
    assert by_name["model vqa"].level == "warn"
    assert "lacks weight shards" in by_name["model vqa"].message
    assert "size unknown offline" in by_name["model vqa"].message
    assert "HF_TOKEN" in by_name["model write"].fix
    assert "about 12.6 GB" in by_name["model write"].message  # README: about 13.5 (10^9) GB

    offline = {f.name: f for f in check_models(settings, Hub(hub_cache, True, False))}
    assert offline["model caption"].level == "ok"
    assert offline["model vqa"].level == "blocking"
    assert "bot prefetch" in offline["model vqa"].fix

    memory = check_memory(settings, online).message
    # The cached model's parameters come from its header; Llama 2's from its known figure
    # (fp32 on a CPU, as the tiny profile's precision "none" loads it); the incomplete one
    # is left out rather than guessed.
    assert "caption 0.0 MB none" in memory
    assert f"write {6.74e9 * 4 / doctor.GB:.1f} GB none" in memory
    assert "vqa" in memory.split("not counted until their files are here: ")[1]


def test_diffusers_weights_are_counted_once_and_skipped_folders_not_at_all(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "sd"
    _safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors", {"conv": [10, 10]})
    _safetensors(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors", {"conv": [10, 10]})
    _safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", {"conv": [5]})
    _safetensors(folder / "safety_checker" / "model.safetensors", {"vision": [1000]})

    use = ModelUse("reimagine", str(folder), "diffusers", ("safety_checker",))

    assert counted_parameters(folder, use) == 105


def test_too_little_disk_space_blocks(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = settings_of(write_config())
    hub = Hub(tmp_path / "hub", offline=True, has_token=False)
    assert {f.level for f in check_disk(settings, hub)} == {"ok"}

    monkeypatch.setattr(doctor, "DISK_BLOCKING", 1 << 60)

    (disk,) = check_disk(settings, hub)  # data and the model cache share one disk here
    assert disk.level == "blocking" and "free space there" in disk.fix


def test_on_the_ray_backend_the_cluster_version_is_checked_not_this_machines_device() -> None:
    settings = parse_settings({"engine": {"backend": "ray"}, "ray": {"address": "auto"}})
    pins = read_pins(doctor.PYPROJECT)
    found = check_backend(settings, pins)
    assert found.level == "ok" and "models run on auto" in found.message
    other = Pins(pins.python, {**pins.packages, "ray": SpecifierSet("==1.0")})
    refused = check_backend(settings, other)
    assert refused.level == "blocking" and "the same version on every cluster" in refused.fix
    names = [f.name for f in doctor.run_checks(settings, pins, {}, doctor.hub_here())]
    assert "device" not in names and not any(name.startswith("model ") for name in names)


def test_a_finding_that_is_not_ok_must_name_its_fix() -> None:
    with pytest.raises(ValueError, match="names no fix"):
        Finding("disk", "blocking", "full")
    assert Finding("disk", "warn", "nearly full", "delete").line == (
        "! disk: nearly full — fix: delete"
    )
