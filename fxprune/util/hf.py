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
    if not (isinstance(hidden, int) and isinstance(heads, int) and hidden and heads):
        return None  # unset, or per stage (Swin's num_heads list)
    return hidden // heads


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
Shapes = Mapping[str, tuple]


def state_shapes(model: nn.Module) -> dict[str, tuple]:
    """``{state_dict key: shape}`` (persistent tensors only, as a checkpoint holds them)."""
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def skeleton(model: Any, cfg: Any) -> nn.Module:
    """``type(model)`` (or the class ``model``) built from ``cfg`` on the meta device (shapes only)."""
    cls = model if isinstance(model, type) else type(model)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls._from_config(cfg)


def copy_config(config: Any, updates: Mapping[str, Any]) -> Any:
    """A deep copy of ``config`` with ``updates`` set."""
    cfg = copy.deepcopy(config)
    for k, v in updates.items():
        setattr(cfg, k, v)
    return cfg


def pinned_fields(config: Any) -> dict[str, int]:
    """Derived sizes worth writing into the config so that other fields can change alone.

    ``head_dim`` is read with ``getattr(config, "head_dim", hidden // heads)`` by most HF
    attentions: a config without it (OLMo, Phi-3, Mistral-style) cannot keep the head width
    when the head count changes, unless it is pinned to its derived value.
    """
    values = config.to_dict()
    if values.get("head_dim") is None:
        hd = config_head_dim(config)
        if hd:
            return {"head_dim": hd}
    return {}


