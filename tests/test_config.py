"""config.toml parsing: defaults, documentation, and clear errors that name the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from bot.config import BUILTIN_PROFILES, TASK_SETTINGS, anchored, load_settings, parse_settings
from core.errors import ConfigError
from core.settings import (
    BatchSettings,
    DiscordSettings,
    EngineSettings,
    LinkSettings,
    RayDeployment,
    RaySettings,
    ServiceSettings,
    StoreSettings,
    TelegramSettings,
    WebSettings,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.toml"


@pytest.mark.parametrize("profile", sorted(BUILTIN_PROFILES))
def test_config_toml_states_exactly_the_built_in_defaults(profile: str) -> None:
    assert load_settings(CONFIG, profile) == anchored(load_settings(None, profile), ROOT)


def test_relative_paths_in_a_config_file_are_beside_it(tmp_path: Path) -> None:
    """Not in the working directory: a service started elsewhere must find its data."""
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_text(
        '[engine]\nmodel_cache = "models"\n'
        '[store]\ndatabase = "data/bot.sqlite3"\nimages_dir = "/srv/images"\n'
        '[profiles.tiny.caption]\nmodel = "./my-captioner"\n'
        '[profiles.tiny.write]\nadapter = "../adapters/lora"\n'
        '[profiles.tiny.vqa]\nmodel = "Salesforce/blip-vqa-base"\n'
    )
    settings = load_settings(config, "tiny")
    here = config.parent
    assert settings.engine.model_cache == here / "models"
    assert settings.store.database == here / "data" / "bot.sqlite3"
    assert settings.store.images_dir == Path("/srv/images")
    assert settings.profile.caption.model == str(here / "my-captioner")
    assert settings.profile.write.adapter == str(here / ".." / "adapters" / "lora")
    assert settings.profile.vqa.model == "Salesforce/blip-vqa-base"  # a hub id, not a path


def test_every_key_is_in_config_toml_with_a_comment() -> None:
    text = CONFIG.read_text()
    keys = {f.name for f in dataclasses.fields(EngineSettings)}
    sections = (ServiceSettings, StoreSettings, WebSettings, LinkSettings, TelegramSettings)
    for section in (*sections, DiscordSettings, RayDeployment):
        keys |= {f.name for f in dataclasses.fields(section)}
    keys |= {f.name for f in dataclasses.fields(RaySettings)} - {"tasks"}
    for cls in TASK_SETTINGS.values():
        keys |= {f.name for f in dataclasses.fields(cls)} - {"batching"}
    keys |= {f.name for f in dataclasses.fields(BatchSettings)}
    for key in sorted(keys):
        match = re.search(rf"^{key} = ", text, re.MULTILINE)
        assert match, f"{key} is not shown in config.toml"
        # The key, or the task-key list in the header, is explained by a comment.
        before = text[: match.start()].rstrip().splitlines()[-1]
        assert before.startswith("#") or f"#   {key}" in text, f"{key} has no comment"


def test_every_key_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for line in CONFIG.read_text().splitlines():
        match = re.match(r"^(\w+) = ", line)
        if match:
            assert f"`{match.group(1)}`" in readme, f"{match.group(1)} is missing from the README"


def test_the_default_profile_is_tiny_and_the_profile_flag_wins() -> None:
    assert load_settings(CONFIG).profile.name == "tiny"
    assert load_settings(CONFIG, "gpu").profile.caption.model == "Salesforce/blip2-opt-2.7b"


def test_zero_batch_size_means_measure_and_empty_model_dir_means_bundled() -> None:
    settings = load_settings(CONFIG, "gpu").profile
    assert settings.caption.batching.batch_size is None
    assert settings.ocr.model_dir is None
    assert settings.ocr.batching.batch_size == 1


def test_a_custom_profile_starts_from_the_defaults() -> None:
    document = {"profile": "mine", "profiles": {"mine": {"caption": {"model": "some/folder"}}}}
    settings = parse_settings(document)
    assert settings.profile.caption.model == "some/folder"
    assert settings.profile.tags.model == "fabiochiu/t5-base-tag-generation"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"enigne": {}}, "unknown configuration key enigne"),
        ({"engine": {"max_inflight": 3}}, "unknown configuration key engine.max_inflight"),
        ({"engine": {"device": "tpu"}}, "engine.device must be auto, cpu, cuda or cuda:N"),
        ({"engine": {"device": "cuda:x"}}, "engine.device must be auto, cpu, cuda or cuda:N"),
        ({"engine": {"max_in_flight": "many"}}, "engine.max_in_flight must be of type int"),
        ({"engine": {"max_in_flight": True}}, "engine.max_in_flight must be of type int"),
        ({"engine": {"forward_timeout_s": -1}}, "engine.forward_timeout_s must not be negative"),
        ({"profile": "huge"}, "profile 'huge' is not defined"),
        ({"profiles": {"cpu": {"video": {}}}}, "unknown configuration key profiles.cpu.video"),
        (
            {"profiles": {"cpu": {"caption": {"precision": "fp8"}}}},
            "profiles.cpu.caption.precision must be one of",
        ),
        (
            {"profiles": {"gpu": {"ocr": {"languages": "en"}}}},
            "profiles.gpu.ocr.languages must be a list",
        ),
        (
            {"profiles": {"gpu": {"tags": {"beams": 2}}}},
            "unknown configuration key profiles.gpu.tags.beams",
        ),
        (
            {"profiles": {"gpu": {"tags": {"batch_size": 9, "max_batch_size": 4}}}},
            "profiles.gpu.tags.batch_size must not exceed max_batch_size",
        ),
        ({"engine": "fast"}, "engine must be a table"),
        ({"engine": {"cpu_workers": 0}}, "engine.cpu_workers must be at least 1"),
        ({"engine": {"max_in_flight": 0}}, "engine.max_in_flight must be at least 1"),
        ({"engine": {"forward_timeout_s": 0.1}}, "engine.forward_timeout_s must be at least 1"),
        ({"engine": {"pinned": ["captions"]}}, "engine.pinned names unknown task 'captions'"),
        ({"engine": {"cpu_int8": "gptq"}}, "engine.cpu_int8 must be one of"),
        ({"service": {"describe_parts": ["poem"]}}, "service.describe_parts: unknown part 'poem'"),
        ({"service": {"daily_ask": -1}}, "service.daily_ask must not be negative"),
        ({"web": {"port": 70000}}, "web.port must be between 0 and 65535"),
        ({"store": {"retention": 3}}, "unknown configuration key store.retention"),
    ],
)
def test_bad_config_stops_with_a_message_naming_the_key(
    document: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_settings(document)


def test_a_bad_value_in_an_unused_profile_still_stops_start_up() -> None:
    with pytest.raises(ConfigError, match=r"profiles\.gpu\.caption\.num_beams"):
        parse_settings({"profile": "tiny", "profiles": {"gpu": {"caption": {"num_beams": "3"}}}})


def test_broken_toml_and_missing_file_are_reported(tmp_path: Path) -> None:
    broken = tmp_path / "config.toml"
    broken.write_text("profile = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize("platform", ["telegram", "discord"])
def test_a_platform_is_auto_unless_switched_exactly(platform: str) -> None:
    assert getattr(parse_settings({}), platform).enabled == "auto"
    for switch in ("auto", True, False):
        enabled = getattr(parse_settings({platform: {"enabled": switch}}), platform).enabled
        assert enabled == switch and type(enabled) is type(switch)
    for wrong in (1, 0, "true", "yes"):
        with pytest.raises(ConfigError, match=f"{platform}.enabled must be one of"):
            parse_settings({platform: {"enabled": wrong}})


def test_the_ray_section_is_parsed_per_task_and_refuses_what_cannot_run() -> None:
    settings = parse_settings(
        {
            "engine": {"backend": "ray"},
            "ray": {
                "address": "auto",
                "write": {"gpus": 0.5, "replicas": 1, "max_replicas": 3},
                "reimagine": {"gpus": 0.5},
            },
        }
    )
    assert settings.engine.backend == "ray" and settings.ray.address == "auto"
    assert settings.ray.deployment("write") == RayDeployment(replicas=1, max_replicas=3, gpus=0.5)
    assert settings.ray.deployment("caption") == RayDeployment()
    for document, message in (
        ({"ray": {"caption": {"replicas": 0}}}, "ray.caption.replicas must be at least 1"),
        ({"ray": {"ocr": {"replicas": 3, "max_replicas": 2}}}, "ray.ocr.max_replicas"),
        ({"ray": {"ocr": {"gpu": 1}}}, "unknown configuration key ray.ocr.gpu"),
        ({"ray": {"port": 1}}, "unknown configuration key ray.port"),
        ({"ray": {"address": "head.example"}}, "ray.address is"),
        ({"ray": {"address": "http://head:8265"}}, "ray.address is"),
        ({"engine": {"backend": "cluster"}}, "engine.backend must be one of"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_settings(document)


def test_the_cluster_configuration_compose_ray_uses_parses() -> None:
    settings = load_settings(ROOT / "cluster" / "config.toml")
    assert (settings.engine.backend, settings.ray.address) == ("ray", "auto")
    shares = [settings.ray.deployment(task).gpus for task in TASK_SETTINGS]
    assert 0 < sum(shares) <= 1.0 and all(share > 0 for share in shares)
