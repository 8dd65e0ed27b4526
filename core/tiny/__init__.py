"""Small random-weight models of the real architectures, built locally for tests and benchmarks.

A model name starting with ``tiny/`` or ``random/`` is built on first use into the model
cache and then loaded through the same ``from_pretrained`` path as a hub id, so tests run
the production code without a download:

| name                | architecture                                   | used by   |
|---------------------|------------------------------------------------|-----------|
| ``tiny/blip2-opt``  | ``Blip2ForConditionalGeneration`` (OPT text)   | caption   |
| ``tiny/blip-caption`` | ``BlipForConditionalGeneration``             | caption   |
| ``tiny/git``        | ``GitForCausalLM``                             | caption   |
| ``tiny/vit-gpt2``   | ``VisionEncoderDecoderModel`` (ViT + GPT-2)    | caption   |
| ``tiny/t5-tags``    | ``T5ForConditionalGeneration``                 | tags      |
| ``random/blip-base``| BLIP base captioner at full size (~224 M)      | benchmark |
| ``tiny/kosmos2``    | ``Kosmos2ForConditionalGeneration``            | caption   |
| ``tiny/blip-vqa``   | ``BlipForQuestionAnswering``                   | vqa       |
| ``random/blip-vqa-base`` | BLIP VQA base at full size (~385 M)       | benchmark |
| ``tiny/clip``       | ``CLIPModel``                                  | mood      |
| ``tiny/llama-chat`` | ``LlamaForCausalLM`` with a Llama-2 chat template | write  |
| ``tiny/llama-chat-wide`` | the same, 64 wide (bitsandbytes 4-bit on a CPU) | write |
| ``tiny/llama-lora`` | a peft LoRA adapter for ``tiny/llama-chat``    | write     |
| ``tiny/stable-diffusion`` | SD UNet, VAE and CLIP text encoder, 64 px | reimagine |
| ``tiny/stable-diffusion-checked`` | the same with a safety checker   | reimagine |
| ``random/sd15``     | SD 1.5 at full size (UNet 860 M)               | benchmark |

Each builder lives in the submodule named in ``_BUILDERS`` and is imported only when its
model is first built.

Tokenizers come from a few sentences in milliseconds: byte-level BPE for OPT and GPT-2 is
trained with the ``tokenizers`` library; the WordPiece (BERT) and Unigram (T5) vocabularies
are counted from the same sentences. All are wrapped in the real tokenizer classes. Builds
use a fixed seed and are byte-for-byte reproducible. Output text is gibberish; the shapes,
special tokens and code paths are the real ones.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from core.errors import ConfigError

logger = logging.getLogger(__name__)

# Part of the folder name: bump it whenever a builder changes so stale builds are not reused.
_VERSION = 1
_SEED = 1234

# name -> "module:function" building it into a folder.
_BUILDERS: dict[str, str] = {
    "tiny/blip2-opt": "core.tiny.captioners:build_blip2_opt",
    "tiny/blip-caption": "core.tiny.captioners:build_blip_caption",
    "tiny/git": "core.tiny.captioners:build_git",
    "tiny/vit-gpt2": "core.tiny.captioners:build_vit_gpt2",
    "tiny/t5-tags": "core.tiny.captioners:build_t5_tags",
    "random/blip-base": "core.tiny.captioners:build_blip_base",
    "tiny/kosmos2": "core.tiny.kosmos:build_kosmos2",
    "tiny/blip-vqa": "core.tiny.vqa:build_blip_vqa",
    "random/blip-vqa-base": "core.tiny.vqa:build_blip_vqa_base",
    "tiny/clip": "core.tiny.clip:build_clip",
    "tiny/llama-chat": "core.tiny.llama:build_llama_chat",
    "tiny/llama-chat-wide": "core.tiny.llama:build_llama_chat_wide",
    "tiny/llama-lora": "core.tiny.llama:build_llama_lora",
    "tiny/stable-diffusion": "core.tiny.diffusion:build_stable_diffusion",
    "tiny/stable-diffusion-checked": "core.tiny.diffusion:build_stable_diffusion_checked",
    "random/sd15": "core.tiny.diffusion:build_sd15_random",
}

_build_lock = threading.Lock()


def built_folder(model: str, cache_dir: Path) -> Path:
    """Where ``resolve_model`` builds a ``tiny/`` or ``random/`` model (it may not be yet)."""
    return cache_dir / f"{model.replace('/', '--')}-v{_VERSION}"


def resolve_model(model: str, cache_dir: Path) -> str:
    """Return a folder or hub id for ``from_pretrained``; build ``tiny/`` and ``random/`` once."""
    if not model.startswith(("tiny/", "random/")):
        return model
    builder_name = _BUILDERS.get(model)
    if builder_name is None:
        raise ConfigError(
            f"unknown local model {model!r}; choose one of {', '.join(sorted(_BUILDERS))}"
        )
    target = built_folder(model, cache_dir)
    with _build_lock:
        if not target.is_dir():
            module, _, function = builder_name.partition(":")
            _build_into(getattr(importlib.import_module(module), function), target)
    return str(target)


def _build_into(builder: Callable[[Path], None], target: Path) -> None:
    # Build next to the target and rename it in, so a crash never leaves a half-built folder.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        logger.info("building %s", target.name)
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            builder(staging)
        try:
            staging.replace(target)
        except OSError:
            # Another process renamed its build in first; theirs is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
