"""Statistics pass: per-layer moments of inputs and output gradients, gathered with module hooks.

    (nn.Module, batches, StatSpec) --gather_stats--> Stats

For every *linear-like* layer (``nn.Linear``, HF ``Conv1D``, non-grouped ``Conv1d/2d``; see
:data:`LAYER_ADAPTERS`) it sums over the calibration tokens:

* ``x`` and ``x**2`` per input feature (``input_moments``: Wanda-sp activation norms, FLAP's
  fluctuation and the means its bias compensation adds back);
* ``x xᵀ`` (``input_cov``: OBS's ``H``, K-FAC's ``A``; with ``bias_column`` a constant 1 is appended
  for layers with a bias, as K-FAC does);
* ``g gᵀ`` with ``g = ∂L/∂y`` the gradient at the layer output (``grad_cov``: K-FAC's ``G``);
* ``(Wᵀg)²`` per input feature (``grad_input_sq``: the diagonal of ``Wᵀ G W``, what a K-FAC
  *column* cost needs, in ``d_in`` floats instead of ``G``'s ``d_out²``; for layers such as an LM
  head whose output width is the vocabulary and whose rows are never removed);
* ``y · g`` per output feature (``output_taylor``, any module whose output's last dim is its
  feature dim: embeddings, norms): the first-order change of the per-token loss when that output
  feature is zeroed, the first-order fallback for members that are no linear contraction;
* ``(∂L_b/∂θ)²`` elementwise for the module's own parameters named in ``param_fisher``, with
  ``L_b`` the batch's summed per-token loss (``pg_sq``): the diagonal empirical Fisher from
  per-batch gradients, the fallback for parameters no module hook can read per token (the 3-D
  weights of fused expert layers that index ``weight[e]`` inside their forward).  This one side
  uses a hook on the parameter's accumulated gradient, which needs the parameter whole on the rank.

``spec`` is one :class:`StatSpec` for every layer, or a mapping ``{layer: StatSpec}`` (curvature
criteria ask for ``G`` only where rows can go).  Layers sharing an input slot must agree on the
input-side fields.

Conv layers contribute per-channel rows to the moments and im2col columns (``C·k·k``, the order of
``weight.view(out, -1)``) to ``input_cov``, so a conv kernel position is a column like any other.

Why module hooks (a forward pre-hook on the input, a tensor hook on the output) and not parameter
gradient hooks: they see per-token activations and output gradients, which the post-accumulate hooks
of FSDP-sharded parameters cannot (those see reduced, sharded gradients); and they work unchanged when
one block is run on its own (sequential mode).  No parameter gets a gradient: parameters are frozen
for the pass and the first hooked output is made to require grad, so peak memory is weights plus
activations plus the statistics.

Why sums: every statistic is a sum with a count, so shards from several ranks (``Stats.all_reduce``)
or several runs (``Stats.merge``) add up exactly before anyone divides.  Layers that read the same
input tensor (q/k/v projections, gate/up) share one input slot, so their ``A`` is stored once.

Memory: ``d_in²`` floats per input slot for ``input_cov`` and ``d_out²`` per layer for
``grad_cov``, on ``stats_device`` (CPU by default) in ``dtype`` (float32 by default);
``Stats.nbytes`` and ``Stats.bytes_per_param`` say what it took.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxprune.errors import BadInputError, DataError, ScoringError
from fxprune.passes.base import check, fxpass
from fxprune.util import hf
from fxprune.util.loss import Batch, LossFn, count_tokens, model_loss
from fxprune.util.modules import call, eval_mode, on_device, resolve_device, to_device, unique_params

__all__ = [
    "LAYER_ADAPTERS", "LayerAdapter", "LayerStats", "StatSpec", "Stats", "Collector", "combine_stats",
    "gather_stats", "layers_for", "linear_layers", "register_adapter",
]


# ------------------------------------------------------------------------------------------
# What a layer's input rows, input columns and output-gradient rows are
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerAdapter:
    """How statistics read one kind of layer.

    ``channel_rows(m, x)``: ``[N, C]`` rows of input features (moments); ``columns(m, x)``:
    ``[N, d_in]`` rows whose features line up with ``weight_matrix(m)``'s columns (covariance);
    ``grad_rows(m, g)``: ``[N, d_out]`` rows of the output gradient; ``weight_matrix(m)``: the
    weight as ``[d_out, d_in]``; ``supports_cov(m)``: whether covariances are defined for this
    instance (moments always are).
    """

    channel_rows: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    columns: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    grad_rows: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    weight_matrix: Callable[[nn.Module], torch.Tensor]
    supports_cov: Callable[[nn.Module], bool] = lambda m: True


LAYER_ADAPTERS: dict[type, LayerAdapter] = {}
"""Layer types statistics understand (a subclass uses its nearest registered base)."""


def register_adapter(*types_: type) -> Callable[[LayerAdapter], LayerAdapter]:
    def deco(adapter: LayerAdapter) -> LayerAdapter:
        for t in types_:
            LAYER_ADAPTERS[t] = adapter
        return adapter

    return deco


def adapter_of(module: nn.Module, cov: bool = False) -> LayerAdapter | None:
    """The adapter for ``module`` (None when unknown, or when ``cov`` and covariances are not defined)."""
    for cls in type(module).__mro__:
        adapter = LAYER_ADAPTERS.get(cls)
        if adapter is not None:
            return adapter if not cov or adapter.supports_cov(module) else None
    return None


def _last_dim_rows(_m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


register_adapter(nn.Linear)(LayerAdapter(_last_dim_rows, _last_dim_rows, _last_dim_rows, lambda m: m.weight))

if hf.HFConv1D is not None:
    register_adapter(hf.HFConv1D)(LayerAdapter(_last_dim_rows, _last_dim_rows, _last_dim_rows, lambda m: m.weight.t()))


def _conv_channel_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    batched = x.dim() == m.weight.dim()
    x = x if batched else x.unsqueeze(0)
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _conv_columns(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x if x.dim() == m.weight.dim() else x.unsqueeze(0)
    if isinstance(m, nn.Conv1d):
        x, k, s, p, d = x.unsqueeze(-1), (m.kernel_size[0], 1), (m.stride[0], 1), (m.padding[0], 0), (m.dilation[0], 1)
    else:
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
    cols = F.unfold(x, kernel_size=k, dilation=d, padding=p, stride=s)  # [N, C*k*k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _conv_grad_rows(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    g = g if g.dim() == m.weight.dim() else g.unsqueeze(0)
    return g.movedim(1, -1).reshape(-1, g.shape[1])


def _conv_supported(m: nn.Module) -> bool:
    """im2col columns: non-grouped 1-D/2-D convs with numeric zero padding."""
    return (m.groups == 1 and isinstance(m.padding, tuple) and m.padding_mode == "zeros"
            and isinstance(m, (nn.Conv1d, nn.Conv2d)))


register_adapter(nn.Conv1d, nn.Conv2d, nn.Conv3d)(LayerAdapter(
    _conv_channel_rows, _conv_columns, _conv_grad_rows, lambda m: m.weight.reshape(m.weight.shape[0], -1),
    _conv_supported,
))


def linear_layers(model: nn.Module, names: Iterable[str] | None = None, cov: bool = False) -> dict[str, nn.Module]:
    """The layers statistics can be gathered for: every supported module, or those named."""
    if names is None:
        return {n: m for n, m in model.named_modules() if adapter_of(m, cov) is not None}
    out = {}
    for n in names:
        m = model.get_submodule(n)
        if adapter_of(m, cov) is None:
            raise BadInputError(f"statistics cannot be gathered for {n} ({type(m).__name__}); "
                                f"supported: {sorted(t.__name__ for t in LAYER_ADAPTERS)}")
        out[n] = m
    return out


def layers_for(model: nn.Module, spec: Any, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The modules ``spec`` gathers for: under a single :class:`StatSpec`, every supported layer
    (or those ``names``); under a per-layer mapping, its layers (or ``names``), where output-only
    layers (norms, embeddings) need no adapter."""
    if isinstance(spec, StatSpec):
        return linear_layers(model, names, cov=spec.needs_cov)
    chosen: dict[str, nn.Module] = {}
    for n in (list(spec) if names is None else names):
        chosen.update({n: model.get_submodule(n)} if spec[n].output_only
                      else linear_layers(model, [n], cov=spec[n].needs_cov))
    return chosen


