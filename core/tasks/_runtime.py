"""Device and precision choices shared by the tasks.

| precision | CUDA                                   | CPU                                      |
|-----------|----------------------------------------|------------------------------------------|
| ``none``  | fp16 weights                           | fp32 weights                             |
| ``bf16``  | bf16 weights (GPUs that support it)    | bf16 weights                             |
| ``int8``  | bitsandbytes 8-bit                     | PyTorch dynamic int8 on Linear layers,   |
|           |                                        | or bitsandbytes 8-bit (``cpu_int8``)     |
| ``nf4``   | bitsandbytes 4-bit NF4, fp16/bf16 math | bitsandbytes 4-bit (Linear width >= 64)  |
| ``auto``  | ``none``                               | ``bf16`` with native bf16 math, else int8 |
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import logging
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from core.errors import ConfigError, ModelUnavailable, OutOfDeviceMemory
from core.settings import Precision

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# transformers' and diffusers' lazy modules are not safe when two threads use a name for
# the first time at once: `from transformers import T5Config` fails with ImportError, a
# submodule import with a _DeadlockError, and two models built at once trip over each
# other's meta-device initialisation ("Cannot copy out of meta tensor"). The engine loads
# models on the device thread while the CPU pool loads processors, so every step that can
# import a model library or build a model for the first time holds this lock. Re-entrant:
# a model load loads its processor too.
FIRST_USE = threading.RLock()

# A model name -> what ``from_pretrained`` takes. The composition root injects one that
# also builds the tiny test models; the core itself passes hub ids and folders through.
ModelResolver = Callable[[str, Path], str]


def as_given(model: str, cache_dir: Path) -> str:
    """The default ``ModelResolver``: a hub id or a folder, unchanged."""
    return model


def first_use(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` holding ``FIRST_USE``: for loads and anything else that imports a model
    library or builds a model."""

    @functools.wraps(fn)
    def serialized(*args: P.args, **kwargs: P.kwargs) -> R:
        with FIRST_USE:
            return fn(*args, **kwargs)

    return serialized


def pin_threads(count: int) -> None:
    """Limit the calling thread's torch math (its OpenMP team and MKL) to ``count`` threads.

    ``torch.set_num_threads`` alone does not stick: a thread's first parallel operation
    re-applies the count last set anywhere in the process, so a thread pinned before
    another thread pinned a different count would silently take that one. Asking for the
    count first does that one-time initialisation now; the setting then holds.
    """
    torch.get_num_threads()
    torch.set_num_threads(count)


def resolve_device(setting: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; ConfigError, naming the
    reason, for a GPU that is asked for and missing or that this PyTorch cannot run on."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"engine.device = {setting!r}, but {cuda_problem()}")
    device = torch.device("cuda" if setting == "auto" else setting)
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"engine.device = {setting!r}, but PyTorch sees {torch.cuda.device_count()} GPU(s)"
        )
    problem = unsupported_gpu(
        torch.cuda.get_device_name(index),
        torch.cuda.get_device_capability(index),
        torch.cuda.get_arch_list(),
    )
    if problem is not None:
        raise ConfigError(problem)
    return device


def require_gpu(setting: str) -> None:
    """Refuse to go on without a usable GPU, with the reason (for the gpu profile, which
    on a CPU would take minutes per forward and run into the watchdog)."""
    if resolve_device(setting).type != "cuda":
        raise ConfigError(
            f"The gpu profile needs an NVIDIA GPU, but {cuda_problem()}. To run without "
            'one, choose the cpu profile (profile = "cpu" in config.toml, or --profile cpu).'
        )


# The driver this PyTorch's CUDA 13.0 needs (the Docker image's base says the same).
MIN_DRIVER = 580


