"""Scoring pass: how important is each unit of each prunable group?

The analysis pass hands us ``list[Group]``; this pass turns it into ``{group_id: scores}`` where
``scores`` is a float64 array with one entry per unit (higher = more important).  The planner
then decides which units to remove.

Design, and why:

* **Criteria live in a registry** (:data:`IMPORTANCE`, filled with :func:`register_importance`)
  so new criteria are a class away and ``score(importance="name")`` never grows an if-chain.
  A criterion accumulates *per-index* statistics for every (parameter, dim) that is a member of
  some group, e.g. ``sum(w * g)`` over all dims but ``dim``.  Per-unit scores are then the sum of
  those per-index values over ``member.indices([u])``, passed through the criterion's
  :meth:`Importance.finalize` (``abs`` for the vector-wise Taylor score, ``sqrt`` for L2...).
  Keeping the abs/sqrt *after* the unit sum is what makes the Taylor score vector-wise
  (``|sum_k w_k g_k|`` over the unit's slice), as in LLM-Pruner.
* **Gradients never pile up.**  Gradient criteria hook every member parameter with
  ``Tensor.register_post_accumulate_grad_hook``: the hook folds ``p.grad`` into the small
  per-index accumulators and sets ``p.grad = None`` straight away.  Parameters that are not
  members of any group get ``requires_grad=False`` for the pass, so autograd neither computes
  nor stores their gradients.  Peak memory is therefore weights + activations + one gradient at
  a time, instead of weights + all gradients for a plain ``loss.backward()``.
* **Member scores are combined by an aggregation** from :data:`AGGREGATES` (sum, mean, max,
  prod) and **groups are normalized** with :data:`NORMALIZERS` so a global planner can rank
  units of different groups against each other.
* Everything the pass touches on the model (requires_grad flags, hooks, existing ``.grad``,
  train/eval mode, device) is restored in a ``finally`` block, also when scoring fails.

Only *parameter* members are scored; buffer and activation members carry no weights to judge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import warnings
import zlib
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fxprune.errors import BadInputError, BadWeightsError, DataError, ScoringError
from fxprune.graph import Group, Member, layout_coords
from fxprune.passes import curvature
from fxprune.passes.base import check, class_registrar, fxpass
from fxprune.passes.stats import Collector, StatSpec
from fxprune.util.hf import linear_input_dim
from fxprune.util.loss import Batch, LossFn, count_tokens, default_loss, model_loss  # noqa: F401 - default_loss re-exported
from fxprune.util.modules import call as _call
from fxprune.util.modules import eval_mode as _eval_mode
from fxprune.util.modules import on_device
from fxprune.util.modules import resolve_device as _resolve_device
from fxprune.util.modules import to_device as _to_device
from fxprune.util.modules import unique_params

__all__ = [
    "AGGREGATES",
    "IMPORTANCE",
    "NORMALIZERS",
    "Importance",
    "Scores",
    "register_aggregate",
    "register_importance",
    "register_normalizer",
    "score",
]


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------

IMPORTANCE: dict[str, type["Importance"]] = {}
"""Importance criteria by name.  Add one with :func:`register_importance`."""

AGGREGATES: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {}
"""How the per-unit scores of a group's members combine into one score per unit."""

NORMALIZERS: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {}
"""How one group's scores are rescaled so that groups can be ranked against each other."""


register_importance = class_registrar(IMPORTANCE, lambda: Importance, "register_importance")
"""Class decorator: make an :class:`Importance` subclass available as ``importance=name``."""


def register_aggregate(name: str) -> Callable:
    """Function decorator: register ``fn(list_of_member_scores) -> scores`` as ``aggregate=name``."""

    def deco(fn: Callable[[list[np.ndarray]], np.ndarray]) -> Callable:
        AGGREGATES[name] = fn
        return fn

    return deco


