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

import functools
import gc
import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from core.errors import ConfigError
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


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device = 'cuda' but PyTorch sees no CUDA device")
    return torch.device(setting)


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
        if on_cuda and not torch.cuda.is_bf16_supported():
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
        compute = torch.bfloat16 if not on_cuda or torch.cuda.is_bf16_supported() else torch.float16
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
