"""Flattening model outputs: tensors, tuples, dicts and HF ``ModelOutput`` objects."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree


def _flat(out: Any) -> list[tuple[tuple, Any]]:
    if hasattr(out, "to_tuple") and not isinstance(out, torch.Tensor):
        try:
            return pytree.tree_leaves_with_path(out)
        except Exception:  # noqa: BLE001 - an unregistered container: its tuple view
            out = out.to_tuple()
    try:
        return pytree.tree_leaves_with_path(out)
    except Exception:  # noqa: BLE001 - unregistered container: its visible items
        items = list(out) if isinstance(out, (list, tuple)) else [out]
        return [((pytree.SequenceKey(i),), v) for i, v in enumerate(items)]


def tensor_leaves(out: Any, *, floating: bool = False) -> list[torch.Tensor]:
    """Every tensor in ``out``, in pytree order (only floating-point ones with ``floating``)."""
    if isinstance(out, torch.Tensor):
        leaves = [out]
    else:
        leaves = [v for _, v in _flat(out) if isinstance(v, torch.Tensor)]
    return [t for t in leaves if t.is_floating_point()] if floating else leaves


def _leaf_name(path: tuple) -> str:
    parts = []
    for entry in path:
        if isinstance(entry, pytree.MappingKey):
            parts.append(str(entry.key))
        elif isinstance(entry, pytree.GetAttrKey):
            parts.append(str(entry.name))
        elif isinstance(entry, pytree.SequenceKey):
            parts.append(str(entry.idx))
        else:
            parts.append(str(entry))
    return ".".join(parts)


def named_tensor_leaves(out: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Readable names (``logits``, ``output_0``, ``hidden.1``) and the tensors of ``out``."""
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    names, tensors = [], []
    for path, value in _flat(out):
        if isinstance(value, torch.Tensor):
            name = _leaf_name(path)
            names.append(f"output_{name}" if name.isdigit() or not name else name)
            tensors.append(value)
    return names, tensors