# ------------------------------------------------------------------------------------------
# What to gather, and the result
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StatSpec:
    """Which statistics to gather (see the module docstring)."""

    input_moments: bool = False
    input_cov: bool = False
    grad_cov: bool = False
    bias_column: bool = False
    grad_input_sq: bool = False
    output_taylor: bool = False
    param_fisher: tuple[str, ...] = ()  # the module's own parameters (attribute names), in this order

    @property
    def needs_backward(self) -> bool:
        return self.grad_cov or self.grad_input_sq or self.output_taylor or bool(self.param_fisher)

    @property
    def needs_cov(self) -> bool:
        return self.input_cov or self.grad_cov or self.grad_input_sq

    @property
    def output_only(self) -> bool:
        """Only statistics that need no layer adapter (``output_taylor``, ``param_fisher``)."""
        return (self.output_taylor or bool(self.param_fisher)) and not (self.input_moments or self.needs_cov)



def spec_of(spec: Any, name: str) -> StatSpec:
    """The :class:`StatSpec` of layer ``name`` under a single spec or a per-layer mapping."""
    return spec if isinstance(spec, StatSpec) else spec[name]


def any_needs_backward(spec: Any) -> bool:
    return spec.needs_backward if isinstance(spec, StatSpec) else any(s.needs_backward for s in spec.values())


