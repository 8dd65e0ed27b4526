"""Builder of a tiny CLIP (zero-shot mood and colour labels) with a character-level tokenizer."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from core.tiny.text import widen


def clip_tokenizer() -> Any:
    """CLIP's BPE with no merges: every word is spelled in characters, the last one ending
    in ``</w>`` as CLIP marks word ends. Prompts never need ``<|endoftext|>`` as unknown."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*chars, *(f"{char}</w>" for char in chars)]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            # The text embedding is read at the first <|endoftext|>, found by this id.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    widen(CLIPModel(config)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
