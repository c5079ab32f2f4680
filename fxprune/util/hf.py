"""Hugging Face conventions, in one place: Conv1D, labels, ``use_cache``, configs, example inputs."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from fxprune.util.modules import forward_params, on_meta

try:  # GPT-2 style Conv1D: a Linear whose weight is stored [in, out]
    from transformers.pytorch_utils import Conv1D as HFConv1D
except Exception:  # pragma: no cover - transformers is a hard dependency, but stay importable
    HFConv1D = None  # type: ignore[assignment]


def is_conv1d(module: Any) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (a linear layer with a transposed weight)."""
    return HFConv1D is not None and isinstance(module, HFConv1D)


def is_linear_like(module: Any) -> bool:
    """``nn.Linear`` or HF ``Conv1D`` with a non-empty weight: what LoRA adapts."""
    if isinstance(module, nn.Linear):
        return module.in_features > 0 and module.out_features > 0
    return is_conv1d(module) and module.weight.numel() > 0


def linear_input_dim(module: Any) -> int | None:
    """The weight dim indexed by input features: 1 for Linear/ConvNd, 0 for Conv1D, else None."""
    if is_conv1d(module):
        return 0
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return 1 if not isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
    return None


def default_constants(model: Any, constants: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Non-tensor kwargs fixed for tracing and scoring: ``use_cache=False`` when the forward has it."""
    out = dict(constants or {})
    if "use_cache" in forward_params(model) and "use_cache" not in out:
        out["use_cache"] = False
    return out


def with_labels(model: Any, batch: Any) -> Any:
    """For models whose forward takes ``labels``: the batch with ``labels=input_ids``.

    Padding (``attention_mask == 0``) is masked with -100 so it does not count in the loss.
    Returns None when the model or batch does not fit that convention.
    """
    params = forward_params(model)
    if "labels" not in params:
        return None
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return None
    batch = dict(batch)
    if "labels" not in batch:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
        batch["labels"] = labels
    if "use_cache" in params and "use_cache" not in batch:
        batch["use_cache"] = False
    return batch


def config_of(model: Any) -> Any:
    """The model's HF config, or None."""
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "to_dict") else None


def config_head_dim(config: Any) -> int | None:
    """``head_dim`` from a config, else ``hidden_size // num_attention_heads``."""
    if config is None:
        return None
    hd = getattr(config, "head_dim", None)
    if hd:
        return int(hd)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def default_example_inputs(model: nn.Module, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    """Example inputs from an HF model's config: token ids (and a mask when the forward takes
    one), or pixel values for vision models.  Batch and sequence >= 2 so the trace stays dynamic.
    """
    config = getattr(model, "config", None)
    params = forward_params(model)
    device = "meta" if on_meta(model) else "cpu"
    if "pixel_values" in params and "input_ids" not in params:
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        chans = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, chans, size, size, device=device)}
    if "input_values" in params and "input_ids" not in params:  # speech encoders (wav2vec2...)
        return {"input_values": torch.randn(batch, 4000, device=device)}
    vocab = getattr(config, "vocab_size", 100) or 100
    ids = torch.randint(0, max(2, min(vocab, 1000)), (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids.to(device)}
    if "attention_mask" in params:
        inputs["attention_mask"] = torch.ones_like(ids).to(device)
    return inputs


def is_causal_lm(model: Any) -> bool:
    """An HF model that generates text (has ``generate`` and an output embedding)."""
    get_out = getattr(model, "get_output_embeddings", None)
    return hasattr(model, "generate") and callable(get_out) and get_out() is not None


def decoder_layers(model: Any) -> nn.ModuleList | None:
    """The transformer blocks of an HF decoder LM (``model.model.layers`` for Llama), or None.

    Looks at ``get_decoder()`` first, then ``model.model``, then the model itself, so base models
    and ``*ForCausalLM`` wrappers both work.
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    for candidate in (base, getattr(model, "model", None), model):
        layers = getattr(candidate, "layers", None) if candidate is not None else None
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def attention_of(layer: nn.Module) -> nn.Module | None:
    """The first submodule of ``layer`` with separate ``k_proj``/``v_proj`` Linears (``self_attn``)."""
    for mod in layer.modules():
        if isinstance(getattr(mod, "k_proj", None), nn.Linear) and isinstance(getattr(mod, "v_proj", None), nn.Linear):
            return mod
    return None