def _freeze_spec(spec: Any) -> Any:
    return spec if isinstance(spec, StatSpec) else types.MappingProxyType(dict(spec))


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Sums for one layer.  Tensors may be shared with layers reading the same input (``slot``).

    ``count`` rows reached the input side (tokens, or tokens x positions for convs);
    ``grad_count`` rows reached the output-gradient side.
    """

    name: str
    slot: str  # the layer whose input slot this layer shares (itself when it owns it)
    d_in: int
    d_out: int
    bias_column: bool
    count: int = 0
    x_sum: torch.Tensor | None = None
    x_sq: torch.Tensor | None = None
    xxT: torch.Tensor | None = None
    cov_count: int = 0
    # [sum over batches of ||C_b||²_F, sum of n_b²] for the batches' sums C_b = Σ x xᵀ (n_b rows
    # each, the bias column included): how noisy the estimate A is, for the Ledoit-Wolf shrinkage
    # (:func:`fxprune.passes.curvature.shrinkage`)
    xspread: torch.Tensor | None = None
    grad_count: int = 0
    ggT: torch.Tensor | None = None
    gx_sq: torch.Tensor | None = None  # sum over rows of (Wᵀ g)² per input feature (grad_input_sq)
    yg: torch.Tensor | None = None  # sum over rows of y · g per output feature (output_taylor)
    # param_fisher: sum over batches of (∂L_b/∂θ)², the named parameters flattened and concatenated
    # in the spec's order; ``pg_count`` the tokens of those batches
    pg_sq: torch.Tensor | None = None
    pg_count: int = 0

    def param_fisher(self, attr: str, params: Mapping[str, torch.Tensor], order: Sequence[str]) -> torch.Tensor:
        """The diagonal Fisher ``E_token[(∂ℓ/∂θ)²]`` of parameter ``attr``, in its own shape."""
        start = 0
        for a in order:
            n = params[a].numel()
            if a == attr:
                return (self.pg_sq[start:start + n] / max(self.pg_count, 1)).reshape(params[a].shape)
            start += n
        raise KeyError(attr)

    @property
    def mean(self) -> torch.Tensor:
        return self.x_sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each input feature over the rows (FLAP's fluctuation)."""
        n = max(self.count, 1)
        return (self.x_sq / n - (self.x_sum / n) ** 2).clamp_min(0.0)

    @property
    def A(self) -> torch.Tensor:
        """``E[x xᵀ]`` (with the bias column when gathered with one)."""
        return self.xxT / max(self.cov_count, 1)

    @property
    def G(self) -> torch.Tensor:
        """``E[g gᵀ]`` over output-gradient rows."""
        return self.ggT / max(self.grad_count, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("x_sum", "x_sq", "xxT", "xspread", "ggT", "gx_sq", "yg", "pg_sq")
                if getattr(self, k) is not None}


