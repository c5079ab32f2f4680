"""Calibration data: turn text (or ready batches) into a few fixed-length token windows.

Data-driven scoring needs only a small sample of representative text (LLM-Pruner and FLAP use
~128 windows of 128-2048 tokens).  :func:`load_calibration` accepts whatever the user has at hand
and always returns the same thing: a list of ``{"input_ids", "attention_mask"}`` batches of
shape ``[batch, seq_len]``, so the scoring pass never has to care where text came from.

Text is concatenated document by document (separated by the tokenizer's EOS token when it has
one) and cut into ``seq_len`` windows chosen with ``seed``; documents are visited in a seeded
order so a large corpus is only tokenized as far as needed.  What a file holds is read by
:mod:`fxprune.util.text`, with one meaning everywhere: a ``.txt`` file is **one document**; a
``.json``/``.jsonl``/``.parquet``/``.csv`` file holds records with a text field.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from fxprune.errors import DataError
from fxprune.util import text as textdata
from fxprune.util.text import TEXT_FIELDS

__all__ = ["load_calibration", "TEXT_FIELDS"]

Batch = dict[str, torch.Tensor]


def load_calibration(
    source: Any,
    *,
    tokenizer: Any = None,
    n_samples: int = 128,
    seq_len: int = 128,
    seed: int = 0,
    batch_size: int = 1,
    text_field: str | None = None,
) -> list[Any]:
    """Build calibration batches from ``source``.

    Args:
        source: one of
            * a list/tuple of strings (needs ``tokenizer``);
            * a ``datasets.Dataset`` (or ``DatasetDict``: its ``train`` split, else the first);
            * a path to a local ``.txt`` file (one document) or a ``.json``, ``.jsonl``,
              ``.parquet`` or ``.csv`` file of records (read with ``datasets``);
            * an iterable of ready batches (dicts with ``input_ids``, tuples or tensors): passed
              through unchanged except that the total number of rows is cut to ``n_samples``.
        tokenizer: a HF tokenizer (anything callable like ``tokenizer(texts)["input_ids"]``).
        n_samples: number of windows (rows) to return.
        seq_len: tokens per window.
        seed: chooses the document order and the windows.
        batch_size: windows per batch (the last batch may be smaller).
        text_field: column holding the text; by default the first of :data:`TEXT_FIELDS`
            present, else the only string column.

    Returns:
        ``[{"input_ids": LongTensor[b, seq_len], "attention_mask": LongTensor[b, seq_len]}, ...]``
        (or the passed-through batches).

    Raises:
        DataError: missing file, unsupported file type, empty data, no text column, missing
            tokenizer, or less text than one window.
    """
    _check_positive(n_samples=n_samples, seq_len=seq_len, batch_size=batch_size)
    if isinstance(source, (str, os.PathLike)) or textdata.is_dataset(source) or (
        isinstance(source, (list, tuple)) and source and all(isinstance(s, str) for s in source)
    ):
        texts = textdata.documents_from(source, text_field, what="calibration file")
    else:
        return _pass_through(source, n_samples)
    if tokenizer is None:
        raise DataError("text calibration data needs a tokenizer (pass tokenizer=...).")
    ids = _token_stream(texts, tokenizer, needed=n_samples * seq_len, seed=seed)
    windows = _sample_windows(ids, n_samples, seq_len, seed)
    return _batch(windows, batch_size)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise DataError(f"{name} must be a positive integer, got {v!r}.")


def _pass_through(source: Any, n_samples: int) -> list[Any]:
    """Ready-made batches: keep them, stopping once ``n_samples`` rows have been taken."""
    if isinstance(source, (Mapping, torch.Tensor)):
        source = [source]
    try:
        it = iter(source)
    except TypeError:
        raise DataError(
            f"unsupported calibration source of type {type(source).__name__}; pass texts, a "
            "datasets.Dataset, a file path, or an iterable of batches."
        ) from None
    out: list[Any] = []
    taken = 0
    for batch in it:
        if isinstance(batch, str):
            raise DataError("a mix of strings and other items is not a valid calibration source.")
        rows = _rows(batch)
        if rows is None:
            raise DataError(
                f"calibration batch {len(out)} has no tensors ({type(batch).__name__}); expected "
                "a dict with 'input_ids', a tuple of tensors or a tensor."
            )
        keep = min(rows, n_samples - taken)
        out.append(batch if keep == rows else _slice_rows(batch, keep))
        taken += keep
        if taken >= n_samples:
            break
    if not out:
        raise DataError("the calibration data is empty (no batches).")
    return out


def _rows(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    return None


def _slice_rows(batch: Any, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    return type(batch)(v[:n] if isinstance(v, torch.Tensor) and v.dim() else v for v in batch)


# -- tokenization and windows ----------------------------------------------------------------


def _token_stream(texts: Sequence[str], tokenizer: Any, *, needed: int, seed: int) -> np.ndarray:
    """Concatenate the tokens of documents in a seeded order until there is enough for sampling.

    Twice the needed tokens are gathered (when available) so that windows are drawn from a
    wider sample than exactly ``n_samples * seq_len`` consecutive tokens.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError("the calibration data is empty (no non-blank text).")
    order = np.random.default_rng(seed).permutation(len(texts))
    sep = getattr(tokenizer, "eos_token_id", None)
    parts: list[np.ndarray] = []
    total = 0
    for chunk in _chunks_by_size(order, texts):
        encoded = [_encode(texts[i], tokenizer) for i in chunk] if len(chunk) == 1 else \
            tokenizer([texts[i] for i in chunk], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            if sep is not None and parts:
                parts.append(np.asarray([sep], dtype=np.int64))
            parts.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
        if total >= 2 * needed:
            break
    if not parts:
        raise DataError("the calibration text produced no tokens.")
    return np.concatenate(parts)


_PIECE = 1 << 16  # characters per piece of a long document
_CALL = 1 << 20  # characters per tokenizer call: a Rust call cannot be interrupted, so keep each short


def _chunks_by_size(order: Sequence[int], texts: Sequence[str], n: int = 64) -> Iterator[list[int]]:
    """Documents in ``order``, in groups of at most ``n`` and about ``_CALL`` characters."""
    group: list[int] = []
    size = 0
    for i in order:
        if group and (len(group) >= n or size + len(texts[i]) > _CALL):
            yield group
            group, size = [], 0
        group.append(int(i))
        size += len(texts[i])
    if group:
        yield group


def _encode(text: str, tokenizer: Any) -> list[int]:
    """Token ids of one (possibly very long) document, tokenised in pieces cut at line breaks."""
    if len(text) <= _PIECE:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    pieces, start = [], 0
    while start < len(text):
        end = text.rfind("\n", start, start + _PIECE) + 1 if start + _PIECE < len(text) else len(text)
        if end <= start:
            end = min(start + _PIECE, len(text))
        pieces.append(text[start:end])
        start = end
    ids: list[int] = []
    step = max(1, _CALL // _PIECE)  # a few pieces per call, so Ctrl-C is seen between calls
    for k in range(0, len(pieces), step):
        for enc in tokenizer(pieces[k:k + step], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
    return ids


def _sample_windows(ids: np.ndarray, n_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """``n_samples`` windows of ``seq_len`` tokens: disjoint when the text allows, else overlapping."""
    if len(ids) < seq_len:
        raise DataError(
            f"too little calibration text: {len(ids)} tokens, need at least seq_len={seq_len} "
            "for one window. Add text or lower seq_len."
        )
    rng = np.random.default_rng([seed, 1])
    n_disjoint = len(ids) // seq_len
    if n_disjoint >= n_samples:
        slack = len(ids) - n_disjoint * seq_len
        offset = int(rng.integers(0, slack + 1))
        starts = offset + seq_len * rng.choice(n_disjoint, size=n_samples, replace=False)
    else:
        warnings.warn(
            f"only {len(ids)} calibration tokens for {n_samples} windows of {seq_len}: windows "
            "overlap.",
            stacklevel=3,
        )
        starts = rng.integers(0, len(ids) - seq_len + 1, size=n_samples)
    return np.stack([ids[s : s + seq_len] for s in starts])


def _batch(windows: np.ndarray, batch_size: int) -> list[Batch]:
    out = []
    for i in range(0, len(windows), batch_size):
        ids = torch.from_numpy(np.ascontiguousarray(windows[i : i + batch_size])).long()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
