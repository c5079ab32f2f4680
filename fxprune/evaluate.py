"""Quality measures the CLI and reports use: perplexity for LMs, embedding agreement for encoders."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def _batches_on(model: torch.nn.Module, batches: Iterable[dict]) -> Iterable[dict]:
    device = next(model.parameters()).device
    for b in batches:
        yield {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Token-weighted perplexity of a causal LM on batches of input_ids (labels = inputs)."""
    model.eval()
    total, count = 0.0, 0
    for b in _batches_on(model, batches):
        ids = b["input_ids"]
        out = model(input_ids=ids, attention_mask=b.get("attention_mask"))
        logits = out.logits if hasattr(out, "logits") else out[0]
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = b.get("attention_mask")
        mask = mask[:, 1:].bool() if mask is not None else torch.ones_like(nll, dtype=torch.bool)
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


def sentence_embeddings(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe)."""
    out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    mask = batch.get("attention_mask")
    mask = torch.ones(hidden.shape[:2]) if mask is None else mask
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def embedding_similarity(model: torch.nn.Module, reference: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Mean cosine similarity between the model's and the reference's sentence embeddings."""
    model.eval()
    reference.eval()
    sims = []
    for b in batches:
        sims.append((sentence_embeddings(model, b) * sentence_embeddings(reference, b)).sum(-1))
    return float(torch.cat(sims).mean()) if sims else float("nan")


from fxprune.util.hf import is_causal_lm  # noqa: E402,F401 - re-exported for the CLI
