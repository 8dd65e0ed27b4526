"""Tokenizers trained or counted locally from a few sentences, and shared build helpers."""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from typing import Any

# At the usual 0.02 a 32-wide random model's logits barely depend on the image, so greedy
# decoding gives every image the same caption; wider weights make the input matter.
TINY_INIT_STD = 0.3

CORPUS = (
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
BASIC_CHARS = string.ascii_letters + string.digits + string.punctuation

# -- tokenizers ------------------------------------------------------------------------------


def byte_level_bpe(
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
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def opt_tokenizer() -> Any:
    from transformers import GPT2Tokenizer

    # OPT's layout: <s>=0, <pad>=1, </s>=2 (also its BOS), <unk>=3.
    vocab, merges = byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def gpt2_tokenizer() -> Any:
    from transformers import GPT2Tokenizer

    vocab, merges = byte_level_bpe(["<|endoftext|>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def word_counts() -> Counter[str]:
    return Counter(word for line in CORPUS for word in re.findall(r"\w+|[^\w\s]", line.lower()))


def bert_vocab(size: int | None) -> dict[str, int]:
    """A WordPiece vocabulary of the corpus's words and characters, in a fixed order.

    With ``size``, BERT's own layout ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103)
    padded with ``[unused*]`` entries, so embedding and LM-head shapes match the real model.
    """
    # Counted rather than trained: WordPieceTrainer's vocabulary differs from run to run,
    # which would make builds irreproducible.
    counts = word_counts()
    chars = sorted({*BASIC_CHARS.lower(), *(char for word in counts for char in word)})
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    learned = [*chars, *(f"##{char}" for char in chars), *words]
    if size is None:
        order = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *learned]
    else:
        order = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        order += learned
        order += [f"[unused{i}]" for i in range(99, 99 + size - len(order))]
    return {token: index for index, token in enumerate(order)}


def blip_tokenizer(size: int | None = None) -> Any:
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=bert_vocab(size))
    # BLIP's captioning decoder starts from [DEC]; [ENC] marks the image-grounded text encoder.
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def t5_tokenizer() -> Any:
    """A Unigram vocabulary: corpus words scored by frequency, characters as the fallback."""
    from transformers import T5Tokenizer

    # Counted rather than trained: UnigramTrainer's vocabulary differs from run to run.
    counts = word_counts()
    total = sum(counts.values())
    chars = sorted({*BASIC_CHARS, *(char for word in counts for char in word)})
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [(f"\u2581{word}", math.log(counts[word] / total)) for word in words]
    vocab += [(char, -12.0) for char in chars]
    return T5Tokenizer(vocab=vocab)


def widen(model: Any) -> Any:
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, TINY_INIT_STD)
    return model.eval()
