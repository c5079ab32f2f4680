"""Hugging Face conventions, in one place: Conv1D, labels, ``use_cache``, configs, example inputs."""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any, Iterator, Mapping

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
    """The weight dim indexed by input features: 1 for Linear and (non-transposed) ConvNd, 0 for
    HF Conv1D, None otherwise (transposed convs, norms, embeddings)."""
    if is_conv1d(module):
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return None
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return 1
    return None


def cache_off(model: Any) -> dict[str, Any]:
    """``{"use_cache": False}`` when the model's forward names ``use_cache``, else ``{}``.

    Tracing, scoring, recovery and export all run the model without a KV cache (a traced cache is
    a separate export); a forward that only has ``**kwargs`` is not handed an argument it may not know.
    """
    return {"use_cache": False} if "use_cache" in forward_params(model) else {}


def default_constants(model: Any, constants: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Non-tensor kwargs fixed for tracing and scoring: :func:`cache_off` unless given."""
    return {**cache_off(model), **dict(constants or {})}


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


# ------------------------------------------------------------------------------------------
# Config search: which HF config describes a pruned model
# ------------------------------------------------------------------------------------------
def config_candidates(new_model: nn.Module, old_model: nn.Module, changes: Mapping, skip: Any) -> Iterator[Any]:
    """Yield HF configs whose rebuilt skeleton has exactly the pruned parameter shapes.

    Candidate fields are int config entries whose old value changed somewhere in the model (and
    head counts scaled by a width ratio).  Assignments with the fewest changed fields come first.
    Equal shapes are necessary, not sufficient (4 heads of 6 vs 2 heads of 12), so the caller
    also checks each candidate against the rewritten graph.
    """
    config = getattr(new_model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(type(new_model), "_from_config"):
        return
    target = {n: tuple(p.shape) for n, p in new_model.state_dict().items()}
    original = {n: tuple(p.shape) for n, p in old_model.state_dict().items()}
    if target == original:
        return
    value_map: dict[int, set[int]] = {}
    for n, shape in original.items():
        for a, b in zip(shape, target.get(n, shape)):
            value_map.setdefault(a, set()).add(b)
    for attrs in changes.values():
        for old, new in attrs.values():
            value_map.setdefault(old, set()).add(new)
    fields = {
        k: v for k, v in config.to_dict().items() if type(v) is int and not skip.search(k)
    }
    candidates: dict[str, set[int]] = {}
    for k, v in fields.items():
        news = value_map.get(v, set()) - {v}
        if news:
            candidates[k] = set(news)
    for k, vals in _derived_count_candidates(new_model, old_model, fields).items():
        candidates.setdefault(k, set()).update(vals)
    keys = sorted(candidates)
    options = [[None, *sorted(candidates[k])] for k in keys]
    combos = sorted(itertools.product(*options), key=lambda c: sum(v is not None for v in c))
    for combo in combos[1:513]:
        cfg = copy.deepcopy(config)
        for k, v in zip(keys, combo):
            if v is not None:
                setattr(cfg, k, v)
        if _mismatch(new_model, cfg, target) == 0:
            yield cfg


def skeleton(model: nn.Module, cfg: Any) -> nn.Module:
    """``type(model)`` built from ``cfg`` on the meta device (shapes only)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model)._from_config(cfg)


def _mismatch(model: nn.Module, cfg: Any, target: dict[str, tuple]) -> int:
    """How far the skeleton built from ``cfg`` is from the pruned model (0 = identical shapes)."""
    try:
        built = skeleton(model, cfg)
    except Exception:  # noqa: BLE001 - an inconsistent config is just a bad candidate
        return 10**9
    shapes = {n: tuple(p.shape) for n, p in built.state_dict().items()}
    return sum(shapes.get(n) != s for n, s in target.items()) + sum(n not in target for n in shapes)


def copy_int_attrs(src: nn.Module, dst: nn.Module) -> None:
    """Bring bookkeeping ints (``hidden_size`` on an MLP, say) in line with the skeleton."""
    dst_mods = dict(dst.named_modules())
    for name, ms in src.named_modules():
        md = dst_mods.get(name)
        if md is None:
            continue
        for k, v in vars(ms).items():
            if type(v) is int and not k.startswith("_") and type(vars(md).get(k)) is int and vars(md)[k] != v:
                setattr(md, k, v)


def _derived_count_candidates(new_model, old_model, fields: dict[str, int]) -> dict[str, list[int]]:
    """For count-like config fields (heads), propose old * (new width / old width) values."""
    out: dict[str, list[int]] = {}
    ratios = set()
    old_sd, new_sd = old_model.state_dict(), new_model.state_dict()
    for n, p in old_sd.items():
        q = new_sd.get(n)
        if q is None:
            continue
        for a, b in zip(p.shape, q.shape):
            if a != b and a:
                ratios.add((a, b))
    for k, v in fields.items():
        if "head" not in k.lower():
            continue
        vals = []
        for a, b in ratios:
            if (v * b) % a == 0 and 0 < v * b // a < v:
                vals.append(v * b // a)
        if vals:
            out[k] = sorted(set(vals))[:4]
    return out


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
