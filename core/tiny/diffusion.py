"""Builders of Stable Diffusion checkpoints: tiny ones for tests, a full-size one for benchmarks.

Each is a complete diffusers folder (``model_index.json`` and one subfolder per component)
written with ``save_pretrained``, so ``StableDiffusionPipeline.from_pretrained(folder)`` loads
it exactly as it loads a hub checkpoint.

| builder                          | UNet / VAE / text encoder              | safety checker      |
|----------------------------------|----------------------------------------|---------------------|
| ``build_stable_diffusion``       | tiny; 64x64 images                     | none                |
| ``build_stable_diffusion_checked`` | tiny; 64x64 images                   | tiny, flags nothing |
| ``build_sd15_random``            | SD 1.5 sizes (~1.07 G params), 512x512 | none                |

The CLIP tokenizer is character-level: every character is a token, the last one of a word
carries CLIP's ``</w>`` suffix. Prompts therefore cost one token per character, so a long
prompt is truncated at 77 tokens sooner than with the real vocabulary; shapes, special
tokens and code paths are the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.tiny.text import BASIC_CHARS

# CLIP's context length; the pipeline pads every prompt to the tokenizer's model_max_length.
MAX_PROMPT_TOKENS = 77
# SD 1.5's CLIP ViT-L/14 vocabulary size; the character-level tokenizer uses its first ids.
SD15_VOCAB_SIZE = 49408


def build_stable_diffusion(folder: Path) -> None:
    """Tiny SD without a safety checker (the ``tiny`` profile sets ``safety_checker = false``)."""
    _tiny_pipeline(checked=False).save_pretrained(folder)


def build_stable_diffusion_checked(folder: Path) -> None:
    """Tiny SD with a real ``StableDiffusionSafetyChecker`` at tiny size.

    Its concept thresholds are the class defaults (1.0), which a cosine similarity never
    exceeds, so it flags nothing; a test lowers them to make it flag every image.
    """
    _tiny_pipeline(checked=True).save_pretrained(folder)


def build_sd15_random(folder: Path) -> None:
    """SD 1.5's architecture at full size with random weights, for timing at 512x512.

    Weights are stored in fp16 (about 2.1 GB instead of 4.3 GB); the task casts them to the
    precision it loads with. Takes about a minute and never runs in tests.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    configs = sd15_configs()
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**configs["vae"]),
        text_encoder=CLIPTextModel(configs["text_encoder"]),
        tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**configs["unet"]),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(torch.float16).save_pretrained(folder)


def sd15_configs() -> dict[str, Any]:
    """Configs of SD 1.5's UNet, VAE (kwargs) and CLIP ViT-L/14 text encoder (a config object)."""
    from transformers import CLIPTextConfig

    tokenizer = clip_tokenizer()
    return {
        # UNet2DConditionModel's defaults are SD 1.x's except these two.
        "unet": {"sample_size": 64, "cross_attention_dim": 768},
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "latent_channels": 4,
            "sample_size": 512,
        },
        "text_encoder": CLIPTextConfig(
            vocab_size=SD15_VOCAB_SIZE,
            hidden_size=768,
            intermediate_size=3072,
            projection_dim=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
    }


def clip_tokenizer() -> Any:
    """A character-level ``CLIPTokenizer``: specials, then each character bare and with ``</w>``."""
    from transformers import CLIPTokenizer

    chars = sorted(set(BASIC_CHARS.lower()))
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(f"{char}</w>" for char in chars)]
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[],
        model_max_length=MAX_PROMPT_TOKENS,
    )


def _tiny_pipeline(*, checked: bool) -> Any:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    # Two blocks: scale factor 2, so the UNet's 32x32 latents decode to 64x64 images.
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    safety_checker, feature_extractor = _tiny_safety_checker() if checked else (None, None)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=_scheduler(),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=checked,
    )


def _tiny_safety_checker() -> tuple[Any, Any]:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return StableDiffusionSafetyChecker(config).eval(), extractor


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    # SD 1.x's noise schedule; steps_offset=1 as in current checkpoints (0 makes diffusers
    # warn that the config is outdated).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
