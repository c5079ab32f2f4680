"""Offline text helpers for the calibration/scoring tests: a tokenizer trained in memory.

No hub access is allowed in tests, so instead of ``AutoTokenizer.from_pretrained`` we train a
word-level tokenizer on a few sentences with the ``tokenizers`` library and wrap it in
``PreTrainedTokenizerFast`` so it behaves like any HF tokenizer.
"""

from __future__ import annotations

import functools

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model learns to prune its own channels",
    "calibration text is cut into windows of tokens",
    "every head and every channel gets a score",
    "the planner removes the units that matter least",
    "gradients are folded away as soon as they arrive",
    "memory stays bounded by the weights and one gradient",
    "structured pruning keeps dense matrices dense",
]


def corpus(n_repeats: int = 4) -> list[str]:
    """A few hundred tokens of text made of the training sentences."""
    return [f"{s} {t}" for _ in range(n_repeats) for s, t in zip(SENTENCES, reversed(SENTENCES))]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` (with unk, pad and eos) built without network."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"])
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )


def save_tiny_llama(path, *, hidden: int, intermediate: int, head_dim: int, seed: int = 0) -> None:
    """A 2-layer Llama (4 heads, 2 kv heads) with :func:`tiny_tokenizer`, saved as an HF
    checkpoint directory at ``path``: what the CLI tests prune."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
