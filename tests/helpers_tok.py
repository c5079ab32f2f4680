"""An offline tokenizer for tests: a WordLevel model trained in memory on a few lines.

Tests must not reach a model hub, and a word-level vocabulary keeps the LM tiny (the vocab is
the few dozen words of the corpus), which is what makes loss curves move within a few steps.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]

DEFAULT_LINES = [
    "the cat sat on the mat .",
    "the dog sat on the log .",
    "a bird flew over the house .",
    "the quick brown fox jumps over the lazy dog .",
    "below is an instruction that describes a task , paired with an input that provides further context .",
    "write a response that appropriately completes the request .",
    "### instruction : input : response :",
    "add two numbers say hello repeat the word one two three four five",
]


def make_tokenizer(lines: Sequence[str] = DEFAULT_LINES) -> PreTrainedTokenizerFast:
    """A fast tokenizer with [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3 and the words of ``lines``."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(list(lines), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
    )