@dataclasses.dataclass(frozen=True)
class Stats(Mapping[str, LayerStats]):
    """The statistics pass' result: ``{layer FQN: LayerStats}`` plus how much data made them."""

    layers: Mapping[str, LayerStats]
    spec: Any  # a StatSpec, or a read-only {layer: StatSpec}
    n_batches: int
    n_tokens: int
    fisher: str = "empirical"

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by distinct statistic tensors (shared slots counted once)."""
        seen: set[int] = set()
        total = 0
        for ls in self.layers.values():
            for t in ls.tensors().values():
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    def bytes_per_param(self, model: nn.Module) -> float:
        n = sum(p.numel() for p in unique_params(model))
        return self.nbytes / max(n, 1)

    def merge(self, other: "Stats") -> "Stats":
        """The sums of two gatherings over the same layers (e.g. two data shards)."""
        if set(self.layers) != set(other.layers) or dict_spec(self.spec) != dict_spec(other.spec):
            raise ScoringError("statistics to merge must cover the same layers with the same spec")
        merged: dict[str, LayerStats] = {}
        done: dict[int, torch.Tensor] = {}
        for name, a in self.layers.items():
            b = other.layers[name]
            fields = {}
            for key, ta in a.tensors().items():
                if id(ta) not in done:
                    done[id(ta)] = ta + getattr(b, key).to(ta.device, ta.dtype)
                fields[key] = done[id(ta)]
            merged[name] = dataclasses.replace(
                a, count=a.count + b.count, cov_count=a.cov_count + b.cov_count,
                grad_count=a.grad_count + b.grad_count, pg_count=a.pg_count + b.pg_count, **fields,
            )
        return Stats(types.MappingProxyType(merged), self.spec, self.n_batches + other.n_batches,
                     self.n_tokens + other.n_tokens, self.fisher)

    def all_reduce(self, group: Any = None, comm_device: str | torch.device | None = None) -> "Stats":
        """Sum every statistic over the ranks of ``torch.distributed`` (a no-op when not initialised).

        Each distinct tensor is reduced once (shared input slots stay shared); counts are reduced
        too.  ``comm_device``: where the reduction runs (CUDA under NCCL, which cannot reduce CPU
        tensors); results come back to each tensor's device.  Returns a new ``Stats``; this one is
        left as it was.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        reduced: dict[int, torch.Tensor] = {}
        out: dict[str, LayerStats] = {}
        names = sorted(self.layers)  # the same order on every rank
        counts = torch.tensor([[self.layers[n].count, self.layers[n].cov_count, self.layers[n].grad_count,
                                self.layers[n].pg_count] for n in names] + [[self.n_batches, self.n_tokens, 0, 0]],
                              dtype=torch.float64)
        if comm_device is not None:
            counts = counts.to(comm_device)
        dist.all_reduce(counts, group=group)
        counts = counts.cpu()
        for i, name in enumerate(names):
            ls = self.layers[name]
            fields = {}
            for key, t in ls.tensors().items():
                if id(t) not in reduced:
                    r = t.to(comm_device, copy=True) if comm_device is not None else t.clone()
                    dist.all_reduce(r, group=group)
                    reduced[id(t)] = r.to(t.device)
                fields[key] = reduced[id(t)]
            c = counts[i]
            out[name] = dataclasses.replace(ls, count=int(c[0]), cov_count=int(c[1]), grad_count=int(c[2]),
                                            pg_count=int(c[3]), **fields)
        return Stats(types.MappingProxyType(out), self.spec, int(counts[-1, 0]), int(counts[-1, 1]), self.fisher)

    def __repr__(self) -> str:
        return f"Stats(layers={len(self.layers)}, batches={self.n_batches}, tokens={self.n_tokens}, MB={self.nbytes / 2**20:.1f})"


