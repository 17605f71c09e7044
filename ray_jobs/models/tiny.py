"""Tiny, randomly initialised models for tests: built from a config and a locally trained tokenizer, so they need no
download, are identical for a given seed, and are big enough for vLLM's CPU build (attention head size 32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Byte-level BPE trained on this fixed text: the vocabulary is the same on every machine, and the byte alphabet lets
# any string encode, so the tiny model accepts whatever prompts a test throws at it.
_CORPUS = """
The film was a warm and gentle story about a family who opened a small bakery by the sea. The acting was good,
the music was lovely, and the ending made me smile. I would recommend it to anyone who likes quiet, kind movies.
This book is long and slow at first, but the second half is wonderful. The characters feel real and the writing is
clear. A great read for a rainy weekend. The product arrived on time and works as described: the battery lasts all
day, the screen is bright, and the price is fair. The hotel was clean and the staff were friendly and helpful.
Our room had a view of the old town and the breakfast was excellent. The restaurant serves fresh fish, simple
salads and the best soup in the city. Service was slow but the food was worth the wait. I did not like the plot;
it was confusing and the dialogue was flat. The camera is terrible in low light and the case broke after a week.
Write a short review of a film you enjoyed. Write a short review of a book, a product or a place you visited.
Please answer the question briefly and politely. What is the capital of France? Paris is the capital of France.
How many days are in a week? There are seven days in a week. Summarize the text in one sentence. The story is
about friendship, courage and hope. Thank you for your help! You are welcome. Hello, how are you today? I am well.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ; : ! ? ' " ( ) - and new lines.
"""
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 768


def build_llama_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens and chat template; deterministic (fixed corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHATML_TEMPLATE
    )


# head_dim 32: vLLM's CPU attention needs head sizes >= 32.
TINY_LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
)


def build_llama(out_dir: Path, seed: int = 0, **shape: Any) -> None:
    """A randomly initialised Llama of `shape` (LlamaConfig fields) with the local test tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_llama_tokenizer()
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **shape},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tiny_llama(out_dir: Path, seed: int = 0) -> None:
    build_llama(out_dir, seed, **TINY_LLAMA_SHAPE)


def build_tiny_bert(out_dir: Path, seed: int = 0) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ray_jobs.models.builtins import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
