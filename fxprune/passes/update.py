"""Update pass: compensate the surviving weights for the units a plan removes.

    (nn.Module, Analysis, Plan, stats) --update--> WeightUpdate --rewrite--> RewriteResult

It sits between planning and rewriting.  Its output, a :class:`WeightUpdate`, is *the one source
of weights* both rewrites read: the graph rewrite slices its parameters from it, the module
rewrite loads it into the copy of the user's module before slicing, and verification compares
the result with the *updated* model whose removed units are zeroed (the same oracle as without
an update).

Update methods live in the :data:`UPDATES` registry (``register_update``); each takes the model,
the analysis, the plan and the statistics gathered for it, and returns the tensors it changed or
added.  ``"none"`` (the default) changes nothing and copies nothing.  The others:

* ``"surgeon"``: the LLM Surgeon's correlated K-FAC update of the surviving rows (``G̃⁻¹``) and
  columns (``Ã⁻¹``) of every layer the plan touches, all removed units of a layer at once;
* ``"obs"``: layer-wise OBS, each consumer's output reconstructed from its kept inputs
  (``W_K += W_M H_MK H_KK⁻¹``);
* ``"flap"``: FLAP's bias compensation ``b += W[:, P] · x̄[P]`` for the removed input columns
  ``P`` (a bias is *added* to linear layers that have none).

The curvature methods read their statistics through the scoring pass' ``Scores.stats`` (a
:class:`~fxprune.passes.curvature.CurvatureSource`: kept from scoring when they fit its memory
budget, re-gathered chunk by chunk otherwise), or a :class:`~fxprune.passes.stats.Stats` given
directly.  The math is in :mod:`fxprune.passes.curvature`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fxprune.errors import BadInputError, PlanError
from fxprune.passes import curvature
from fxprune.passes.base import check, fxpass
from fxprune.passes.plan import Plan, as_plan
from fxprune.util.modules import set_tensor

__all__ = ["UPDATES", "WeightUpdate", "register_update", "update", "model_tensors", "flap_compensation"]

UpdateFn = Callable[[nn.Module, Any, Plan, Any], "UpdateOutput"]


@dataclasses.dataclass(frozen=True)
class UpdateOutput:
    """What an update method returns: tensors it changed (same shape), tensors it added, notes."""

    changed: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    added: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # layers the method could not compensate (named in the notes)


UPDATES: dict[str, UpdateFn] = {}
"""Weight-update methods by name."""


def register_update(name: str) -> Callable[[UpdateFn], UpdateFn]:
    """Function decorator: make ``fn(model, analysis, plan, stats) -> UpdateOutput`` ``method=name``."""

    def deco(fn: UpdateFn) -> UpdateFn:
        UPDATES[name] = fn
        return fn

    return deco


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by every name it has (tied tensors under each)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = p
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            out[name] = b
    return out


@dataclasses.dataclass(frozen=True)
class WeightUpdate:
    """The weights the rewrite applies the plan to.

    ``changed`` maps FQNs to new values of existing tensors (full, unpruned shapes; every name of
    a tied tensor); ``added`` maps FQNs of tensors the model does not have yet (a bias that
    compensation adds) to their values.  Everything else is the model's own tensor, unchanged.
    """

    method: str
    changed: Mapping[str, torch.Tensor]
    added: Mapping[str, torch.Tensor]
    notes: tuple[str, ...] = ()

    @property
    def is_identity(self) -> bool:
        return not self.changed and not self.added

    def tensor(self, model_tensors: Mapping[str, torch.Tensor], fqn: str) -> torch.Tensor:
        """The value of ``fqn`` after the update."""
        if fqn in self.changed:
            return self.changed[fqn]
        return model_tensors[fqn]

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Write the update into ``model`` in place (a copy the caller owns); returns it."""
        with torch.no_grad():
            for fqn, value in self.changed.items():
                set_tensor(model, fqn, value.detach().clone())
            for fqn, value in self.added.items():
                set_tensor(model, fqn, value.detach().clone())
        return model


IDENTITY = WeightUpdate("none", types.MappingProxyType({}), types.MappingProxyType({}))


@register_update("none")
def _no_update(model: nn.Module, analysis: Any, plan: Plan, stats: Any) -> UpdateOutput:
    return UpdateOutput()


def _curvature_source(stats: Any, method: str) -> "curvature.CurvatureSource":
    from fxprune.passes.stats import Stats

    source = getattr(stats, "stats", None) if not isinstance(stats, Stats) else None
    if isinstance(source, curvature.CurvatureSource):
        return source
    if isinstance(stats, Stats):
        src = curvature.CurvatureSource(None, [])
        src.kept = stats
        return src
    raise PlanError(f"update {method!r} needs curvature statistics: the Scores of importance='surgeon'/'obs', "
                    "or fxprune.passes.stats.Stats with input (and, for surgeon, gradient) covariances")