def dict_spec(spec: Any) -> Any:
    return spec if isinstance(spec, StatSpec) else dict(spec)


def combine_stats(parts: Sequence[Stats], n_batches: int, n_tokens: int) -> Stats:
    """One ``Stats`` from gatherings over *disjoint* layer sets on the same data (sequential mode
    gathers one block at a time); ``n_batches``/``n_tokens`` describe that data.

    Parts gathered with one :class:`StatSpec` keep it; per-layer specs (``{layer: StatSpec}``,
    what the curvature criteria ask for) are joined into one mapping over the combined layers."""
    layers: dict[str, LayerStats] = {}
    shared = [p.spec for p in parts if isinstance(p.spec, StatSpec)]
    if shared and (len(shared) < len(parts) or len(set(shared)) > 1):
        raise ScoringError("statistics to combine must share one spec (or all have per-layer specs)")
    per_layer: dict[str, StatSpec] = {}
    for part in parts:
        overlap = set(part.layers) & set(layers)
        if overlap:
            raise ScoringError(f"statistics to combine overlap on {sorted(overlap)[:3]}")
        layers.update(part.layers)
        if not isinstance(part.spec, StatSpec):
            per_layer.update(part.spec)
    spec: Any = shared[0] if shared else (_freeze_spec(per_layer) if parts else StatSpec())
    fisher = parts[0].fisher if parts else "empirical"
    return Stats(types.MappingProxyType(layers), spec, n_batches, n_tokens, fisher)


# ------------------------------------------------------------------------------------------
# The hooks
# ------------------------------------------------------------------------------------------
class _Slot:
    """Input-side sums for one distinct input (shared by the layers that read it)."""

    def __init__(self) -> None:
        self.count = 0
        self.cov_count = 0
        self.x_sum: torch.Tensor | None = None
        self.x_sq: torch.Tensor | None = None
        self.xxT: torch.Tensor | None = None
        self.xspread: torch.Tensor | None = None
        self.batch_input: Any = None  # weakref to the tensor added last, this batch
        self.batch_done = False
        self.readers: set[str] = set()  # layers that read that tensor


_RECENT = 8  # how many recent inputs are held to recognise layers reading the same tensor


