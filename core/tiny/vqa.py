"""Builders of the BLIP visual-question-answering models (tiny, and real-size random)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.tiny.text import blip_tokenizer

TINY_VQA_INIT_STD = 0.2


def _blip_vqa_config(tokenizer: Any, vision: dict[str, Any], text: dict[str, Any]) -> Any:
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=vision,
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            # The question encoder and the answer decoder cross-attend to the vision output.
            "encoder_hidden_size": vision.get("hidden_size", 768),
            # Answers start from [DEC] and end at [SEP], as in Salesforce/blip-vqa-base.
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )


def build_blip_vqa(folder: Path) -> None:
    import torch
    from transformers import BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer()
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    config = _blip_vqa_config(tokenizer, vision, text)
    model = BlipForQuestionAnswering(config)
    # At widen()'s 0.3 the answer decoder saturates and the answer ignores the question;
    # 0.2 still makes the image matter and lets the question matter too.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, TINY_VQA_INIT_STD)
    model.eval().save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def blip_vqa_base_parts() -> tuple[Any, Any]:
    """Salesforce/blip-vqa-base's shapes: ViT-B/16 at 384 px, BERT-base question encoder and
    answer decoder (361 M distinct parameters; 385 M stored, the LM head being tied)."""
    from transformers import BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer(size=30522)  # + [DEC] and [ENC] = 30524, as in the real model
    # BlipConfig's defaults are the base model's, except the text head count.
    config = _blip_vqa_config(tokenizer, {}, {"num_attention_heads": 12})
    return config, BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)


def build_blip_vqa_base(folder: Path) -> None:
    from transformers import BlipForQuestionAnswering

    config, processor = blip_vqa_base_parts()
    BlipForQuestionAnswering(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
