"""Builder of a tiny Kosmos-2 (grounded captioning) with a locally counted XLM-R tokenizer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from core.tiny.text import BASIC_CHARS, widen, word_counts

# Kosmos2Processor's default, and the real model's: image features fill 64 token places.
LATENT_QUERY_NUM = 64


def xlm_roberta_tokenizer() -> Any:
    """A Unigram vocabulary in XLM-R's layout: <s>=0, <pad>=1, </s>=2, <unk>=3.

    Kosmos2Processor writes its image placeholders as the ids right after <unk>
    (``unk_token_id + 1`` onwards, one per latent query), so those must be ordinary pieces;
    <mask> therefore goes last, where XLM-R has it.
    """
    from transformers import XLMRobertaTokenizer

    # Counted rather than trained: UnigramTrainer's vocabulary differs from run to run.
    counts = word_counts()
    total = sum(counts.values())
    chars = sorted({*BASIC_CHARS, *(char for word in counts for char in word)})
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(f"\u2581{word}", math.log(counts[word] / total)) for word in words]
    vocab += [(char, -12.0) for char in chars]
    vocab += [("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab)


def build_kosmos2(folder: Path) -> None:
    from transformers import (
        CLIPImageProcessor,
        Kosmos2Config,
        Kosmos2ForConditionalGeneration,
        Kosmos2Processor,
    )

    tokenizer = xlm_roberta_tokenizer()
    # The processor adds the grounding tags (<grounding>, <phrase>, <object>, ...) and the
    # 1024 <patch_index_*> tokens; post_process_generation assumes the real 32x32 grid.
    processor = Kosmos2Processor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        num_patch_index_tokens=1024,
    )
    tokenizer = processor.tokenizer
    config = Kosmos2Config(
        text_config={
            "vocab_size": len(tokenizer),
            "embed_dim": 32,
            "layers": 2,
            "attention_heads": 4,
            "ffn_dim": 37,
            # 2 + 64 image places + the prompt + 128 new tokens, with room to spare.
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        latent_query_num=LATENT_QUERY_NUM,
    )
    widen(Kosmos2ForConditionalGeneration(config)).save_pretrained(folder)
    processor.save_pretrained(folder)