class Collector:
    """Hooks that sum statistics for ``layers`` while the caller runs the model (see module docs).

        with Collector(layers, StatSpec(input_cov=True)) as col:
            for batch in batches:
                col.next_batch()
                model(**batch)
        stats = col.result()

    The caller drives the forward (and, for ``grad_cov``, the backward) passes, so the same
    collector serves whole-model runs, one block run on saved inputs, or one rank's data shard.
    ``batch_scale`` multiplies the output gradients of the current batch (the number of tokens
    the batch's mean loss averaged over makes ``G`` the Fisher of the per-token loss).
    """

    def __init__(self, layers: Mapping[str, nn.Module], spec: Any, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.layers = dict(layers)
        self.spec = _freeze_spec(spec)
        if not isinstance(spec, StatSpec):
            missing = sorted(set(self.layers) - set(spec))
            if missing:
                raise BadInputError(f"no StatSpec for layers {missing[:5]}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_scale = 1.0
        self.n_batches = 0
        self._slots: dict[str, _Slot] = {}
        self._slot_of: dict[str, str] = {}
        # (input tensor, slot) for the last few inputs: held, so identity comparisons are sound
        self._recent: list[tuple[torch.Tensor, str]] = []
        self._ggT: dict[str, torch.Tensor] = {}
        self._gx_sq: dict[str, torch.Tensor] = {}
        self._yg: dict[str, torch.Tensor] = {}
        self._grad_count: dict[str, int] = {}
        self._pg_sq: dict[str, torch.Tensor] = {}
        self._pg_count: dict[str, int] = {}
        self._pg_batch: dict[str, int] = {}  # the batch whose tokens ``_pg_count`` last added
        self._param_state: list[tuple[torch.Tensor, bool, Any]] = []  # (param, requires_grad, .grad) to restore
        self._dims: dict[str, tuple[int, int, bool]] = {}
        self._handles: list[Any] = []
        self.nonfinite: str | None = None

    # -- lifecycle
    def __enter__(self) -> "Collector":
        for name, module in self.layers.items():
            spec = spec_of(self.spec, name)
            cov = spec.needs_cov
            adapter = adapter_of(module, cov)
            if spec.param_fisher:
                self._hook_params(name, module, spec.param_fisher)
            if spec.output_only:
                if spec.output_taylor:
                    self._handles.append(module.register_forward_hook(self._post_hook(name, module, adapter)))
                continue
            if adapter is None:
                raise BadInputError(f"no statistics adapter for {name} ({type(module).__name__})"
                                    + (" covariances" if cov else ""))
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name, module, adapter)))
            if spec.needs_backward:
                self._handles.append(module.register_forward_hook(self._post_hook(name, module, adapter)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recent.clear()
        for p, flag, grad in reversed(self._param_state):
            p.grad = grad
            p.requires_grad_(flag)
        self._param_state.clear()

    def _hook_params(self, name: str, module: nn.Module, attrs: Sequence[str]) -> None:
        """Hooks summing ``(scale · ∂loss/∂θ)²`` for ``module.<attr>`` after each backward (``param_fisher``)."""
        params = []
        for attr in attrs:
            p = getattr(module, attr, None)
            if not isinstance(p, nn.Parameter):
                raise BadInputError(f"param_fisher: {name}.{attr} is not a parameter of {type(module).__name__}")
            params.append(p)
        sizes = [p.numel() for p in params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._dims.setdefault(name, (0, 0, False))
        for p, off, n in zip(params, offsets, sizes):
            self._param_state.append((p, p.requires_grad, p.grad))
            p.grad = None
            p.requires_grad_(True)

            def grad_hook(param: torch.Tensor, off: int = off, n: int = n) -> None:
                g, param.grad = param.grad, None  # read this backward's gradient; hold no .grad
                with torch.no_grad():
                    sq = (g.detach().to(self.dtype) * self.batch_scale).pow(2).reshape(-1)
                    if not bool(torch.isfinite(sq).all()):
                        self.nonfinite = self.nonfinite or name
                    acc = self._pg_sq.get(name)
                    if acc is None:
                        acc = self._pg_sq[name] = torch.zeros(sum(sizes), dtype=self.dtype, device=self.device)
                    acc[off:off + n] += sq.to(self.device)
                    if self._pg_batch.get(name) != self.n_batches:  # once a batch, whichever parameter fires
                        self._pg_batch[name] = self.n_batches
                        self._pg_count[name] = self._pg_count.get(name, 0) + int(round(self.batch_scale))

            self._handles.append(p.register_post_accumulate_grad_hook(grad_hook))

    def next_batch(self, scale: float = 1.0) -> None:
        """Call before each batch (sharing of input slots is tracked per batch)."""
        self._recent.clear()
        for slot in self._slots.values():
            slot.batch_input, slot.batch_done = None, False
            slot.readers = set()
        self.batch_scale = float(scale)
        self.n_batches += 1

    # -- hooks
    def _pre_hook(self, name: str, module: nn.Module, adapter: LayerAdapter) -> Callable:
        spec = spec_of(self.spec, name)

        def hook(mod: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            slot_name = self._slot_of.get(name)
            if slot_name is None:
                slot_name = next((s for t, s in self._recent if t is x), name)
                self._slot_of[name] = slot_name
                self._slots.setdefault(slot_name, _Slot())
            slot = self._slots[slot_name]
            w = adapter.weight_matrix(module)
            bias_col = spec.bias_column and getattr(module, "bias", None) is not None
            self._dims.setdefault(name, (int(w.shape[1]), int(w.shape[0]), bias_col))
            if slot.batch_input is not None and slot.batch_input() is x:
                slot.readers.add(name)
                return  # another layer already added this input, this batch
            if slot.batch_done and name not in slot.readers:
                raise ScoringError(
                    f"layers sharing one input slot ({slot_name}, {name}) read different inputs in "
                    f"batch {self.n_batches - 1}; gather them separately"
                )
            # a layer that already read this batch's input is called again (a module reused in
            # one forward, e.g. a shared router or a looped block): its statistics sum over calls
            slot.batch_input, slot.batch_done, slot.readers = weakref.ref(x), True, {name}
            self._recent = [*self._recent[-(_RECENT - 1):], (x, slot_name)]
            with torch.no_grad():
                x = x.detach()
                if spec.input_moments:
                    rows = adapter.channel_rows(module, x).to(self.dtype)
                    s, sq = rows.sum(0), (rows * rows).sum(0)
                    slot.x_sum = _add(slot.x_sum, s, self.device)
                    slot.x_sq = _add(slot.x_sq, sq, self.device)
                    slot.count += rows.shape[0]
                if spec.input_cov:
                    cols = adapter.columns(module, x).to(self.dtype)
                    if bias_col:
                        cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1)], dim=1)
                    cc = cols.t() @ cols
                    slot.xxT = _add(slot.xxT, cc, self.device)
                    # the spread of the estimate between calls (batches): sum ||C_b||²_F and sum n_b²
                    # (tokens of one window are correlated: their spread is the honest one)
                    slot.xspread = _add(slot.xspread, torch.stack([(cc * cc).sum(), cc.new_tensor(
                        float(cols.shape[0]) ** 2)]), self.device)
                    slot.cov_count += cols.shape[0]

        return hook

    def _post_hook(self, name: str, module: nn.Module, adapter: LayerAdapter) -> Callable:
        spec = spec_of(self.spec, name)

        def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or not torch.is_grad_enabled():
                return out
            if not out.requires_grad:
                out.requires_grad_(True)  # a leaf: nothing upstream needs a gradient
            scale = self.batch_scale
            y = out.detach() if spec.output_taylor else None
            if spec.output_only:
                self._dims.setdefault(name, (0, int(out.shape[-1]), False))

            def grad_hook(g: torch.Tensor) -> None:
                with torch.no_grad():
                    if y is not None:
                        yg = (y.to(self.dtype) * g.detach().to(self.dtype)).reshape(-1, y.shape[-1])
                        self._yg[name] = _add(self._yg.get(name), yg.sum(0) * scale, self.device)
                    if spec.output_only:
                        if not bool(torch.isfinite(g).all()):
                            self.nonfinite = self.nonfinite or name
                        self._grad_count[name] = self._grad_count.get(name, 0) + g.numel() // g.shape[-1]
                        return
                    rows = adapter.grad_rows(module, g.detach()).to(self.dtype) * scale
                    if not bool(torch.isfinite(rows).all()):
                        self.nonfinite = self.nonfinite or name
                    if spec.grad_cov:
                        self._ggT[name] = _add(self._ggT.get(name), rows.t() @ rows, self.device)
                    if spec.grad_input_sq:
                        gx = rows @ adapter.weight_matrix(module).detach().to(rows.device, self.dtype)
                        self._gx_sq[name] = _add(self._gx_sq.get(name), (gx * gx).sum(0), self.device)
                    self._grad_count[name] = self._grad_count.get(name, 0) + rows.shape[0]

            out.register_hook(grad_hook)
            return out

        return hook

    # -- result
    def result(self, n_tokens: int = 0, fisher: str = "empirical") -> Stats:
        layers: dict[str, LayerStats] = {}
        for name in self.layers:
            if name not in self._dims:
                continue  # never reached by the data
            d_in, d_out, bias_col = self._dims[name]
            slot_name = self._slot_of.get(name, name)
            slot = self._slots.get(slot_name) or _Slot()
            layers[name] = LayerStats(
                name=name, slot=slot_name, d_in=d_in, d_out=d_out, bias_column=bias_col,
                count=slot.count, x_sum=slot.x_sum, x_sq=slot.x_sq, xxT=slot.xxT, cov_count=slot.cov_count,
                xspread=slot.xspread,
                grad_count=self._grad_count.get(name, 0), ggT=self._ggT.get(name),
                gx_sq=self._gx_sq.get(name),
                yg=self._yg.get(name), pg_sq=self._pg_sq.get(name), pg_count=self._pg_count.get(name, 0),
            )
        return Stats(types.MappingProxyType(layers), self.spec, self.n_batches, n_tokens, fisher)


def _add(acc: torch.Tensor | None, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    value = value.to(device)
    return value.clone() if acc is None else acc.add_(value)


# ------------------------------------------------------------------------------------------
# The pass
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_params(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad for the duration (none gets a ``.grad``); restored on exit."""
    params = unique_params(model)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _sampled_loss(model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy against labels sampled from the model's own predictions (the true Fisher)."""
    inputs = dict(batch) if isinstance(batch, Mapping) else batch
    out = call(model, {**inputs, **hf.cache_off(model)} if isinstance(inputs, dict) else inputs)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise ScoringError("fisher='sampled' needs a model that returns logits")
    return sampled_cross_entropy(logits, generator)


def sampled_cross_entropy(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` against labels drawn from their own softmax (the true Fisher's loss)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    with torch.no_grad():
        probs = torch.softmax(flat, dim=-1)
        labels = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(flat.device)
    return F.cross_entropy(flat, labels)


def _requires(model: Any, batches: Any, spec: Any = None, **kwargs: Any) -> None:
    check(isinstance(model, nn.Module), BadInputError, f"gather_stats() needs an nn.Module, got {type(model).__name__}")
    check(isinstance(spec, (StatSpec, Mapping)), BadInputError,
          "gather_stats() needs a StatSpec (or {layer: StatSpec}) saying what to gather")
    check(kwargs.get("fisher", "empirical") in ("empirical", "sampled"), BadInputError,
          "fisher must be 'empirical' or 'sampled'")


@fxpass("gather_stats", requires=_requires)
def gather_stats(
    model: nn.Module,
    batches: Iterable[Batch],
    spec: Any,
    *,
    layers: Sequence[str] | None = None,
    loss_fn: LossFn | None = None,
    fisher: str = "empirical",
    device: str | torch.device = "auto",
    stats_device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    progress: bool = True,
) -> Stats:
    """Run ``model`` over ``batches`` and sum the statistics ``spec`` asks for (see module docs).

    ``layers``: module names (default: every supported layer).  ``loss_fn``: as in scoring (HF
    models with ``labels`` use their loss).  ``fisher``: ``"empirical"`` (gradients of the loss on
    the data) or ``"sampled"`` (labels sampled from the model's predictions).  The model is left as
    it was (mode, device, requires_grad flags, no ``.grad``).
    """
    from tqdm.auto import tqdm

    chosen = layers_for(model, spec, layers)
    dev = resolve_device(device)
    tokens = 0
    generator = torch.Generator().manual_seed(seed)
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(on_device(model, dev))
        stack.enter_context(eval_mode(model))
        stack.enter_context(frozen_params(model))
        col = stack.enter_context(Collector(chosen, spec, device=stats_device, dtype=dtype))
        bar = tqdm(batches, desc="statistics", disable=not progress, leave=False,
                   total=len(batches) if hasattr(batches, "__len__") else None)
        for i, batch in enumerate(bar):
            batch = to_device(batch, dev)
            n = count_tokens(batch)
            col.next_batch(scale=float(max(n, 1)))
            if any_needs_backward(spec):
                with torch.enable_grad():
                    loss = _sampled_loss(model, batch, generator) if fisher == "sampled" else model_loss(model, batch, loss_fn)
                    if not math.isfinite(float(loss.detach())):
                        raise ScoringError(f"batch {i}: loss is {float(loss)}; check the model's weights and this batch")
                    if not loss.requires_grad:
                        raise ScoringError(f"batch {i}: the loss does not depend on any hooked layer")
                    loss.backward()
                if col.nonfinite:
                    raise ScoringError(f"batch {i}: non-finite output gradient at layer {col.nonfinite!r}")
            else:
                with torch.no_grad():
                    call(model, {**batch, **hf.cache_off(model)} if isinstance(batch, Mapping) else batch)
            tokens += n
    if col.n_batches == 0:
        raise DataError("no calibration batches: the batches iterable was empty")
    return col.result(tokens, fisher)
