"""Precision plans: what each setting means per device, and the CPU bitsandbytes 8-bit path."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from core.settings import BatchSettings, CaptionSettings, EngineSettings
from core.tasks import _runtime
from core.tasks.caption import CaptionTask
from core.tiny import resolve_model
from core.types import CaptionRequest
from tests import imagekit

CPU = torch.device("cpu")


def test_cpu_plans() -> None:
    assert _runtime.plan("t", "none", CPU).dtype == torch.float32
    assert _runtime.plan("t", "bf16", CPU).dtype == torch.bfloat16
    dynamic = _runtime.plan("t", "int8", CPU)
    assert dynamic.dynamic_int8 and dynamic.quantization_config is None
    bnb8 = _runtime.plan("t", "int8", CPU, cpu_int8="bitsandbytes")
    assert not bnb8.dynamic_int8 and bnb8.quantization_config.load_in_8bit
    nf4 = _runtime.plan("t", "nf4", CPU)
    assert nf4.quantization_config.load_in_4bit
    assert nf4.quantization_config.bnb_4bit_quant_type == "nf4"
    assert _runtime.plan("t", "auto", CPU).precision in {"bf16", "int8"}


def test_a_bad_precision_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"caption\.precision must be one of"):
        _runtime.plan("caption", "fp8", CPU)  # type: ignore[arg-type]


def test_cuda_is_refused_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"engine.device = .cuda., but no NVIDIA driver"):
        _runtime.resolve_device("cuda")


def test_state_bytes_counts_tied_weights_once() -> None:
    embedding = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = embedding.weight  # tied, as LM heads are
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    assert _runtime.state_bytes(model) == 100 * 16 * 4


def test_bitsandbytes_8bit_on_a_cpu_captions(model_cache: Path, single_torch_thread: None) -> None:
    engine = EngineSettings(device="cpu", model_cache=model_cache, cpu_int8="bitsandbytes")
    settings = CaptionSettings(
        model="tiny/blip2-opt", precision="int8", batching=BatchSettings(batch_size=1)
    )
    task = CaptionTask(settings, engine, resolve_model=resolve_model)
    task.load()
    try:
        import bitsandbytes as bnb

        linears = [m for m in task._model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        assert linears, "no Linear layer was quantized to 8 bits"
        fp32 = CaptionTask(
            CaptionSettings(model="tiny/blip2-opt", precision="none"),
            EngineSettings(device="cpu", model_cache=model_cache),
            resolve_model=resolve_model,
        )
        fp32.load()
        assert task.memory_bytes() < fp32.memory_bytes()
        fp32.unload()
        prepared = task.preprocess(CaptionRequest(imagekit.encode(imagekit.noise())))
        [raw] = task.forward([prepared])
        assert raw.token_ids
    finally:
        task.unload()


def test_a_pinned_thread_keeps_its_count_when_another_thread_pins_later() -> None:
    """torch applies the count last set anywhere in the process to a thread the first time
    it computes: the engine's forward thread, pinned to every core at start, would run on
    one thread once the CPU pool's threads pinned themselves to one."""
    counts: dict[str, int] = {}
    forward_pinned, pool_pinned = threading.Event(), threading.Event()

    def forward_thread() -> None:
        _runtime.pin_threads(3)
        forward_pinned.set()
        pool_pinned.wait(10)
        (torch.ones(1 << 20) * 2).sum()  # its first computation
        counts["forward"] = torch.get_num_threads()

    def pool_thread() -> None:
        forward_pinned.wait(10)
        _runtime.pin_threads(1)
        (torch.ones(1 << 20) * 2).sum()
        counts["pool"] = torch.get_num_threads()
        pool_pinned.set()

    threads = [threading.Thread(target=forward_thread), threading.Thread(target=pool_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert counts == {"forward": 3, "pool": 1}
