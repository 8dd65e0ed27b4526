"""Builders of the captioning and tagging models (BLIP-2, BLIP, GIT, ViT-GPT2, T5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.tiny.text import (
    bert_vocab,
    blip_tokenizer,
    gpt2_tokenizer,
    opt_tokenizer,
    t5_tokenizer,
    widen,
)

_TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def build_blip2_opt(folder: Path) -> None:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    num_query_tokens = 4
    # Without num_query_tokens the processor adds no <image> tokens and a prompted generate
    # silently ignores the image.
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=opt_tokenizer(),
        num_query_tokens=num_query_tokens,
    )
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=_TINY_VISION,
        qformer_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "encoder_hidden_size": 32,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 37,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    widen(Blip2ForConditionalGeneration(config)).save_pretrained(folder)
    processor.save_pretrained(folder)


def _blip_config(tokenizer: Any, vision: dict[str, Any], text: dict[str, Any]) -> Any:
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=vision,
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "encoder_hidden_size": vision.get("hidden_size", 768),
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )


def build_blip_caption(folder: Path) -> None:
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer()
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    config = _blip_config(tokenizer, _TINY_VISION, text)
    widen(BlipForConditionalGeneration(config)).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _blip_base_parts() -> tuple[Any, Any]:
    """Salesforce/blip-image-captioning-base's shapes: ViT-B/16 at 384 px, BERT-base decoder."""
    from transformers import BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer(size=30522)  # + [DEC] and [ENC] = 30524, as in the real model
    # BlipConfig's defaults are the base model's, except the decoder's head count.
    config = _blip_config(tokenizer, {}, {"num_attention_heads": 12})
    return config, BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)


def build_blip_base(folder: Path) -> None:
    from transformers import BlipForConditionalGeneration

    config, processor = _blip_base_parts()
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)


def build_git(folder: Path) -> None:
    from transformers import (
        BertTokenizer,
        CLIPImageProcessor,
        GitConfig,
        GitForCausalLM,
        GitProcessor,
    )

    tokenizer = BertTokenizer(vocab=bert_vocab(None))
    config = GitConfig(
        vision_config=_TINY_VISION,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    widen(GitForCausalLM(config)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def build_vit_gpt2(folder: Path) -> None:
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = gpt2_tokenizer()
    encoder = ViTConfig(**_TINY_VISION)
    decoder = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    # As in nlpconnect/vit-gpt2-image-captioning: GPT-2 has no pad token, so EOS doubles as it.
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.eos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    widen(VisionEncoderDecoderModel(config=config)).save_pretrained(folder)
    # The real model ships no processor class, only these two: loaders must cope with that.
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_t5_tags(folder: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    widen(T5ForConditionalGeneration(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