def cuda_problem() -> str:
    """Why PyTorch sees no usable CUDA device here, as something an operator can act on."""
    if torch.version.cuda is None:
        return "this PyTorch is a CPU-only build; install the CUDA wheel pyproject.toml names"
    version_file = Path("/proc/driver/nvidia/version")
    if not version_file.exists():
        return (
            "no NVIDIA driver is visible here. Install the NVIDIA driver on the host "
            f"({MIN_DRIVER} or newer); in Docker also install the NVIDIA Container Toolkit "
            "and give the container the GPU (compose.yaml reserves it; docker run needs "
            "--gpus all)"
        )
    driver = driver_version(version_file.read_text(errors="replace"))
    if driver is not None and driver < MIN_DRIVER:
        return (
            f"the NVIDIA driver is version {driver}, and this PyTorch (CUDA "
            f"{torch.version.cuda}) needs {MIN_DRIVER} or newer; update the host's driver"
        )
    try:
        torch.cuda.init()
    except Exception as exc:
        return f"PyTorch could not start CUDA ({exc})"
    return "PyTorch sees no CUDA device"


def driver_version(proc_text: str) -> int | None:
    """The major version in /proc/driver/nvidia/version ("... Kernel Module  580.65.06 ...")."""
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+)\.", proc_text)
    return int(match.group(1)) if match else None


def unsupported_gpu(name: str, capability: tuple[int, int], arch_list: list[str]) -> str | None:
    """Why this PyTorch cannot run kernels on a GPU of ``capability``, or None when it can.

    Machine code built for sm_XY runs on GPUs of the same major version X and a minor of Y
    or more; PTX (compute_XY) is compiled at start for any GPU from X.Y on. PyTorch only
    warns about a mismatch, and then every forward fails with "no kernel image".
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        if not digits.isdigit() or len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if (kind == "sm" and built[0] == major and built[1] <= minor) or (
            kind == "compute" and built <= capability
        ):
            return None
    return (
        f"The GPU {name} (compute capability {major}.{minor}) cannot run this PyTorch, "
        f"which has kernels for {', '.join(arch_list) or 'no GPU'}. It needs a Turing "
        "(T4, RTX 20xx) or newer GPU; on this one, run the cpu profile."
    )


def native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 arithmetic in hardware: Ampere (8.0) and newer. torch.cuda.is_bf16_supported()
    also says yes on a T4 or V100, where bf16 is emulated and slower than fp16."""
    return capability >= (8, 0)


def _cuda_bf16(device: torch.device) -> bool:
    return native_bf16(torch.cuda.get_device_capability(device))


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_precision(device: torch.device) -> Precision:
    """What ``auto`` means: the fastest per image for a BLIP-base captioner on two CPU cores.

    Batched bf16 beat dynamic int8 where the CPU has native bf16; without it bf16 is
    emulated and slow, and int8 wins.
    """
    if device.type == "cuda":
        return "none"
    return "bf16" if cpu_has_native_bf16() else "int8"


@dataclass(frozen=True, slots=True)
class Plan:
    """How one model is loaded: ``from_pretrained`` arguments and a post-load step."""

    precision: Precision
    device: torch.device
    dtype: torch.dtype
    # bitsandbytes quantization config, passed to from_pretrained.
    quantization_config: Any | None = None
    # Apply torch.ao dynamic int8 quantization to Linear layers after loading.
    dynamic_int8: bool = False

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.quantization_config is not None:
            kwargs["quantization_config"] = self.quantization_config
            kwargs["device_map"] = (
                {"": self.device.index or 0} if self.device.type == "cuda" else {"": "cpu"}
            )
        return kwargs

    def finish(self, model: Any) -> Any:
        """Move and quantize a freshly loaded model; returns it in eval mode."""
        if self.quantization_config is None:
            model = model.to(self.device)
        if self.dynamic_int8:
            model = torch.ao.quantization.quantize_dynamic(
                model, {torch.nn.Linear}, dtype=torch.qint8
            )
        return model.eval()

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.device.type}, {self.precision} ({dtype})"


