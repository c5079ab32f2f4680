"""The calibration loss, one home for scoring and statistics: what a batch costs the model."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from fxprune.errors import ScoringError
from fxprune.util.hf import with_labels
from fxprune.util.modules import call
from fxprune.util.outputs import tensor_leaves

Batch = Any  # dict of tensors, tuple/list of positional args, or a single tensor
LossFn = Callable[[Any, Batch], torch.Tensor]

__all__ = ["Batch", "LossFn", "default_loss", "model_loss", "count_tokens"]


def default_loss(output: Any, batch: Batch = None) -> torch.Tensor:
    """Sum of squares of every floating-point tensor in the output.

    Used when there are no labels and no ``loss_fn``: its gradient measures how much each weight
    contributes to the *energy* of the output, which is a data-only proxy for "removing this
    changes the output a lot".  Supply ``loss_fn`` for a task loss.
    """
    leaves = tensor_leaves(output, floating=True)
    if not leaves:
        raise ScoringError("model output has no floating-point tensors to build a loss from; pass loss_fn.")
    return sum(t.float().pow(2).sum() for t in leaves)


def model_loss(model: nn.Module, batch: Batch, loss_fn: LossFn | None = None) -> torch.Tensor:
    """Loss of one batch: ``loss_fn`` if given, else the HF ``labels`` loss, else :func:`default_loss`."""
    if loss_fn is not None:
        return loss_fn(call(model, batch), batch)
    labelled = with_labels(model, batch)
    if labelled is not None:
        out = call(model, labelled)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is not None:
            return loss
        return default_loss(out, batch)
    return default_loss(call(model, batch), batch)


def count_tokens(batch: Batch) -> int:
    """Tokens (or rows, for float feature inputs) in a batch."""
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return int(ids.numel())
        batch = list(batch.values())
    if isinstance(batch, torch.Tensor):  # token ids: every id is a token; features: rows
        if not batch.dim():
            return 1
        return int(batch.numel()) if not batch.is_floating_point() else int(batch.shape[0])
    for v in batch if isinstance(batch, (tuple, list)) else ():
        if isinstance(v, torch.Tensor):
            return count_tokens(v)
    return 0