def _curvature_update(method: str) -> UpdateFn:
    def fn(model: nn.Module, analysis: Any, plan: Plan, stats: Any) -> UpdateOutput:
        source = _curvature_source(stats, method)
        changed, notes = curvature.plan_update(model, analysis, plan, source, method,
                                               damping=getattr(source, "damping", curvature.DAMPING))
        return UpdateOutput(changed, {}, tuple(notes))

    fn.__name__ = f"_{method}_update"
    fn.__doc__ = f"The {method!r} weight update (see :func:`fxprune.passes.curvature.plan_update`)."
    return fn


register_update("surgeon")(_curvature_update("surgeon"))
register_update("obs")(_curvature_update("obs"))


@register_update("flap")
def _flap_update(model: nn.Module, analysis: Any, plan: Plan, stats: Any) -> UpdateOutput:
    """FLAP's bias compensation from the scoring pass' input means (``Scores.input_mean``)."""
    return flap_compensation(model, analysis, plan, stats)


def flap_compensation(model: nn.Module, analysis: Any, plan: Plan, stats: Any,
                      removals: Mapping[str, tuple[Any, Any]] | None = None) -> UpdateOutput:
    """``b += W[:, P] · x̄[P]`` for the removed input columns ``P`` of every layer the plan touches
    (``removals``: a part of :func:`~fxprune.passes.curvature.layer_removals` -- sequential mode
    passes one block's, while that block is onloaded)."""
    means = getattr(stats, "input_mean", None)
    if not means:
        raise PlanError("update 'flap' needs the Scores of a criterion with input statistics "
                        "(importance='flap' or 'activation'): they carry the input means")
    changed: dict[str, torch.Tensor] = {}
    added: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    if removals is None:
        removals = curvature.layer_removals(model, analysis, plan)
    for layer, (rows, cols) in removals.items():
        if not len(cols):
            continue
        prefix = f"{layer}." if layer else ""
        module = model.get_submodule(layer)
        mean = means.get(prefix + "weight")
        if mean is None:
            skipped.append(layer)
            continue
        w = curvature.weight_matrix(module)
        mean_cols = torch.as_tensor(mean, dtype=torch.float64)
        if w.shape[1] != mean_cols.numel():  # conv: every kernel position of a channel sees its mean
            mean_cols = mean_cols.repeat_interleave(w.shape[1] // mean_cols.numel())
        delta = curvature.flap_bias_delta(w, mean_cols, cols)
        if len(rows):
            delta[torch.as_tensor(rows, dtype=torch.long)] = 0.0  # those rows go (the zeroed oracle agrees)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            changed[prefix + "bias"] = (bias.detach().to(torch.float64) + delta.to(bias.device)).to(bias.dtype)
        elif isinstance(module, nn.Linear):
            added[prefix + "bias"] = delta.to(module.weight.dtype).to(module.weight.device)
        else:
            skipped.append(layer)
    return UpdateOutput(changed, added, flap_notes(changed, added, skipped), tuple(skipped))


def flap_notes(changed: Any, added: Any, skipped: Any) -> tuple[str, ...]:
    """The report lines of a flap update."""
    notes = [f"flap update: bias compensation in {len(changed) + len(added)} layers ({len(added)} new biases)"]
    if skipped:
        notes.append(f"flap update: no compensation for {', '.join(sorted(skipped))} (no input means, or no bias to add)")
    return tuple(notes)


def _requires(model: Any, analysis: Any, plan: Any, stats: Any = None, **kwargs: Any) -> None:
    check(isinstance(model, nn.Module), BadInputError, f"update() needs the nn.Module, got {type(model).__name__}")
    check(hasattr(analysis, "groups"), BadInputError, "update() needs the Analysis from fxprune.analyze")


@fxpass("update", requires=_requires)
def update(model: nn.Module, analysis: Any, plan: Any, stats: Any = None, *, method: str = "none") -> WeightUpdate:
    """Compensate the surviving weights of ``model`` for the units ``plan`` removes.

    ``method`` names an entry of :data:`UPDATES`.  ``stats`` is what the method needs (the
    scoring pass' :class:`~fxprune.passes.scoring.Scores`, or curvature statistics).  The model is
    not modified; the result is handed to :func:`fxprune.rewrite` as ``weights=``.
    """
    plan = as_plan(analysis, plan)
    fn = UPDATES.get(method)
    if fn is None:
        raise PlanError(f"unknown update method {method!r}; choose one of {sorted(UPDATES)}")
    out = fn(model, analysis, plan, stats)
    if not out.changed and not out.added:
        return dataclasses.replace(IDENTITY, method=method, notes=tuple(out.notes))
    names = model_tensors(model)
    for fqn, value in out.changed.items():
        if fqn not in names:
            raise PlanError(f"update {method!r} changed {fqn!r}, which the model does not have")
        if tuple(value.shape) != tuple(names[fqn].shape):
            raise PlanError(f"update {method!r} changed the shape of {fqn!r}; updates keep shapes, rewrite shrinks them")
    changed = dict(out.changed)
    for fqn in list(changed):  # every name of a tied tensor sees the same value
        for alias in analysis.graph.aliases.get(fqn, [fqn]):
            changed.setdefault(alias, changed[fqn])
    return WeightUpdate(method, types.MappingProxyType(changed), types.MappingProxyType(dict(out.added)), tuple(out.notes))