class ConfigSearch:
    """Find config field updates under which the model's class builds given parameter shapes.

    The search is by shapes on the meta device, so it is cheap and needs no weights:

    1. *Fields*: int config entries whose value is a size that changed (``intermediate_size``
       112 -> 56), unset sizes (``n_inner=None``: any new size), and head counts scaled by a
       width ratio (12 heads of 64 -> 9 heads).  Derived sizes (``head_dim``) are pinned first
       when pinning leaves the skeleton unchanged (:func:`pinned_fields`).
    2. *Effects*: each (field, value) is built alone once; the parameters it changes must all be
       parameters that the pruning changed (a field that also resizes the embeddings is not the
       MLP width), and at least one.
    3. *Combinations*, fewest fields first, whose effects together cover every changed
       parameter, are built and kept when every compared shape is exactly the target.

    ``scope`` restricts the comparison to some parameter names (one block of a non-uniformly
    pruned model).  Equal shapes are necessary, not sufficient (4 heads of 6 vs 2 heads of 12),
    so callers also check each candidate against the rewritten graph.
    """

    def __init__(self, model: nn.Module, config: Any = None, *, skip: Any = None, max_builds: int = 400) -> None:
        self.cls = type(model)
        self.config = config if config is not None else config_of(model)
        self.skip = skip
        self.max_builds = max_builds
        self.builds = 0
        self._cache: dict[tuple, dict[str, tuple] | None] = {}
        self.pins: dict[str, int] = {}
        self.base: dict[str, tuple] | None = None
        if self.config is None or not hasattr(self.cls, "_from_config"):
            return
        self.base = self.shapes({})
        pins = pinned_fields(self.config)
        if pins and self.base is not None and self.shapes(pins) == self.base:
            self.pins = pins

    @property
    def usable(self) -> bool:
        return self.base is not None

    def config_with(self, updates: Mapping[str, Any]) -> Any:
        return copy_config(self.config, updates)

    def shapes(self, updates: Mapping[str, Any]) -> dict[str, tuple] | None:
        """Shapes of the skeleton built with ``updates`` (None if the config does not build)."""
        key = tuple(sorted(updates.items()))
        if key not in self._cache:
            if self.builds >= self.max_builds:
                return None
            self.builds += 1
            try:
                self._cache[key] = state_shapes(skeleton(self.cls, self.config_with(updates)))
            except Exception:  # noqa: BLE001 - an inconsistent config is just a bad candidate
                self._cache[key] = None
        return self._cache[key]

    def skeleton(self, updates: Mapping[str, Any]) -> nn.Module:
        return skeleton(self.cls, self.config_with({**self.pins, **updates}))

    def search(self, target: Shapes, *, scope: Any = None, limit: int = 8) -> Iterator[dict[str, Any]]:
        """Yield update dicts (pins included) whose skeleton has ``target``'s shapes in ``scope``."""
        if self.base is None:
            return
        base = self.base
        names = [n for n in target if scope is None or n in scope]
        if any(n not in base for n in names):
            return
        changed = {n for n in names if tuple(target[n]) != base[n]}
        if not changed:
            return
        options = self._options(base, target, changed)
        effects: dict[tuple[str, Any], frozenset[str]] = {}
        for field, values in options.items():
            for v in values:
                got = self.shapes({**self.pins, field: v})
                if got is None or set(got) != set(base):
                    continue
                touched = frozenset(n for n in names if got[n] != base[n])
                if touched and touched <= changed:
                    effects[(field, v)] = touched
        values: dict[str, list[Any]] = {}
        for f, v in sorted(effects, key=lambda e: (e[0], str(e[1]))):
            values.setdefault(f, []).append(v)
        reach = {f: frozenset().union(*(effects[(f, v)] for v in vs)) for f, vs in values.items()}
        if frozenset().union(*reach.values()) != changed:
            return  # some changed parameter follows no config field
        found = 0
        for r in range(1, len(values) + 1):
            for subset in itertools.combinations(sorted(values), r):
                if frozenset().union(*(reach[f] for f in subset)) != changed:
                    continue
                for combo in itertools.product(*(values[f] for f in subset)):
                    picked = dict(zip(subset, combo, strict=True))
                    if frozenset().union(*(effects[fv] for fv in picked.items())) != changed:
                        continue
                    updates = {**self.pins, **picked}
                    got = self.shapes(updates)
                    if got is not None and all(got[n] == tuple(target[n]) for n in names):
                        yield updates
                        found += 1
                        if found >= limit:
                            return
                    if self.builds >= self.max_builds:
                        return

    def _options(self, base: Shapes, target: Shapes, changed: set[str]) -> dict[str, set[Any]]:
        """Candidate values per config field (see the class docstring)."""
        value_map: dict[int, set[int]] = {}
        ratios: set[tuple[int, int]] = set()
        for n in changed:
            for a, b in zip(base[n], target[n], strict=True):
                if a != b:
                    value_map.setdefault(a, set()).add(b)
                    ratios.add((a, b))
        new_sizes = sorted({b for vals in value_map.values() for b in vals})
        options: dict[str, set[Any]] = {}
        for k, v in self.config.to_dict().items():
            if k.startswith("_") or (self.skip is not None and self.skip.search(k)):
                continue
            if type(v) is int:
                vals = set(value_map.get(v, set())) - {v}
                if "head" in k.lower():  # counts: old * (new width / old width)
                    vals |= {v * b // a for a, b in ratios if (v * b) % a == 0 and 0 < v * b // a < v}
                if vals:
                    options[k] = vals
            elif v is None and new_sizes and k not in self.pins:  # derived when unset: n_inner, ffn_dim
                options[k] = set(new_sizes[:16])
        return options


def config_candidates(new_model: nn.Module, old_model: nn.Module, *, skip: Any = None,
                      search: ConfigSearch | None = None) -> Iterator[dict[str, Any]]:
    """Config updates under which ``type(new_model)`` has ``new_model``'s shapes (see ConfigSearch)."""
    search = search or ConfigSearch(old_model, config_of(new_model), skip=skip)
    if search.usable:
        yield from search.search(state_shapes(new_model))


def copy_int_attrs(src: nn.Module, dst: nn.Module, prefix: str = "") -> None:
    """Bring bookkeeping ints (``hidden_size`` on an MLP, say) in line with the skeleton
    (only modules under ``prefix`` when one is given)."""
    dst_mods = dict(dst.named_modules())
    for name, ms in src.named_modules():
        if prefix and not (name == prefix or name.startswith(prefix + ".")):
            continue
        md = dst_mods.get(name)
        if md is None:
            continue
        for k, v in vars(ms).items():
            if type(v) is int and not k.startswith("_") and type(vars(md).get(k)) is int and vars(md)[k] != v:
                setattr(md, k, v)


def int_attr_diff(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, int]]:
    """``{module path: {attr: value}}`` for public int attributes where ``model`` differs from
    ``reference`` (the same class built from a config): what a config alone does not set."""
    ref = dict(reference.named_modules())
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        r = ref.get(name)
        if r is None:
            continue
        rv = vars(r)
        for k, v in vars(m).items():
            if type(v) is int and not k.startswith("_") and type(rv.get(k)) is int and rv[k] != v:
                out.setdefault(name, {})[k] = v
    return out


def module_configs(model: nn.Module) -> dict[str, Any]:
    """Submodules holding their own config object (not the model's): ``{path: config}``."""
    root = config_of(model)
    return {
        name: m.config for name, m in model.named_modules()
        if name and config_of(m) is not None and m.config is not root
    }


def config_diff(config: Any, base: Any) -> dict[str, Any]:
    """Fields of ``config`` whose value differs from ``base`` (JSON-able values)."""
    a, b = config.to_dict(), base.to_dict()
    return {k: v for k, v in a.items() if b.get(k, object()) != v and not k.startswith("_")}


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