def register_normalizer(name: str | None) -> Callable:
    """Function decorator: register ``fn(scores) -> scores`` as ``normalize=name``."""

    def deco(fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
        NORMALIZERS[name] = fn
        return fn

    return deco


def _lookup(registry: Mapping, key: Any, what: str) -> Any:
    try:
        return registry[key]
    except (KeyError, TypeError):
        known = sorted((k for k in registry if k is not None), key=str)
        extra = " or None" if None in registry else ""
        raise ScoringError(f"unknown {what} {key!r}; choose one of {known}{extra}.") from None


@register_aggregate("sum")
def _agg_sum(xs: list[np.ndarray]) -> np.ndarray:
    return np.sum(xs, axis=0)


@register_aggregate("mean")
def _agg_mean(xs: list[np.ndarray]) -> np.ndarray:
    return np.mean(xs, axis=0)


@register_aggregate("max")
def _agg_max(xs: list[np.ndarray]) -> np.ndarray:
    return np.max(xs, axis=0)


@register_aggregate("prod")
def _agg_prod(xs: list[np.ndarray]) -> np.ndarray:
    return np.prod(xs, axis=0)


def _safe_divide(s: np.ndarray, denom: float) -> np.ndarray:
    """Divide unless the denominator is 0 or not finite (an all-zero group stays all zero)."""
    if denom == 0 or not math.isfinite(denom):
        return s
    return s / denom


@register_normalizer("mean")
def _norm_mean(s: np.ndarray) -> np.ndarray:
    """Scores relative to the group's average unit: 1.0 = an average unit of this group."""
    return _safe_divide(s, float(np.mean(s)) if len(s) else 0.0)


@register_normalizer("max")
def _norm_max(s: np.ndarray) -> np.ndarray:
    """Scores relative to the group's best unit, in [0, 1]."""
    return _safe_divide(s, float(np.max(s)) if len(s) else 0.0)


@register_normalizer("sum")
def _norm_sum(s: np.ndarray) -> np.ndarray:
    """Scores as each unit's share of the group's total importance."""
    return _safe_divide(s, float(np.sum(s)))


@register_normalizer(None)
def _norm_none(s: np.ndarray) -> np.ndarray:
    """Raw scores (only comparable within a group)."""
    return s


# --------------------------------------------------------------------------------------------
# What gets scored
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """One parameter tensor that is a member of some group, with every dim that gets scored.

    Tied parameters (one tensor under several names) are a single target with several names.
    ``module``/``attr`` locate the owning module (for activation statistics).
    """

    param: nn.Parameter
    names: list[str]
    dims: set[int]
    module: nn.Module | None
    attr: str

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def input_dim(self) -> int | None:
        """Weight dim indexed by the owning layer's input features, or None (bias, norm...)."""
        if self.attr != "weight":
            return None
        return linear_input_dim(self.module)


@dataclasses.dataclass
class InputStats:
    """Running first and second moments of one layer's input features over calibration tokens."""

    total: torch.Tensor  # float64 [features]
    total_sq: torch.Tensor  # float64 [features]
    count: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of each feature over all tokens (Wanda's ``||X_j||^2``)."""
        return self.total_sq

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each feature over tokens (FLAP's fluctuation)."""
        n = max(self.count, 1)
        return (self.total_sq / n - self.mean**2).clamp_min(0.0)


@dataclasses.dataclass
class ScoringContext:
    """What a criterion can see: the scored targets and, after the passes, the statistics."""

    targets: dict[int, Target]  # keyed by id(param)
    input_stats: dict[int, InputStats] = dataclasses.field(default_factory=dict)  # id(module)
    n_batches: int = 0
    model: nn.Module | None = None
    unscored: set[str] = dataclasses.field(default_factory=set)  # groups no member of which got a score
    fallback: set[str] = dataclasses.field(default_factory=set)  # ... ranked by weight norm instead

    @functools.cached_property
    def by_name(self) -> dict[str, Target]:
        return {name: t for t in self.targets.values() for name in t.names}

    def stats_for(self, target: Target) -> InputStats | None:
        if target.module is None:
            return None
        return self.input_stats.get(id(target.module))

    @property
    def max_tokens(self) -> int:
        """Largest number of input rows any hooked layer saw (the 'N tokens' of the pass)."""
        return max((s.count for s in self.input_stats.values()), default=0)


def _collect_targets(model: nn.Module, groups: Sequence[Group]) -> dict[int, Target]:
    """Resolve every parameter member to its tensor; check dims against the real shapes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    targets: dict[int, Target] = {}
    for group in groups:
        for m in group.params:
            p = params.get(m.name) if m.name is not None else None
            if p is None:
                raise ScoringError(
                    f"group {group.id!r}: member {m.name!r} is not a parameter of the model; "
                    "were the groups computed for a different model?"
                )
            if not 0 <= m.dim < p.dim() or p.shape[m.dim] != m.dim_size:
                raise ScoringError(
                    f"group {group.id!r}: member {m.name!r} dim {m.dim} has size {m.dim_size} in "
                    f"the group but the parameter has shape {tuple(p.shape)}."
                )
            t = targets.get(id(p))
            if t is None:
                mod_name, _, attr = m.name.rpartition(".")
                module = model.get_submodule(mod_name) if mod_name else model
                t = targets[id(p)] = Target(p, [m.name], set(), module, attr)
            elif m.name not in t.names:
                t.names.append(m.name)
            t.dims.add(m.dim)
    return targets


@functools.lru_cache(maxsize=4096)
def _unit_index_map(layout: tuple, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(units, indices)`` pairs such that index ``indices[k]`` is covered by unit ``units[k]``.

    Vectorised equivalent of calling ``member.indices([u])`` for every unit: an index can be
    covered by several occurrences of the class (RoPE halves), so pairs are de-duplicated.
    """
    coords = layout_coords(layout).get(class_id, [])
    if not coords:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    idx = [np.nonzero(arr >= 0)[0] for arr in coords]
    units = np.concatenate([arr[i] for arr, i in zip(coords, idx)])
    idx_all = np.concatenate(idx)
    if len(coords) > 1:
        size = len(coords[0])
        codes = np.unique(units * size + idx_all)
        units, idx_all = codes // size, codes % size
    return units, idx_all


def unit_sums(member: Member, per_index: np.ndarray, size: int) -> np.ndarray:
    """Sum a per-index vector over each unit's indices: ``out[u] = sum(per_index[m.indices([u])])``."""
    units, idx = _unit_index_map(member.layout, member.class_id)
    if len(units) and units.max() >= size:
        raise ScoringError(
            f"member {member.name!r} has units up to {int(units.max())} but its group has {size}."
        )
    return np.bincount(units, weights=per_index[idx], minlength=size).astype(np.float64)


def _reduce_to(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum ``t`` over every dim except ``dim``; float64 result, float32 work for low precision."""
    others = [d for d in range(t.dim()) if d != dim]
    kwargs = {"dtype": torch.float32} if t.dtype in (torch.float16, torch.bfloat16) else {}
    out = t.sum(dim=others, **kwargs) if others else t.to(**kwargs) if kwargs else t
    return out.detach().to(torch.float64)


# --------------------------------------------------------------------------------------------
# Criteria
# --------------------------------------------------------------------------------------------


class Importance:
    """Base class of scoring criteria.

    Subclasses say what they need (``needs_grad``: backward passes with gradient hooks;
    ``needs_inputs``: forward passes with input-statistics hooks) and implement
    :meth:`index_scores` (one value per index along a member's dim) and optionally
    :meth:`finalize` (applied after summing over each unit's indices) or :meth:`group_scores`
    (to bypass members altogether, like ``random``).
    """

    name: ClassVar[str] = "?"
    needs_grad: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False
    drives_data: ClassVar[bool] = False  # runs its own statistics passes (see _CurvatureImportance)
    update_method: ClassVar[str] = "none"  # the weight update that goes with it (fxprune.passes.update)
    costs: ClassVar[bool] = False  # scores are removal costs in loss units (the "cost" allocation's input)
    uncosted_kinds: ClassVar[Mapping[str, str]] = {}  # kinds whose costs it cannot capture, and why

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._acc: dict[tuple[int, int, str], torch.Tensor] = {}
        self._batch_checks: list[tuple[str, torch.Tensor]] = []

    @property
    def needs_data(self) -> bool:
        return self.needs_grad or self.needs_inputs

    # -- accumulation helpers --------------------------------------------------------------
    def _add(self, target: Target, dim: int, slot: str, value: torch.Tensor) -> None:
        key = (id(target.param), dim, slot)
        prev = self._acc.get(key)
        self._acc[key] = value if prev is None else prev + value
        # checked once per batch (one device sync), see pop_nonfinite()
        self._batch_checks.append((target.name, torch.isfinite(value).all()))

    def _get(self, target: Target, dim: int, slot: str) -> torch.Tensor | None:
        return self._acc.get((id(target.param), dim, slot))

    def pop_nonfinite(self) -> str | None:
        """Name of the first parameter whose contribution this batch was NaN/inf, if any."""
        checks, self._batch_checks = self._batch_checks, []
        if not checks:
            return None
        ok = torch.stack([c for _, c in checks]).cpu()
        if bool(ok.all()):
            return None
        return checks[int((~ok).nonzero()[0, 0])][0]

    # -- hooks the scoring loop calls ----------------------------------------------------------
    def on_grad(self, target: Target, grad: torch.Tensor) -> None:
        """Fold one accumulated gradient into the statistics.  ``grad`` may be overwritten."""

    # -- turning statistics into scores -------------------------------------------------------
    def index_scores(self, target: Target, dim: int, ctx: ScoringContext) -> torch.Tensor | None:
        """Per-index importance along ``dim`` of ``target`` (None: this member cannot be scored)."""
        raise NotImplementedError

    def finalize(self, unit_values: np.ndarray) -> np.ndarray:
        """Map summed per-unit values to scores (identity by default)."""
        return unit_values

    def member_scores(
        self, group: Group, member: Member, target: Target, ctx: ScoringContext
    ) -> np.ndarray | None:
        per_index = self.index_scores(target, member.dim, ctx)
        if per_index is None:
            return None
        values = per_index.detach().to("cpu", torch.float64).numpy()
        return self.finalize(unit_sums(member, values, group.size))

    def group_scores(
        self,
        group: Group,
        ctx: ScoringContext,
        aggregate: Callable[[list[np.ndarray]], np.ndarray],
    ) -> np.ndarray:
        """Per-unit scores of one group: aggregate the scores of its distinct parameter members."""
        seen: set[tuple] = set()
        per_member: list[np.ndarray] = []
        for m in group.params:
            target = ctx.by_name[m.name]
            key = (id(target.param), m.dim, m.layout, m.class_id)
            if key in seen:  # tied aliases / duplicate members count once
                continue
            seen.add(key)
            s = self.member_scores(group, m, target, ctx)
            if s is not None:
                per_member.append(s)
        if not per_member:
            return _norm_fallback(self.name, group, ctx, aggregate)
        return np.asarray(aggregate(per_member), dtype=np.float64)


def _norm_fallback(name: str, group: Group, ctx: ScoringContext,
                   aggregate: Callable[[list[np.ndarray]], np.ndarray]) -> np.ndarray:
    """Scores of a group ``name`` could score no member of (fused 3-D experts under forward hooks).

    Its units are ranked by weight norm instead (``Scores.fallback``): comparable within the
    group, so a uniform allocation uses them, but not with other groups' scores, so any other
    allocation keeps the group whole.  Without a parameter to rank by, it is not pruned at all
    (``Scores.unscored``): never are its units taken as free.
    """
    readable = all(ctx.by_name[m.name].param.device.type != "meta" for m in group.params if m.name in ctx.by_name)
    if group.params and name != "l2" and readable:  # (sequential mode scores a model on meta)
        warnings.warn(f"importance {name!r} cannot score any member of group {group.id!r}; its units are ranked "
                      "by weight norm (l2) instead, and it is pruned only under allocation='uniform'.", stacklevel=5)
        ctx.fallback.add(group.id)
        return L2Importance().group_scores(group, ctx, aggregate)
    warnings.warn(f"importance {name!r} cannot score any member of group {group.id!r}; it is not pruned.",
                  stacklevel=5)
    ctx.unscored.add(group.id)
    return np.zeros(group.size, dtype=np.float64)


class _GradImportance(Importance):
    """Shared plumbing of the Taylor family: multiply the gradient by the weight in place."""

    needs_grad = True

    def on_grad(self, target: Target, grad: torch.Tensor) -> None:
        w = target.param.detach()
        # The gradient is ours to destroy (it is dropped right after this hook), so reuse its
        # storage for w*g instead of allocating a second weight-sized tensor.
        if grad.is_contiguous() and grad.dtype == w.dtype and not grad.is_sparse:
            prod = grad.mul_(w)
        else:
            prod = grad.to_dense() * w if grad.is_sparse else grad * w
        self.fold(target, prod)

    def fold(self, target: Target, prod: torch.Tensor) -> None:
        raise NotImplementedError

    def _mean(self, target: Target, dim: int, slot: str, ctx: ScoringContext) -> torch.Tensor:
        acc = self._get(target, dim, slot)
        if acc is None:  # parameter received no gradient (unused in the loss)
            return torch.zeros(target.param.shape[dim], dtype=torch.float64)
        return acc / max(ctx.n_batches, 1)


@register_importance("taylor")
class TaylorImportance(_GradImportance):
    """First-order Taylor, vector-wise (LLM-Pruner): ``|sum_{k in unit} w_k * G_k|``.

    ``G`` is the gradient of the mean calibration loss (the per-batch gradients averaged), so the
    score estimates ``|L(w) - L(w with the unit zeroed)|`` to first order.  The sign is kept per
    index and the absolute value is taken only after summing over the unit's slice of a member.
    """

    def fold(self, target: Target, prod: torch.Tensor) -> None:
        for d in target.dims:
            self._add(target, d, "wg", _reduce_to(prod, d))

    def index_scores(self, target, dim, ctx):
        return self._mean(target, dim, "wg", ctx)

    def finalize(self, unit_values: np.ndarray) -> np.ndarray:
        return np.abs(unit_values)


@register_importance("taylor-element")
class TaylorElementImportance(_GradImportance):
    """First-order Taylor, element-wise: ``sum_{k in unit} |w_k * g_k|``.

    Unlike LLM-Pruner's element-wise variant (which takes ``|w*G|`` of the gradient accumulated
    over the whole calibration set), the absolute value is taken per batch, averaged over batches:
    keeping ``G`` element-wise until the end would need a weight-sized buffer per parameter,
    exactly the memory this pass avoids.
    """

    def fold(self, target: Target, prod: torch.Tensor) -> None:
        prod = prod.abs_()
        for d in target.dims:
            self._add(target, d, "abs_wg", _reduce_to(prod, d))

    def index_scores(self, target, dim, ctx):
        return self._mean(target, dim, "abs_wg", ctx)


@register_importance("taylor-2")
class SecondOrderTaylorImportance(_GradImportance):
    """Second-order Taylor with a diagonal Fisher Hessian (LLM-Pruner's ``param_mix``).

    Per unit: ``| sum_{k in unit} ( w_k G_k - 1/2 * w_k^2 F_kk ) |`` where ``G`` is the mean
    gradient over calibration batches and ``F_kk = mean_b g_{b,k}^2`` approximates the Hessian
    diagonal (empirical Fisher).  This is the Taylor estimate of the loss change when the unit is
    removed: ``-g.w + 1/2 w^T H w`` with ``H`` diagonal (same magnitude, LLM-Pruner's sign).
    The sum runs over the unit's slice before the absolute value (vector-wise), because the
    element-wise form would need weight-sized ``G``/``F`` buffers.  With ``batch_size > 1`` the
    Fisher uses per-batch rather than per-sample gradients.
    """

    def fold(self, target: Target, prod: torch.Tensor) -> None:
        for d in target.dims:
            self._add(target, d, "wg", _reduce_to(prod, d))
        prod = prod.square_()  # (w*g)^2 = w^2 g^2
        for d in target.dims:
            self._add(target, d, "w2g2", _reduce_to(prod, d))

    def index_scores(self, target, dim, ctx):
        first = self._mean(target, dim, "wg", ctx)
        fisher = self._mean(target, dim, "w2g2", ctx)
        return first - 0.5 * fisher

    def finalize(self, unit_values: np.ndarray) -> np.ndarray:
        return np.abs(unit_values)


@register_importance("l1")
class L1Importance(Importance):
    """Weight magnitude ``sum |w|`` over the unit's slices.  Needs no data."""

    def index_scores(self, target, dim, ctx):
        return _reduce_to(target.param.detach().abs(), dim)


@register_importance("l2")
class L2Importance(Importance):
    """Weight norm ``sqrt(sum w^2)`` over each member's slice of the unit.  Needs no data."""

    def index_scores(self, target, dim, ctx):
        w = target.param.detach()
        return _reduce_to(w * w, dim)

    def finalize(self, unit_values: np.ndarray) -> np.ndarray:
        return np.sqrt(unit_values)


def _broadcast_input_stat(target: Target, stat: torch.Tensor) -> torch.Tensor:
    """Reshape a per-input-feature vector so it broadcasts against the weight's elements.

    Handles Linear ``[out, in]``, HF Conv1D ``[in, out]`` and ConvNd ``[out, in/groups, *k]``
    (for grouped convolutions, output channel ``o`` sees input channels of its own group).
    """
    w = target.param
    in_dim = target.input_dim
    assert in_dim is not None
    shape = [1] * w.dim()
    groups = getattr(target.module, "groups", 1) if isinstance(target.module, nn.modules.conv._ConvNd) else 1
    if groups == 1:
        shape[in_dim] = w.shape[in_dim]
        return stat.to(w.device).view(shape)
    out = w.shape[0]
    per_group = stat.view(groups, -1).repeat_interleave(out // groups, dim=0)  # [out, in/groups]
    return per_group.to(w.device).view(out, w.shape[1], *([1] * (w.dim() - 2)))


@register_importance("activation")
class ActivationImportance(Importance):
    """Wanda-sp: ``|W_ij| * ||X_j||_2`` summed over the unit's slices.

    ``||X_j||`` is the L2 norm over all calibration tokens of input feature ``j`` of the
    Linear/Conv layer that owns the weight, gathered by forward hooks.  The element score is the
    same whichever dim the member prunes: for an input-dim member (a column) it is
    ``||X_j|| * sum_i |W_ij|`` (structured Wanda as in the FLAP paper), for an output-dim member
    (a row) it is ``sum_j |W_ij| * ||X_j||``, the row's contribution weighted by how large its
    inputs are.  Parameters that do not multiply a layer input (biases, norm scales, embedding
    tables) are treated as weights on a constant input of 1 over the N calibration tokens:
    ``|w| * sqrt(N)``, which keeps them on the same scale as the Linear terms.
    """

    needs_inputs = True

    def index_scores(self, target, dim, ctx):
        w = target.param.detach()
        stats = ctx.stats_for(target)
        if target.input_dim is not None and stats is not None:
            norm = _broadcast_input_stat(target, stats.sq_norm.sqrt().to(torch.float32))
            return _reduce_to(w.abs().float() * norm, dim)
        return _reduce_to(w.abs(), dim) * math.sqrt(max(ctx.max_tokens, 1))


@register_importance("flap")
class FlapImportance(Importance):
    """FLAP fluctuation metric: ``Var(X_j) * ||W_{:,j}||^2`` for input channel ``j``.

    ``Var`` is the population variance over calibration tokens of the owning layer's input
    feature (forward hooks).  A feature that barely fluctuates can be replaced by its mean, which
    is why FLAP pairs this metric with bias compensation (``b += W[:, removed] @ mean``); the
    per-feature means are returned by :func:`score` as ``Scores.input_mean``.
    Only members on a Linear/Conv weight's *input* dim are scored (that is where the metric is
    defined: ``o_proj``/``down_proj`` columns for heads/MLP channels); other members are skipped.
    """

    needs_inputs = True
    update_method = "flap"

    def index_scores(self, target, dim, ctx):
        stats = ctx.stats_for(target)
        if target.input_dim is None or dim != target.input_dim or stats is None:
            return None
        w = target.param.detach().float()
        var = _broadcast_input_stat(target, stats.var.to(torch.float32))
        return _reduce_to(w * w * var, dim)


@register_importance("random")
class RandomImportance(Importance):
    """Uniform random scores, seeded per (seed, group id): a baseline for ablations.

    Seeding per group id (not by position) keeps a group's scores the same whatever other groups
    are scored alongside it.
    """

    def index_scores(self, target, dim, ctx):  # pragma: no cover - group_scores overrides
        return None

    def group_scores(self, group, ctx, aggregate):
        rng = np.random.default_rng([self.seed, zlib.crc32(group.id.encode())])
        return rng.random(group.size)


class _CurvatureImportance(Importance):
    """Shared plumbing of the curvature criteria: statistics gathered with module hooks, costs per
    layer (:mod:`fxprune.passes.curvature`), summed over each group's members.

    Scores are the costs themselves (higher = more expensive to remove = keep), in per-token loss
    units for ``surgeon`` and in output-reconstruction error per token for ``obs``; the ``cost``
    allocation ranks them by cost per removed parameter across groups and kinds.  ``aggregate``
    is not used: a unit's cost is by definition the sum over the members it removes.

    Options (``score(importance_options=...)``): ``damping`` (relative, default 0.01),
    ``budget`` (bytes of statistics held at once; default ``max(weight bytes / 2, 128 MiB)``, which keeps the peak under 3x the weights: larger
    models are gathered in chunks of consecutive layers, and the update re-gathers), ``relative``
    (obs: divide by the layer's output energy, default False).
    """

    needs_inputs = True
    drives_data = True
    costs = True
    method: ClassVar[str] = "?"

    def __init__(self, seed: int = 0, damping: float | None = None, budget: int | None = None,
                 relative: bool = False) -> None:
        super().__init__(seed)
        # the default damping, 0.01 · mean(diag), is raised for surgeon's A to its Ledoit-Wolf
        # shrinkage where the calibration batches disagree (curvature.shrinkage); a damping given
        # explicitly is used as it is
        self.damping = curvature.DAMPING if damping is None else float(damping)
        self.shrink = damping is None
        self.budget = budget
        self.relative = bool(relative)
        self._costs: dict[str, np.ndarray] = {}
        self._uncosted: set[str] = set()  # groups no member of which got a cost
        self.how: dict[str, str] = {}
        self.source: curvature.CurvatureSource | None = None
        self.reduce_stats: Callable[[Any], Any] | None = None  # set by a distributed sync's prepare()

    def run(self, model: nn.Module, groups: Sequence[Group], batches: Sequence[Batch], ctx: ScoringContext, *,
            device: torch.device, loss_fn: LossFn | None, progress: bool) -> int:
        batches = list(batches)
        if self.source is None:  # sequential mode brings its own (block by block)
            budget = self.budget
            if budget is None:
                weight_bytes = sum(p.numel() * p.element_size() for p in unique_params(model))
                budget = max(weight_bytes // 2, 128 * 2**20)
            self.source = curvature.CurvatureSource(model, batches, loss_fn=loss_fn, device=device, budget=budget,
                                                    progress=progress, reduce=self.reduce_stats)
        self.source.damping, self.source.shrink = self.damping, self.shrink
        gc = curvature.group_costs(model, groups, self.source, self.method, damping=self.damping,
                                   relative=self.relative)
        self._costs, self.how = dict(gc.costs), dict(gc.how)
        self._uncosted = set(gc.unscored)
        ctx.n_batches = len(batches)
        return sum(count_tokens(b) for b in batches)

    def index_scores(self, target, dim, ctx):  # pragma: no cover - group_scores overrides
        return None

    def group_scores(self, group, ctx, aggregate):
        if group.id in self._uncosted:  # no member costed: ranked by weight norm, as the others do
            return _norm_fallback(self.name, group, ctx, aggregate)
        return self._costs[group.id]


@register_importance("surgeon")
class SurgeonImportance(_CurvatureImportance):
    """The LLM Surgeon (van der Ouderaa et al., 2024), structured: K-FAC costs of each unit's rows
    (producers) and columns (consumers), ``A = E[x xᵀ]`` (bias column appended) and
    ``G = E[g gᵀ]`` from the empirical Fisher of the loss (``loss_fn=curvature.sampled_label_loss``
    for sampled labels); members that are no linear contraction (embeddings, norms) add their
    first-order output Taylor term.  Its update (``update_method="surgeon"``) moves the surviving
    rows via ``G̃⁻¹`` and columns via ``Ã⁻¹`` for all units removed in a layer at once.
    """

    method = "surgeon"
    update_method = "surgeon"
    multi_shot = True  # shots="auto" re-gathers: 50% on the benchmark LM, 26.7 ppl in 3 shots vs 64.5 in one


@register_importance("obs")
class ObsImportance(_CurvatureImportance):
    """Layer-wise OBS (ZipLM-style), forward only: ``H = E[x xᵀ]`` of every consumer layer; a
    unit's cost is ``½ tr(W_M (H̃⁻¹_MM)⁻¹ W_Mᵀ)`` over the consumer columns it removes, summed
    over consumers.  Its update
    (``update_method="obs"``) reconstructs each consumer's output from its kept inputs:
    ``W_K += W_M H_MK H_KK⁻¹``.
    """

    method = "obs"
    update_method = "obs"
    uncosted_kinds = {
        "head_dim": "forward-only OBS costs the o_proj side of a head_dim unit, not the change of the q·k "
                    "attention scores (enable it with kinds={'head_dim': True})",
        "hidden": "forward-only OBS reconstructs each consumer of the residual stream on its own and does not "
                  "see the norms' rescaling nor the stream's other readers, so hidden units look far cheaper "
                  "than they are (on the benchmark LM: 2.5x the perplexity of surgeon at 20%); enable it with "
                  "kinds={'hidden': True}, or use importance='surgeon', whose gradients see the whole network",
    }


# --------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scores(Mapping[str, np.ndarray]):
    """The scoring pass' result: per-unit scores of every group, plus the statistics gathered.

    It is a read-only mapping ``{group_id: float64 array of group.size scores}`` (higher means
    more important), so the planner takes it as it is.

    ``input_mean`` maps the weight FQN of every hooked Linear/Conv layer to the mean of each of
    its input features over the calibration tokens (filled by criteria with forward hooks,
    ``activation`` and ``flap``); the update pass uses it for FLAP-style bias compensation.
    """

    by_group: Mapping[str, np.ndarray]
    importance: str
    aggregate: str = "sum"
    normalize: str | None = "mean"
    n_batches: int = 0
    n_tokens: int = 0
    input_mean: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    input_count: Mapping[str, int] = dataclasses.field(default_factory=dict)
    raw: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    stats: Any = None  # curvature criteria: the CurvatureSource the update pass reads
    member_methods: Mapping[str, str] = dataclasses.field(default_factory=dict)
    is_cost: bool = False  # raw scores are removal costs (curvature criteria)
    uncosted_kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # groups the criterion could score no member of (fused 3-D experts under forward hooks): the
    # planner leaves them whole instead of taking their all-zero scores as free
    unscored: frozenset[str] = frozenset()
    # groups ranked by weight norm because the criterion could score none of their members: their
    # scores order their own units only, so only a uniform allocation uses them
    fallback: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        frozen = {}
        for k, v in self.by_group.items():
            arr = np.array(v, dtype=np.float64)
            arr.setflags(write=False)
            frozen[k] = arr
        object.__setattr__(self, "by_group", types.MappingProxyType(frozen))
        object.__setattr__(self, "input_mean", types.MappingProxyType(dict(self.input_mean)))
        object.__setattr__(self, "input_count", types.MappingProxyType(dict(self.input_count)))
        raw = {}
        for k, v in (self.raw or self.by_group).items():
            arr = np.array(v, dtype=np.float64)
            arr.setflags(write=False)
            raw[k] = arr
        object.__setattr__(self, "raw", types.MappingProxyType(raw))
        object.__setattr__(self, "member_methods", types.MappingProxyType(dict(self.member_methods)))

    @property
    def update_method(self) -> str:
        """The weight update that goes with this criterion (``"none"`` for most); the width
        criterion's in a combined one (``"surgeon+reap"``: experts or blocks scored beside it)."""
        cls = IMPORTANCE.get(self.importance.partition("+")[0])
        return cls.update_method if cls is not None else "none"

    def __getitem__(self, group_id: str) -> np.ndarray:
        return self.by_group[group_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_group)

    def __len__(self) -> int:
        return len(self.by_group)

    def __repr__(self) -> str:
        return f"Scores(importance={self.importance!r}, groups={len(self.by_group)}, batches={self.n_batches})"


@contextlib.contextmanager
def _gradient_session(
    model: nn.Module, targets: dict[int, Target], crit: Importance
) -> Iterator[None]:
    """Only member parameters require grad; each folds its gradient away as soon as it is ready.

    On exit (also on error) the hooks are removed, requires_grad flags and any ``.grad`` the
    user had are restored, and no gradient of ours is left behind.
    """
    all_params = unique_params(model)
    saved_flags = {id(p): p.requires_grad for p in all_params}
    saved_grads = {id(p): p.grad for p in all_params}
    handles = []

    def make_hook(target: Target) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            grad = p.grad
            p.grad = None  # drop our reference first: the criterion may reuse the storage
            if grad is not None:
                crit.on_grad(target, grad)

        return hook

    try:
        for p in all_params:
            p.grad = None
            p.requires_grad_(id(p) in targets)
        for target in targets.values():
            handles.append(target.param.register_post_accumulate_grad_hook(make_hook(target)))
        yield
    finally:
        for h in handles:
            h.remove()
        for p in all_params:
            p.requires_grad_(saved_flags[id(p)])
            p.grad = saved_grads[id(p)]


@contextlib.contextmanager
def _input_hooks(targets: dict[int, Target], ctx: ScoringContext) -> Iterator[Collector]:
    """Input moments of every Linear/Conv owning a member weight, from the statistics pass' hooks."""
    modules: dict[str, nn.Module] = {}
    for t in targets.values():
        if t.input_dim is not None:
            modules[t.name.rpartition(".")[0]] = t.module
    device = next((p.device for p in (t.param for t in targets.values())), torch.device("cpu"))
    with Collector(modules, StatSpec(input_moments=True), device=device, dtype=torch.float64) as col:
        yield col


def _fill_input_stats(col: Collector, ctx: ScoringContext) -> None:
    for name, ls in col.result().items():
        ctx.input_stats[id(col.layers[name])] = InputStats(ls.x_sum, ls.x_sq, ls.count)


def _progress(batches: Iterable[Batch], name: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=f"scoring ({name})", disable=not enabled, leave=False)


def check_loss(loss: Any, i: int) -> float:
    """The value of batch ``i``'s loss, which must be a finite scalar that has a gradient."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ScoringError(f"batch {i}: the loss must be a scalar tensor, got {type(loss).__name__}.")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ScoringError(f"batch {i}: loss is {value}; check the model and this batch's inputs.")
    if not loss.requires_grad:
        raise ScoringError(
            f"batch {i}: the loss does not depend on any grouped parameter, so it has no gradient."
        )
    return value


def _run_backward(
    model: nn.Module,
    batches: Iterable[Batch],
    crit: Importance,
    ctx: ScoringContext,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    loss_fn: LossFn | None,
    progress: bool,
    collector: Collector | None = None,
) -> int:
    """One forward+backward per batch; gradients are folded by the hooks.  Returns #tokens."""
    tokens = 0
    bar = _progress(batches, crit.name, progress)
    for i, batch in enumerate(bar):
        if collector is not None:
            collector.next_batch(scale=float(max(count_tokens(batch), 1)))
        batch = _to_device(batch, device)
        with autocast:
            loss = model_loss(model, batch, loss_fn)
        value = check_loss(loss, i)
        loss.backward()
        del loss
        bad = crit.pop_nonfinite()
        if bad is not None:
            raise ScoringError(f"batch {i}: non-finite gradient for parameter {bad!r}.")
        ctx.n_batches += 1
        tokens += count_tokens(batch)
        if progress:
            bar.set_postfix(loss=f"{value:.4g}")
    return tokens


def _run_forward(
    model: nn.Module,
    batches: Iterable[Batch],
    crit: Importance,
    ctx: ScoringContext,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    progress: bool,
    collector: Collector | None = None,
) -> int:
    """Forward passes only (no graph kept); the input hooks gather statistics.  Returns #tokens."""
    tokens = 0
    with torch.no_grad():
        for batch in _progress(batches, crit.name, progress):
            if collector is not None:
                collector.next_batch()
            batch = _to_device(batch, device)
            with autocast:
                _call(model, batch)
            ctx.n_batches += 1
            tokens += count_tokens(batch)
    return tokens


def _autocast(device: torch.device, dtype: torch.dtype | None, model: nn.Module) -> Any:
    """Compute in ``dtype`` via autocast, never by casting the weights.

    Casting fp32 weights to bf16 and back would silently round the caller's model; autocast runs
    the matmuls in ``dtype`` and leaves the parameters untouched.
    """
    if dtype is None:
        return contextlib.nullcontext()
    param_dtype = next(model.parameters()).dtype
    if dtype == param_dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _groups_of(groups: Any) -> list[Group]:
    return list(groups.groups) if hasattr(groups, "groups") else list(groups)


def _score_requires(model: Any, groups: Any, *args: Any, **kwargs: Any) -> None:
    check(isinstance(model, nn.Module), BadInputError, f"score() needs the nn.Module, got {type(model).__name__}")
    check(all(isinstance(g, Group) for g in _groups_of(groups)), BadInputError,
          "score() needs the Analysis from fxprune.analyze (or its groups)")


def _score_ensures(result: Scores) -> None:
    for gid, s in result.items():
        check(bool(np.all(np.isfinite(s))), ScoringError, f"group {gid!r}: non-finite scores")


@fxpass("score", requires=_score_requires, ensures=_score_ensures)
def score(
    model: nn.Module,
    groups: Sequence[Group],
    batches: Iterable[Batch] | None = None,
    *,
    importance: str = "taylor",
    aggregate: str = "sum",
    normalize: str | None = "mean",
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    progress: bool = True,
    sync: Callable[[Importance, ScoringContext, int], int] | None = None,
    importance_options: Mapping[str, Any] | None = None,
) -> Scores:
    """Score every unit of every group; higher means more important.

    Args:
        model: the eager ``nn.Module`` the groups were computed for (parameters are looked up by
            the members' FQNs).
        groups: the :class:`~fxprune.passes.analysis.Analysis` (or a sequence of its groups).
        batches: calibration batches (dicts are passed as keyword args, tuples/lists as positional
            args, a tensor as the single argument).  Not needed for ``l1``, ``l2``, ``random``.
        importance: a name in :data:`IMPORTANCE`: ``taylor`` (default), ``taylor-element``,
            ``taylor-2``, ``l1``, ``l2``, ``activation`` (Wanda-sp), ``flap``, ``random``.
        aggregate: how member scores combine, a name in :data:`AGGREGATES`.
        normalize: per-group rescaling so units rank across groups, a name in
            :data:`NORMALIZERS`: ``"mean"`` (scores / group mean: 1.0 is an average unit of its
            group, so a global planner compares units by how they stand *within* their group,
            independent of the layer's overall scale), ``"max"``, ``"sum"`` or None.
        device: where to run the passes; ``"auto"`` = CUDA if available, else CPU.  The model is
            moved there and back.
        dtype: compute dtype (e.g. ``torch.bfloat16``), applied with autocast; weights are not cast.
        loss_fn: ``loss_fn(output, batch) -> scalar``.  Without it: HF models that take
            ``labels`` get ``labels=input_ids`` and their ``.loss``; anything else uses
            :func:`default_loss` (sum of squares of the outputs).
        seed: seeds torch during the pass and the ``random`` criterion.
        progress: show a tqdm bar over batches.
        sync: ``sync(criterion, context, tokens) -> tokens``, called once after the calibration
            passes and before any score is computed, to sum the accumulated state over data
            shards (``fxprune.distributed.DistContext.reduce_scoring``: each rank scores its shard);
            its ``prepare(criterion, context)``, if it has one, runs before the passes.
        importance_options: keyword options of the criterion (``surgeon``/``obs``: ``damping``,
            ``budget``, ``relative``).

    Returns:
        :class:`Scores`, a read-only ``{group.id: float64 array of group.size scores}`` with the
        statistics gathered on the way.

    Raises:
        ScoringError: unknown criterion/aggregate/normalizer, groups that do not match the model,
            or a NaN/inf loss or gradient (the message names the batch and parameter).
        DataError: a data-driven criterion without batches.
    """
    crit_cls = _lookup(IMPORTANCE, importance, "importance criterion")
    agg = _lookup(AGGREGATES, aggregate, "aggregate")
    norm = _lookup(NORMALIZERS, normalize, "normalize")
    try:
        crit = crit_cls(seed=seed, **dict(importance_options or {}))
    except TypeError as exc:
        raise ScoringError(f"importance {importance!r} does not take options {dict(importance_options or {})}: {exc}") from None
    groups = _groups_of(groups)
    targets = _collect_targets(model, groups)
    _check_finite_weights(targets)
    ctx = ScoringContext(targets, model=model)
    if crit.needs_data and batches is None:
        raise DataError(
            f"importance {importance!r} needs calibration batches (see fxprune.calib.load_calibration); "
            "'l1', 'l2' and 'random' need none."
        )
    tokens = 0
    if sync is not None and callable(getattr(sync, "prepare", None)):
        sync.prepare(crit, ctx)
    if crit.needs_data and targets:
        dev = _resolve_device(device)
        with contextlib.ExitStack() as stack:
            dev = stack.enter_context(on_device(model, dev))
            stack.enter_context(_eval_mode(model))
            stack.enter_context(torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []))
            torch.manual_seed(seed)
            collector = (stack.enter_context(_input_hooks(targets, ctx))
                         if crit.needs_inputs and not crit.drives_data else None)
            autocast = _autocast(dev, dtype, model)
            if crit.drives_data:
                tokens = crit.run(model, groups, batches, ctx, device=dev, loss_fn=loss_fn, progress=progress)
            elif crit.needs_grad:
                stack.enter_context(_gradient_session(model, targets, crit))
                tokens = _run_backward(model, batches, crit, ctx, dev, autocast, loss_fn, progress, collector)
            else:
                tokens = _run_forward(model, batches, crit, ctx, dev, autocast, progress, collector)
            if collector is not None:
                _fill_input_stats(collector, ctx)
            if sync is not None:
                tokens = sync(crit, ctx, tokens)
            if ctx.n_batches == 0:
                raise DataError("no calibration batches: the batches iterable was empty.")
            scores, raw = _all_group_scores(groups, crit, ctx, agg, norm)
            means, counts = _input_means(targets, ctx)
    else:
        scores, raw = _all_group_scores(groups, crit, ctx, agg, norm)
        means, counts = {}, {}
    return Scores(scores, importance, aggregate, normalize, ctx.n_batches, tokens, means, counts, raw,
                  getattr(crit, "source", None), getattr(crit, "how", {}), crit.costs, dict(crit.uncosted_kinds),
                  frozenset(ctx.unscored), frozenset(ctx.fallback))


def _check_finite_weights(targets: dict[int, Target]) -> None:
    """A NaN or inf weight makes every criterion meaningless: name the parameter up front."""
    for t in targets.values():
        p = t.param
        if p.device.type == "meta" or not p.dtype.is_floating_point:
            continue
        bad = ~torch.isfinite(p.detach())
        if bool(bad.any()):
            first = [int(i) for i in bad.nonzero()[0].tolist()]
            kinds = [k for k, f in (("NaN", torch.isnan), ("inf", torch.isinf)) if bool(f(p.detach()).any())]
            raise BadWeightsError(
                f"parameter {t.name} holds {int(bad.sum())} {'/'.join(kinds)} value(s) (first at index {first}); "
                "the checkpoint is corrupt or its training diverged"
            )


def _all_group_scores(
    groups: Sequence[Group],
    crit: Importance,
    ctx: ScoringContext,
    agg: Callable[[list[np.ndarray]], np.ndarray],
    norm: Callable[[np.ndarray], np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    out: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    for g in groups:
        raw[g.id] = np.asarray(crit.group_scores(g, ctx, agg), dtype=np.float64)
        s = np.asarray(norm(raw[g.id]), dtype=np.float64)
        if s.shape != (g.size,):
            raise ScoringError(f"group {g.id!r}: got {s.shape} scores for {g.size} units.")
        if not np.all(np.isfinite(s)):
            raise ScoringError(
                f"group {g.id!r}: non-finite scores (aggregate/normalize overflow?)."
            )
        out[g.id] = s
    return out, raw


def _input_means(
    targets: dict[int, Target], ctx: ScoringContext
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    means: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for t in targets.values():
        stats = ctx.stats_for(t)
        if stats is not None and t.input_dim is not None:
            for name in t.names:
                means[name] = stats.mean.cpu().numpy()
                counts[name] = stats.count
    return means, counts