def plan(task: str, precision: Precision, device: torch.device, cpu_int8: str = "dynamic") -> Plan:
    """Check ``precision`` on ``device`` and say how to load; ConfigError if it cannot work."""
    if precision == "auto":
        precision = auto_precision(device)
    on_cuda = device.type == "cuda"
    half = torch.float16 if on_cuda else torch.float32
    if precision == "none":
        chosen = Plan(precision, device, half)
    elif precision == "bf16":
        if on_cuda and not _cuda_bf16(device):
            raise ConfigError(
                f"{task}.precision = 'bf16' but this GPU has no bf16 support; use 'none'"
            )
        chosen = Plan(precision, device, torch.bfloat16)
    elif precision == "int8":
        if on_cuda or cpu_int8 == "bitsandbytes":
            config = _bnb_config(task, load_in_8bit=True)
            chosen = Plan(precision, device, half, quantization_config=config)
        else:
            chosen = Plan(precision, device, torch.float32, dynamic_int8=True)
    elif precision == "nf4":
        compute = torch.bfloat16 if not on_cuda or _cuda_bf16(device) else torch.float16
        config = _bnb_config(
            task,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        chosen = Plan(precision, device, compute, quantization_config=config)
    else:
        raise ConfigError(
            f"{task}.precision must be one of auto, none, int8, nf4, bf16; got {precision!r}"
        )
    logger.info("%s precision: %s", task, chosen.describe())
    return chosen


@first_use
def _bnb_config(task: str, **kwargs: Any) -> Any:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{task}.precision needs the bitsandbytes package, which is not installed"
        )
    # bitsandbytes warns on every CPU forward; the message is noise for operators.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


def state_bytes(*modules: Any) -> int:
    """Bytes held by the modules' weights and buffers, quantized ones included.

    ``state_dict`` rather than ``parameters()``: dynamic int8 layers keep their packed
    weights outside the parameters, and bitsandbytes stores 4-bit weights as uint8 tensors.
    Tensors are counted once by storage, since tied weights (an LM head sharing the word
    embeddings) appear under two names.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for module in modules:
        if module is not None:
            for value in module.state_dict(keep_vars=True).values():
                total += _tensor_bytes(value, seen)
    return total


def _tensor_bytes(value: Any, seen: set[tuple[int, int]]) -> int:
    if isinstance(value, torch.Tensor):
        size = value.numel() * value.element_size()
        key = (value.data_ptr(), size)
        if key in seen:
            return 0
        seen.add(key)
        return size
    if isinstance(value, tuple | list):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def free_memory(device: torch.device) -> None:
    """Return an unloaded model's memory: host objects now, then the CUDA cache's blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- loading: where a model's files come from, why a load failed, whether it fits --------

_GB = 1024**3
# What each task makes, for the sentence a user gets when its model cannot be loaded.
_MAKES = {
    "caption": "describe images",
    "ocr": "read text in images",
    "tags": "make hashtags",
    "mood": "make mood labels",
    "vqa": "answer questions about images",
    "write": "write social captions",
    "reimagine": "make images",
}
# Seconds before trying again after a failure that may pass by itself.
HUB_RETRY_S = 300.0
OTHER_RETRY_S = 60.0
# Files that come with the weights: configs, tokenizers, chat templates, schedulers.
_SUPPORT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_VARIANTS = ("fp16", "bf16", "non_ema", "ema")
# How the HTTP and socket layers say the hub could not be reached (by name: httpx's
# classes come from whichever httpx huggingface_hub vendors).
_NETWORK_ERRORS = frozenset(
    {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "gaierror"}
)


@contextlib.contextmanager
def loading(task: str, model: str) -> Iterator[None]:
    """Turn what goes wrong while fetching or loading ``model`` into ``ModelUnavailable``
    with its diagnosis. Out of memory stays itself, so the engine can make room."""
    try:
        yield
    except (ModelUnavailable, OutOfDeviceMemory):
        raise
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            raise
        raise unavailable(task, model, exc) from exc


def unavailable(task: str, model: str, exc: BaseException) -> ModelUnavailable:
    """``exc`` from loading ``model``, as the user's sentence and the operator's reason."""
    cause, retry_after_s = diagnose(model, exc)
    makes = _MAKES.get(task, f"run {task}")
    return ModelUnavailable(
        f"This bot cannot {makes} right now; its operator has been told why.",
        cause,
        retry_after_s,
    )


