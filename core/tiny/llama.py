"""Builders of the chat LLMs for the ``write`` task: a tiny Llama, a 64-wide one and a LoRA.

The tokenizer is a byte-level BPE trained on the shared corpus and saved as a plain
``PreTrainedTokenizerFast`` with Llama-2's special tokens (``<unk>``=0, ``<s>``=1,
``</s>``=2) and Llama-2's chat template, so ``AutoTokenizer`` loads exactly these ids back
(``LlamaTokenizer.from_pretrained`` would rebuild a SentencePiece-style pipeline on the same
files and silently give other ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.tiny.text import byte_level_bpe, widen

# Llama-2-chat's template as published with meta-llama/Llama-2-7b-chat-hf: the system
# prompt sits inside the first [INST] between <<SYS>> markers; "[/INST]" is the
# generation prompt, so add_generation_prompt changes nothing.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# The LoRA of the seed project's writer used q/v projections; r and alpha as in SEEDS 9.
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "v_proj")


def llama_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = byte_level_bpe(["<unk>", "<s>", "</s>"])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Llama's tokenizer starts every plain encode with <s>; chat templates write their own.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def llama_config(tokenizer: Any, *, hidden: int, intermediate: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Room for the write task's system prompt, a full data block and the answer.
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )


def _build(folder: Path, *, hidden: int, intermediate: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = llama_tokenizer()
    config = llama_config(tokenizer, hidden=hidden, intermediate=intermediate)
    model = widen(LlamaForCausalLM(config))
    with torch.no_grad():
        # Random weights make </s> as likely as any token, so replies would often end after
        # a token or two. A zero row puts its logit mid-pack, so greedy decoding runs to
        # max_new_tokens and every reply is long enough to stream, cut and cancel.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_llama_chat(folder: Path) -> None:
    """``LlamaForCausalLM`` at hidden 32, intermediate 64, 4 heads, 2 key/value heads."""
    _build(folder, hidden=32, intermediate=64)


def build_llama_chat_wide(folder: Path) -> None:
    """The same at hidden 64, intermediate 128: every Linear is at least 64 wide, which
    bitsandbytes 4-bit needs on a CPU."""
    _build(folder, hidden=64, intermediate=128)


def build_llama_lora(folder: Path) -> None:
    """A peft LoRA adapter for ``tiny/llama-chat`` whose B weights are non-zero.

    peft initialises B to zero, which makes a fresh adapter a no-op; random B weights make
    it change the model's output, as a trained adapter does.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tokenizer = llama_tokenizer()
    base = LlamaForCausalLM(llama_config(tokenizer, hidden=32, intermediate=64))
    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(str(folder))
