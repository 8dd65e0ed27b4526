"""What a first run on a GPU server depends on, checked where the logic runs on a CPU:
why a load failed and what the operator should do, which files a download takes, whether
a card can run this PyTorch, real bf16, the room a quantized model needs, and the gpu
profile refusing to start without a GPU."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import errors

from bot.config import load_settings
from bot.wiring import build_tasks
from core.errors import ConfigError, ModelUnavailable
from core.tasks import _runtime

LLAMA = "meta-llama/Llama-2-7b-chat-hf"


def hub_error(kind: type[errors.HfHubHTTPError], status: int) -> errors.HfHubHTTPError:
    request = httpx2.Request("GET", f"https://huggingface.co/{LLAMA}/resolve/main/config.json")
    return kind("the hub says no", response=httpx2.Response(status, request=request))


def wrapped(cause: BaseException) -> OSError:
    """As transformers raises it: a plain OSError whose cause is the hub's error."""
    try:
        raise OSError("You are trying to access a gated repo.") from cause
    except OSError as error:
        return error


# -- why a load failed ---------------------------------------------------------------------


def test_a_gated_model_says_how_to_get_access_and_is_not_retried() -> None:
    error = _runtime.unavailable("write", LLAMA, wrapped(hub_error(errors.GatedRepoError, 401)))
    assert isinstance(error, ModelUnavailable)
    assert str(error) == (
        "This bot cannot write social captions right now; its operator has been told why."
    )
    assert f"https://huggingface.co/{LLAMA}" in error.cause
    assert "accept its license" in error.cause and "HF_TOKEN" in error.cause
    assert "ungated" in error.cause
    assert error.retry_after_s is None


@pytest.mark.parametrize(
    ("cause", "says", "retry"),
    [
        (hub_error(errors.RepositoryNotFoundError, 404), "check the model name", None),
        (hub_error(errors.HfHubHTTPError, 401), "refused the token in HF_TOKEN", None),
        (errors.LocalEntryNotFoundError("not cached"), "not in the model cache", None),
        (ConfigError("write.model x is not a chat model"), "not a chat model", None),
        (RuntimeError("CUDA error: something odd"), "RuntimeError: CUDA error", 60.0),
    ],
)
def test_each_cause_has_its_own_reason(
    cause: BaseException, says: str, retry: float | None
) -> None:
    # The suite runs with HF_HUB_OFFLINE=1, so a file missing from the cache is offline mode.
    error = _runtime.unavailable("caption", LLAMA, wrapped(cause))
    assert says in error.cause
    assert error.retry_after_s == retry


def test_an_unreachable_hub_is_tried_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    error = _runtime.unavailable("caption", LLAMA, wrapped(httpx2.ConnectError("no route")))
    assert "could not be reached" in error.cause
    assert error.retry_after_s == _runtime.HUB_RETRY_S


def test_a_model_the_cache_lacks_is_refused_in_offline_mode_without_the_network() -> None:
    """The real fetch path: offline (as the suite runs), an uncached hub id is diagnosed."""
    files = _runtime.ModelFiles("write", LLAMA, _runtime.as_given, Path("unused"))
    with pytest.raises(ModelUnavailable) as caught:
        files.folder()
    assert "offline mode is on" in caught.value.cause
    assert "python -m bot prefetch" in caught.value.cause


# -- which files a download takes ----------------------------------------------------------


def test_a_transformers_download_takes_one_set_of_weights() -> None:
    names = [
        "config.json",
        "tokenizer.json",
        "tokenizer.model",
        "chat_template.jinja",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "pytorch_model-00001-of-00002.bin",
        "onnx/model.onnx",
        "original/consolidated.safetensors",
        "README.md",
    ]
    assert _runtime.choose_files(names, layout="transformers") == [
        "chat_template.jinja",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
        "tokenizer.model",
    ]
    older = ["config.json", "pytorch_model.bin"]
    assert _runtime.choose_files(older, layout="transformers") == older