def diagnose(model: str, exc: BaseException) -> tuple[str, float | None]:
    """Why loading ``model`` failed and what to do, and when to try again (None: only
    when the operator has done something, so not before a restart)."""
    from huggingface_hub import constants, errors

    chain = list(_causes(exc))

    def found(kind: type[BaseException]) -> BaseException | None:
        return next((e for e in chain if isinstance(e, kind)), None)

    page = f"https://huggingface.co/{model}"
    if found(errors.GatedRepoError):
        return (
            f"{model} is gated on the Hugging Face hub: sign in at {page}, accept its "
            "license, create a read token at https://huggingface.co/settings/tokens and "
            "give it to the bot in the HF_TOKEN environment variable; or choose an ungated "
            "model (config.toml names one)",
            None,
        )
    if found(errors.RepositoryNotFoundError):
        return (
            f"{model} is not on the Hugging Face hub, or is private: check the model name "
            "in config.toml, or give a token that can read it in HF_TOKEN",
            None,
        )
    if found(errors.RevisionNotFoundError) or found(errors.RemoteEntryNotFoundError):
        return f"{model} on the Hugging Face hub lacks files this bot needs ({exc})", None
    http = found(errors.HfHubHTTPError)
    status = getattr(getattr(http, "response", None), "status_code", None)
    if status in (401, 403):
        return (
            f"the Hugging Face hub refused the token in HF_TOKEN for {model}: create a "
            "new read token at https://huggingface.co/settings/tokens",
            None,
        )
    unreachable = any(type(e).__name__ in _NETWORK_ERRORS for e in chain)
    if unreachable or found(errors.LocalEntryNotFoundError) or found(errors.OfflineModeIsEnabled):
        if constants.HF_HUB_OFFLINE:
            return (
                f"{model} is not in the model cache and offline mode is on (HF_HUB_OFFLINE): "
                "download it first with `python -m bot prefetch` where the hub is reachable",
                None,
            )
        return (
            f"the Hugging Face hub could not be reached to download {model}: check the "
            f"network (trying again in {HUB_RETRY_S:.0f} s)",
            HUB_RETRY_S,
        )
    mistake = found(ConfigError)
    if mistake is not None:
        return str(mistake), None
    if found(FileNotFoundError) or found(NotADirectoryError) or Path(model).exists():
        # A local folder does not change by itself: what is wrong with it stays wrong.
        return f"{model} is not a model this bot can load: {exc}", None
    root = chain[-1]  # what went wrong first, under the wrappers transformers adds
    return f"loading {model} failed: {type(root).__name__}: {root}", OTHER_RETRY_S


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def fetch(
    model: str,
    *,
    layout: str = "transformers",
    variant: str | None = None,
    without: tuple[str, ...] = (),
) -> str:
    """A local folder holding ``model``: a folder as it is; a hub id downloaded into the hub
    cache (files already there are not fetched again), with progress in the log.

    Runs on an I/O thread before the load, outside the load watchdog, so a first download
    of many gigabytes on a slow link never looks like a hung device. ``layout`` is
    ``transformers`` (weights beside the config) or ``diffusers`` (a folder per component);
    ``variant`` picks a diffusers weight variant such as ``fp16`` when the repository has it;
    ``without`` names folders not needed (a safety checker that is switched off).
    """
    if Path(model).is_dir():
        return model
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    if constants.HF_HUB_OFFLINE:
        # The cached snapshot, or LocalEntryNotFoundError (diagnosed as offline mode).
        return str(snapshot_download(model))
    info = HfApi().model_info(model, files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or ()}
    names = [
        name
        for name in choose_files(list(sizes), layout=layout, variant=variant)
        if not name.startswith(tuple(f"{folder}/" for folder in without))
    ]
    total = sum(sizes[name] for name in names)
    logger.info("fetching %s: %d files, %.1f GB", model, len(names), total / _GB)
    started, done = time.monotonic(), 0
    folder: Path | None = None
    for index, name in enumerate(names, start=1):
        path = Path(hf_hub_download(model, name, revision=info.sha))
        folder = path.parents[len(Path(name).parts) - 1]
        done += sizes[name]
        if sizes[name] > 50 * 1024**2 or index == len(names):
            rate = done / max(1e-3, time.monotonic() - started) / 1024**2
            logger.info(
                "fetching %s: %d of %d files, %.1f of %.1f GB (%.0f MB/s)",
                model,
                index,
                len(names),
                done / _GB,
                total / _GB,
                rate,
            )
    if folder is None:
        raise FileNotFoundError(f"{model} has no files to load")
    return str(folder)


