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

Tokenizers come from a few sentences in milliseconds: byte-level BPE for OPT and GPT-2 is
trained with the ``tokenizers`` library; the WordPiece (BERT) and Unigram (T5) vocabularies
are counted from the same sentences. All are wrapped in the real tokenizer classes. Builds
use a fixed seed and are byte-for-byte reproducible. Output text is gibberish; the shapes,
special tokens and code paths are the real ones.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import string
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import ConfigError

logger = logging.getLogger(__name__)

# Part of the folder name: bump it whenever a builder changes so stale builds are not reused.
_VERSION = 1
_SEED = 1234
# At the usual 0.02 a 32-wide random model's logits barely depend on the image, so greedy
# decoding gives every image the same caption; wider weights make the input matter.
_TINY_INIT_STD = 0.3

_CORPUS = (
    "a photography of a cat sitting on a red couch",
    "a dog running on the beach at sunset",
    "two people riding bicycles down a busy street",
    "a bowl of fruit on a wooden table",
    "street art painted on a brick wall in the city",
    "a man holding an umbrella in the rain",
    "a woman smiling at the camera with a cup of coffee",
    "a plate of food with rice, vegetables and chicken",
    "a train station at night with bright lights",
    "a group of children playing football in the park",
    "a polar bear swimming in cold blue water",
    "a mountain lake surrounded by green trees and snow",
    "an old car parked in front of a yellow house",
    "a close up of a flower with pink petals",
    "a sign that says open on a shop window",
    "photography, travel, nature, food, art, city, animals, people, sports, music",
    "machine learning, python, programming, data science, deep learning",
)

# Every word can be spelled, so test inputs outside the corpus rarely become <unk>.
_BASIC_CHARS = string.ascii_letters + string.digits + string.punctuation

_build_lock = threading.Lock()


def resolve_model(model: str, cache_dir: Path) -> str:
    """Return a folder or hub id for ``from_pretrained``; build ``tiny/`` and ``random/`` once."""
    if not model.startswith(("tiny/", "random/")):
        return model
    builder = _BUILDERS.get(model)
    if builder is None:
        raise ConfigError(
            f"unknown local model {model!r}; choose one of {', '.join(sorted(_BUILDERS))}"
        )
    target = cache_dir / f"{model.replace('/', '--')}-v{_VERSION}"
    with _build_lock:
        if not target.is_dir():
            _build_into(builder, target)
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


# -- tokenizers ------------------------------------------------------------------------------


def _byte_level_bpe(
    specials: list[str], vocab_size: int = 320
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def _opt_tokenizer() -> Any:
    from transformers import GPT2Tokenizer

    # OPT's layout: <s>=0, <pad>=1, </s>=2 (also its BOS), <unk>=3.
    vocab, merges = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def _gpt2_tokenizer() -> Any:
    from transformers import GPT2Tokenizer

    vocab, merges = _byte_level_bpe(["<|endoftext|>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def _word_counts() -> Counter[str]:
    return Counter(word for line in _CORPUS for word in re.findall(r"\w+|[^\w\s]", line.lower()))


def _bert_vocab(size: int | None) -> dict[str, int]:
    """A WordPiece vocabulary of the corpus's words and characters, in a fixed order.

    With ``size``, BERT's own layout ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103)
    padded with ``[unused*]`` entries, so embedding and LM-head shapes match the real model.
    """
    # Counted rather than trained: WordPieceTrainer's vocabulary differs from run to run,
    # which would make builds irreproducible.
    counts = _word_counts()
    chars = sorted({*_BASIC_CHARS.lower(), *(char for word in counts for char in word)})
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    learned = [*chars, *(f"##{char}" for char in chars), *words]
    if size is None:
        order = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *learned]
    else:
        order = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        order += learned
        order += [f"[unused{i}]" for i in range(99, 99 + size - len(order))]
    return {token: index for index, token in enumerate(order)}


def _blip_tokenizer(size: int | None = None) -> Any:
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=_bert_vocab(size))
    # BLIP's captioning decoder starts from [DEC]; [ENC] marks the image-grounded text encoder.
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _t5_tokenizer() -> Any:
    """A Unigram vocabulary: corpus words scored by frequency, characters as the fallback."""
    from transformers import T5Tokenizer

    # Counted rather than trained: UnigramTrainer's vocabulary differs from run to run.
    counts = _word_counts()
    total = sum(counts.values())
    chars = sorted({*_BASIC_CHARS, *(char for word in counts for char in word)})
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(f"\u2581{word}", math.log(counts[word] / total)) for word in words]
    vocab += [(char, -12.0) for char in chars]
    return T5Tokenizer(vocab=vocab)


# -- builders --------------------------------------------------------------------------------


def _widen(model: Any) -> Any:
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, _TINY_INIT_STD)
    return model.eval()


_TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def _build_blip2_opt(folder: Path) -> None:
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
        tokenizer=_opt_tokenizer(),
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
    _widen(Blip2ForConditionalGeneration(config)).save_pretrained(folder)
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


def _build_blip_caption(folder: Path) -> None:
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _blip_tokenizer()
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    config = _blip_config(tokenizer, _TINY_VISION, text)
    _widen(BlipForConditionalGeneration(config)).save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _blip_base_parts() -> tuple[Any, Any]:
    """Salesforce/blip-image-captioning-base's shapes: ViT-B/16 at 384 px, BERT-base decoder."""
    from transformers import BlipImageProcessor, BlipProcessor

    tokenizer = _blip_tokenizer(size=30522)  # + [DEC] and [ENC] = 30524, as in the real model
    # BlipConfig's defaults are the base model's, except the decoder's head count.
    config = _blip_config(tokenizer, {}, {"num_attention_heads": 12})
    return config, BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)


def _build_blip_base(folder: Path) -> None:
    from transformers import BlipForConditionalGeneration

    config, processor = _blip_base_parts()
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)


def _build_git(folder: Path) -> None:
    from transformers import (
        BertTokenizer,
        CLIPImageProcessor,
        GitConfig,
        GitForCausalLM,
        GitProcessor,
    )

    tokenizer = BertTokenizer(vocab=_bert_vocab(None))
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
    _widen(GitForCausalLM(config)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _build_vit_gpt2(folder: Path) -> None:
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = _gpt2_tokenizer()
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
    _widen(VisionEncoderDecoderModel(config=config)).save_pretrained(folder)
    # The real model ships no processor class, only these two: loaders must cope with that.
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_t5_tags(folder: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _t5_tokenizer()
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
    _widen(T5ForConditionalGeneration(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny/blip2-opt": _build_blip2_opt,
    "tiny/blip-caption": _build_blip_caption,
    "tiny/git": _build_git,
    "tiny/vit-gpt2": _build_vit_gpt2,
    "tiny/t5-tags": _build_t5_tags,
    "random/blip-base": _build_blip_base,
}