def test_a_diffusers_download_takes_the_fp16_variant_when_asked_and_present() -> None:
    names = [
        "model_index.json",
        "v1-5-pruned.safetensors",  # a 4 GB single-file checkpoint beside the folders
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "scheduler/scheduler_config.json",
    ]
    half = _runtime.choose_files(names, layout="diffusers", variant="fp16")
    assert [n for n in half if n.endswith(".safetensors")] == [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    full = _runtime.choose_files(names, layout="diffusers")
    assert [n for n in full if n.endswith(".safetensors")] == [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert "model_index.json" in full and "scheduler/scheduler_config.json" in full


def test_a_folder_is_used_as_it_is_and_its_variant_seen(tmp_path: Path) -> None:
    assert _runtime.fetch(str(tmp_path)) == str(tmp_path)
    assert not _runtime.has_variant(str(tmp_path), "fp16")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert _runtime.has_variant(str(tmp_path), "fp16")


# -- cards, bf16, memory ---------------------------------------------------------------------

ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1 cu130


@pytest.mark.parametrize(
    ("card", "capability", "runs"),
    [
        ("Tesla T4", (7, 5), True),
        ("NVIDIA A100", (8, 0), True),
        ("NVIDIA L4", (8, 9), True),  # sm_86 code runs on 8.9
        ("NVIDIA H100", (9, 0), True),
        ("NVIDIA RTX PRO 6000", (12, 0), True),
        ("Tesla V100", (7, 0), False),
        ("Tesla P100", (6, 0), False),
        ("GeForce GTX 1080", (6, 1), False),
    ],
)
def test_a_card_this_pytorch_cannot_run_is_named(
    card: str, capability: tuple[int, int], runs: bool
) -> None:
    problem = _runtime.unsupported_gpu(card, capability, ARCHES)
    assert (problem is None) == runs
    if not runs:
        assert problem is not None and card in problem and "Turing" in problem


def test_ptx_runs_on_newer_cards() -> None:
    assert _runtime.unsupported_gpu("future", (13, 0), ["sm_90", "compute_90"]) is None
    assert _runtime.unsupported_gpu("old", (8, 0), ["compute_90"]) is not None


def test_only_real_bf16_counts() -> None:
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100, where it is emulated."""
    assert not _runtime.native_bf16((7, 5))  # T4
    assert not _runtime.native_bf16((7, 0))  # V100
    assert _runtime.native_bf16((8, 0))  # A100
    assert _runtime.native_bf16((12, 0))


def test_the_driver_version_is_read_from_the_kernel_module() -> None:
    text = (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  "
        "Release Build  (dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:35 UTC 2025\n"
    )
    assert _runtime.driver_version(text) == 580
    assert (
        _runtime.driver_version("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01") == 535
    )
    assert _runtime.driver_version("nothing here") is None


def test_the_room_a_quantized_model_needs_comes_from_its_headers(tmp_path: Path) -> None:
    header = {
        "a.weight": {"dtype": "F16", "shape": [4096, 4096], "data_offsets": [0, 0]},
        "b.weight": {"dtype": "F16", "shape": [4096], "data_offsets": [0, 0]},
        "__metadata__": {"format": "pt"},
    }
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    parameters = _runtime.checkpoint_parameters(str(tmp_path))
    assert parameters == 4096 * 4096 + 4096
    cpu = torch.device("cpu")
    int8 = _runtime.Plan("int8", cpu, torch.float16, quantization_config=object())
    nf4 = dataclasses.replace(int8, precision="nf4")
    assert _runtime.quantized_bytes(parameters, nf4) < _runtime.quantized_bytes(parameters, int8)
    # Llama-2-7b in NF4: about 3.9 GB and some room, not the 13.5 GB of its fp16 files.
    assert 3.5 < _runtime.quantized_bytes(6_738_000_000, nf4) / 1024**3 < 5.0
    _runtime.check_room(cpu, str(tmp_path), int8)  # a CPU is never refused here


# -- the gpu profile -------------------------------------------------------------------------


def test_the_gpu_profile_refuses_to_start_without_a_gpu_and_says_why() -> None:
    """On this machine PyTorch sees no CUDA device: the gpu profile, whose models would
    take minutes per request on a CPU and run into the watchdog, stops at start."""
    assert not torch.cuda.is_available()
    settings = load_settings(None, "gpu")
    with pytest.raises(ConfigError) as refused:
        build_tasks(settings, ["caption"])
    message = str(refused.value)
    assert message.startswith("The gpu profile needs an NVIDIA GPU, but ")
    assert "cpu profile" in message
    # Naming the CPU does not make the gpu profile fit it either.
    on_cpu = dataclasses.replace(
        settings, engine=dataclasses.replace(settings.engine, device="cpu")
    )
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        build_tasks(on_cpu, ["caption"])


def test_asking_for_a_gpu_that_is_missing_names_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"engine.device = 'cuda:1', but "):
        _runtime.resolve_device("cuda:1")
    assert _runtime.resolve_device("auto").type == "cpu"