def choose_files(names: list[str], *, layout: str, variant: str | None = None) -> list[str]:
    """The files of a repository that loading needs: configs and tokenizers, and one set of
    weights (safetensors when there are, else .bin; a diffusers ``variant`` when given and
    present). Never the other formats and copies repositories carry (a 4 GB single-file
    checkpoint beside a diffusers folder, .bin beside .safetensors, ONNX, flax)."""
    support = [n for n in names if n.endswith(_SUPPORT_SUFFIXES)]

    def weights(suffix: str) -> list[str]:
        if layout == "transformers":
            return [n for n in names if "/" not in n and n.endswith(suffix)]
        inner = [n for n in names if "/" in n and n.endswith(suffix)]
        if variant is not None:
            wanted = [n for n in inner if n.endswith(f".{variant}{suffix}")]
            if wanted:
                return wanted
        return [n for n in inner if not any(f".{v}." in n for v in _VARIANTS)]

    chosen = weights(".safetensors") or weights(".bin")
    return sorted(set(support + chosen))


def has_variant(folder: str, variant: str) -> bool:
    """Whether a diffusers folder holds weights of ``variant`` (``fp16``)."""
    return any(Path(folder).glob(f"*/*.{variant}.safetensors"))


def checkpoint_parameters(folder: str) -> int:
    """Parameters in a folder's safetensors files, read from their headers (no weights)."""
    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            if name != "__metadata__":
                total += math.prod(tensor["shape"])
    return total


def quantized_bytes(parameters: int, plan: Plan) -> int:
    """About what a quantized model takes on the device: 8-bit weights are a byte a
    parameter and NF4 with double quantization a little over half, plus the layers left
    unquantized and room for the first batch."""
    per_parameter = 1.0 if plan.precision == "int8" else 0.56
    return int(parameters * per_parameter * 1.15) + 512 * 1024**2


def check_room(device: torch.device, folder: str, plan: Plan) -> None:
    """Before a quantized load on a GPU: ``OutOfDeviceMemory`` when it clearly cannot fit.
    bitsandbytes' own out-of-memory error is caught inside transformers and comes out as
    a plain RuntimeError after minutes of loading, so asking first saves both."""
    if device.type != "cuda" or plan.quantization_config is None:
        return
    parameters = checkpoint_parameters(folder)
    if not parameters:
        return
    needed = quantized_bytes(parameters, plan)
    free, _ = torch.cuda.mem_get_info(device)
    if needed > free:
        raise OutOfDeviceMemory(
            f"needs about {needed / _GB:.1f} GB of GPU memory and {free / _GB:.1f} GB are free"
        )


class ModelFiles:
    """Where a task's model comes from: resolved (the tiny builders when wired in) and
    fetched once into a local folder, which loads then read without touching the network.

    ``folder()`` is safe from any thread; two threads asking at once may both check the
    hub cache, whose own file locks keep a download from happening twice.
    """

    def __init__(
        self,
        task: str,
        model: str,
        resolve_model: ModelResolver,
        cache_dir: Path,
        *,
        layout: str = "transformers",
        variant: str | None = None,
        without: tuple[str, ...] = (),
    ) -> None:
        self.model = model
        self._task = task
        self._resolve_model = resolve_model
        self._cache_dir = cache_dir
        self._layout = layout
        self._variant = variant
        self._without = without
        self._folder: str | None = None

    def folder(self) -> str:
        if self._folder is None:
            with loading(self._task, self.model):
                with FIRST_USE:  # a tiny model is built here, with the model libraries
                    resolved = self._resolve_model(self.model, self._cache_dir)
                self._folder = fetch(
                    resolved, layout=self._layout, variant=self._variant, without=self._without
                )
        return self._folder
