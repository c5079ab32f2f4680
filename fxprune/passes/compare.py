"""Deciding whether two models compute the same function: the judge behind ``verify`` and ``rewrite``.

A pruned model must equal the original with the removed units zeroed, and the eager module that
``rewrite`` hands back must equal the rewritten graph.  Three ways such a check used to accept
wrong models, and what this module does instead:

* **Absolute tolerances hide small outputs.**  ``allclose(atol=1e-4)`` accepts any error below
  1e-4 on an output whose values are 1e-3.  Here every output is compared *relative to its own
  scale*, ``max |a - b| / max |a|``, against a tolerance tied to the dtype's epsilon
  (:func:`tolerance`).
* **One input shape hides shape-dependent bugs.**  A forward that derives its attention scale
  from ``q.shape[-1]`` or a size from an attribute may agree at the traced shape only.  The
  check runs at the example inputs *and* at another batch size and sequence length
  (:func:`check_cases`, over the dims the trace made dynamic).
* **float32 noise hides small errors.**  Removing units changes the order of float32 sums, so a
  pruned model differs from the zeroed original by rounding noise; a real bug can be smaller
  than that noise.  A difference that is neither clearly noise nor clearly wrong is judged again
  in float64 (copies of both models, ``float64=`` in :func:`judge`), where rounding noise is
  ~1e-16 and any real difference stands out.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Sequence

import torch

from fxprune.util.modules import eval_mode
from fxprune.util.outputs import tensor_leaves

__all__ = [
    "Difference", "Verdict", "check_cases", "judge", "output_difference", "tolerance",
    "FLOAT64_TOLERANCE", "FLOAT64_BUDGET_BYTES", "float32_casts",
]

Case = tuple[tuple, dict]  # (positional args, keyword args) of one forward call
Runner = Callable[[tuple, dict], Any]

SURE_EQUAL_EPS = 8
"""Differences up to ``SURE_EQUAL_EPS * eps(dtype)`` of an output's scale are rounding noise;
anything larger is judged again in float64 when the models fit :data:`FLOAT64_BUDGET_BYTES`."""

FLOAT64_TOLERANCE = 1e-9
"""In float64 (eps 2.2e-16) a relative difference above this is a real difference."""

FLOAT64_BUDGET_BYTES = 2 << 30
"""The float64 judge copies both models; it is skipped when their weights would exceed this."""


def tolerance(dtype: torch.dtype) -> float:
    """Relative differences up to this are rounding noise in ``dtype`` (float32: 9.5e-7)."""
    return SURE_EQUAL_EPS * torch.finfo(dtype).eps


def _sure_different(dtype: torch.dtype) -> float:
    """Above this relative difference no float64 judge is needed: the outputs differ."""
    return min(0.5, max(1e-3, 256 * torch.finfo(dtype).eps))


def _loose(dtype: torch.dtype) -> float:
    """Without a float64 judge, the most a difference may be and still be called noise."""
    return max(1e-4, 8 * torch.finfo(dtype).eps)


@dataclasses.dataclass(frozen=True)
class Difference:
    """How far ``b`` is from the reference ``a``: worst leaf, relative to that leaf's own scale."""

    rel: float
    max_abs: float
    dtype: torch.dtype
    why: str = ""  # set when the outputs cannot be compared at all (structure, shape, dtype)
    # the worst leaf difference relative to the largest output of the call: an output that is
    # zero up to cancellation (the mean of a normalised tensor) has no scale of its own
    rel_global: float = 0.0

    @property
    def structural(self) -> bool:
        return bool(self.why)


def output_difference(a: Any, b: Any) -> Difference:
    """Max over output leaves of ``max |a - b| / max |a|`` (``a`` is the reference).

    Non-floating leaves must be equal; NaNs must sit at the same places (they are then ignored).
    """
    la, lb = tensor_leaves(a), tensor_leaves(b)
    if len(la) != len(lb):
        return Difference(math.inf, math.inf, torch.float32, f"{len(la)} outputs vs {len(lb)}")
    worst_rel, worst_abs, dtype, floats, top = 0.0, 0.0, torch.float32, 0, 0.0
    for i, (x, y) in enumerate(zip(la, lb, strict=True)):
        if x.shape != y.shape:
            return Difference(math.inf, math.inf, dtype, f"output {i} shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if not x.is_floating_point() or not y.is_floating_point():
            if x.dtype != y.dtype or not torch.equal(x, y):
                return Difference(math.inf, math.inf, dtype, f"output {i} ({x.dtype}) differs")
            continue
        if x.numel() == 0:
            continue
        xd, yd = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        nan_x, nan_y = torch.isnan(xd), torch.isnan(yd)
        if not torch.equal(nan_x, nan_y):
            return Difference(math.inf, math.inf, x.dtype, f"output {i} has NaNs in other places")
        xd, yd = xd.masked_fill(nan_x, 0.0), yd.masked_fill(nan_y, 0.0)
        if not torch.equal(torch.isinf(xd), torch.isinf(yd)) or not torch.equal(xd[torch.isinf(xd)], yd[torch.isinf(yd)]):
            return Difference(math.inf, math.inf, x.dtype, f"output {i} has infinities in other places")
        finite = torch.isfinite(xd)
        diff = (xd - yd).abs()[finite]
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(xd.abs()[finite].max()) if finite.any() else 0.0
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        worst_rel, worst_abs, top = max(worst_rel, rel), max(worst_abs, max_abs), max(top, scale)
        if floats == 0 or torch.finfo(x.dtype).eps > torch.finfo(dtype).eps:
            dtype = x.dtype  # the noisiest dtype among the outputs decides the tolerance
        floats += 1
    rel_global = worst_abs / top if top > 0 else (0.0 if worst_abs == 0 else math.inf)
    return Difference(worst_rel, worst_abs, dtype, rel_global=rel_global)


FLOAT64_GLOBAL_TOLERANCE = 1e-12
"""In float64, differences below this fraction of the largest output are cancellation noise."""


def _equal_in_float64(d: Difference, floor: float = 0.0) -> bool:
    """Each output within :data:`FLOAT64_TOLERANCE` (or ``floor``) of its own scale, or every
    difference negligible next to the largest output (an output that is ~0 by cancellation has
    no scale)."""
    return d.rel <= max(FLOAT64_TOLERANCE, floor) or d.rel_global <= max(FLOAT64_GLOBAL_TOLERANCE, floor)


def float32_casts(graph: Any) -> list[str]:
    """Nodes of an FX graph that cast to float32 explicitly (``x.float()``, ``.to(torch.float32)``).

    A float64 copy of such a model still rounds to float32 there (HF RoPE does ``q.float()``), so
    the float64 judge cannot see below float32 noise for it: :func:`judge` is told so
    (``float64_floor``) and says it in its note, instead of calling float32 noise a real difference.
    """
    out = []
    for node in graph.nodes:
        if node.op != "call_function" or "to" not in str(node.target):
            continue
        dtypes = [node.kwargs.get("dtype"), *[a for a in node.args[1:] if isinstance(a, torch.dtype)]]
        if torch.float32 in dtypes:
            out.append(node.name)
    return out


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The judge's decision, with the evidence."""

    equal: bool
    rel: float  # worst relative difference, in the precision that decided
    max_abs: float
    judged_in: str  # "float32", "float64", ...
    shapes: tuple[str, ...]  # the input shapes that were compared
    why: str = ""  # why they differ (empty when equal)
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.equal


def describe_case(case: Case) -> str:
    """``x[2,5,4]`` style shapes of a call's tensor inputs."""
    args, kwargs = case
    parts = [f"arg{i}{list(a.shape)}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    parts += [f"{k}{list(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return " ".join(parts).replace(" ", "") if len(parts) == 1 else ", ".join(p.replace(" ", "") for p in parts)


def judge(reference: Runner, candidate: Runner, cases: Sequence[Case], *,
          float64: Callable[[], tuple[Runner, Runner] | None] | None = None,
          force_float64: bool = False, require_float64: bool = False, float64_floor: Sequence[str] = ()) -> Verdict:
    """Whether ``candidate`` computes what ``reference`` computes on every case.

    A case the *reference* cannot run (a shape the model does not accept) is skipped, except the
    first (the example inputs), whose failure propagates.  A candidate that fails where the
    reference runs differs.  Differences between noise and clearly wrong are rejudged in float64
    when ``float64()`` returns runners for float64 copies (None: no judge, a looser bound);
    ``force_float64`` rejudges every difference that is not exactly zero; ``require_float64``
    also refuses when no float64 judge is available (for changes known to be able to hide below
    float32 noise).  ``float64_floor``: nodes where the models cast to float32 explicitly (see
    :func:`float32_casts`); the float64 judge then accepts what float32 would without it (as when
    no float64 judge is available), and says so.
    """
    worst = Difference(0.0, 0.0, torch.float32)
    ambiguous = False
    shapes: list[str] = []
    ran: list[Case] = []
    for i, case in enumerate(cases):
        try:
            ref = reference(*case)
        except Exception:  # noqa: BLE001 - a shape the model does not take: not evidence
            if i == 0:
                raise
            continue
        where = describe_case(case)
        try:
            got = candidate(*case)
        except Exception as exc:  # noqa: BLE001 - a candidate failing where the reference runs
            return Verdict(False, math.inf, math.inf, "-", tuple(shapes + [where]),
                           f"fails at input shapes {where}: {type(exc).__name__}: {exc}")
        d = output_difference(ref, got)
        shapes.append(where)
        ran.append(case)
        if d.structural:
            return Verdict(False, math.inf, math.inf, str(d.dtype).replace("torch.", ""), tuple(shapes),
                           f"{d.why} at input shapes {where}")
        if d.rel > _sure_different(d.dtype) and d.rel_global > _sure_different(d.dtype):
            return Verdict(False, d.rel, d.max_abs, str(d.dtype).replace("torch.", ""), tuple(shapes),
                           f"relative difference {d.rel:.2e} (max |diff| {d.max_abs:.2e}) at input shapes {where}")
        if d.rel > tolerance(d.dtype) or ((force_float64 or require_float64) and d.max_abs > 0):
            ambiguous = True
        if d.rel >= worst.rel:
            worst = d
    name = str(worst.dtype).replace("torch.", "")
    if not ambiguous:
        return Verdict(True, worst.rel, worst.max_abs, name, tuple(shapes))
    pair = float64() if float64 is not None else None
    if pair is None and require_float64:
        return Verdict(False, worst.rel, worst.max_abs, name, tuple(shapes),
                       f"a relative difference of {worst.rel:.2e} in {name} needs a float64 judge, which is "
                       "not available for this model (too large, or not castable to float64)")
    if pair is None:
        ok = worst.rel <= _loose(worst.dtype) or worst.rel_global <= tolerance(worst.dtype)
        note = (f"a relative difference of {worst.rel:.2e} in {name} could not be judged in float64 "
                f"(model too large or not castable); accepted below {_loose(worst.dtype):.0e}")
        return Verdict(ok, worst.rel, worst.max_abs, name, tuple(shapes),
                       "" if ok else f"relative difference {worst.rel:.2e} in {name}", (note,) if ok else ())
    ref64, cand64 = pair
    worst64 = Difference(0.0, 0.0, torch.float64)
    for case in ran:
        c64 = to_float64(case)
        try:
            d = output_difference(ref64(*c64), cand64(*c64))
        except Exception as exc:  # noqa: BLE001 - the float64 copies do not run: fall back
            ok = worst.rel <= _loose(worst.dtype) and not require_float64
            note = f"the float64 judge could not run ({type(exc).__name__}); accepted {name} difference {worst.rel:.2e}"
            return Verdict(ok, worst.rel, worst.max_abs, name, tuple(shapes),
                           "" if ok else f"relative difference {worst.rel:.2e} in {name}", (note,) if ok else ())
        floor = _loose(torch.float32) if float64_floor else 0.0  # as without a float64 judge
        if d.structural or not _equal_in_float64(d, floor):
            return Verdict(False, d.rel, d.max_abs, "float64", tuple(shapes),
                           f"relative difference {d.rel:.2e} in float64 ({worst.rel:.2e} in {name}) "
                           f"at input shapes {describe_case(case)}")
        if d.rel >= worst64.rel:
            worst64 = d
    notes: tuple[str, ...] = ()
    if float64_floor and worst64.rel > FLOAT64_TOLERANCE:
        notes = (f"judged in float64 down to float32 noise only ({worst64.rel:.1e}): the model casts to float32 "
                 f"itself at {', '.join(list(float64_floor)[:3])}",)
    return Verdict(True, worst64.rel, worst64.max_abs, "float64", tuple(shapes), "", notes)


# ------------------------------------------------------------------------------------------
# Inputs at other shapes
# ------------------------------------------------------------------------------------------
def check_cases(args: tuple, kwargs: dict, constants: dict, dynamic_shapes: Any, *, seed: int = 0,
                arg_names: Sequence[str] = ()) -> list[Case]:
    """The example call, then the same call at one more batch row and three more positions.

    Only dims the trace made dynamic change (``dynamic_shapes`` as given to torch.export, whose
    dict form names positional inputs by ``arg_names``); sizes
    stay consistent across inputs that share a dim (ids and mask).  Values are drawn like the
    examples' (ids from their range, masks all ones).
    """
    base: Case = (tuple(args), {**kwargs, **constants})
    if dynamic_shapes is None:
        return [base]
    from fxprune.passes.export import _fresh_like  # the one home of "inputs like these"

    if isinstance(dynamic_shapes, dict):  # keyed by forward parameter names, positional ones too
        arg_specs: Sequence[Any] = [dynamic_shapes.get(n) for n in arg_names]
        kw_specs = dynamic_shapes
    elif isinstance(dynamic_shapes, (tuple, list)):
        arg_specs, kw_specs = dynamic_shapes, {}
    else:
        return [base]
    gen = torch.Generator().manual_seed(seed)
    sizes: dict[str, int] = {}

    def resize(name: str, t: Any, spec: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not isinstance(spec, dict) or not spec:
            return t
        shape = list(t.shape)
        for d, dim in spec.items():
            if not isinstance(d, int) or d >= len(shape):
                continue
            key = dim if isinstance(dim, str) else (getattr(dim, "__name__", None) or f"auto{d}")
            if key not in sizes:
                grow = 1 if d == 0 else 3
                new = shape[d] + grow
                hi = getattr(dim, "max", None)
                if isinstance(hi, int) and new > hi:
                    new = max(2, shape[d] - 1)
                sizes[key] = new
            shape[d] = sizes[key]
        if shape == list(t.shape):
            return t
        return _fresh_like(name, t, shape, gen)

    new_args = tuple(resize(f"arg{i}", a, arg_specs[i] if i < len(arg_specs) else None) for i, a in enumerate(args))
    new_kwargs = {k: resize(k, v, kw_specs.get(k)) for k, v in kwargs.items()}
    if not sizes:
        return [base]
    return [base, (new_args, {**new_kwargs, **constants})]


# ------------------------------------------------------------------------------------------
# float64 copies
# ------------------------------------------------------------------------------------------
def to_float64(case: Case) -> Case:
    args, kwargs = case
    cast = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def float64_bytes(*modules: Any) -> int:
    total = 0
    for m in modules:
        if isinstance(m, torch.nn.Module):
            total += sum(t.numel() for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()) * 8
    return total


def float64_copy(module: Any) -> Any:
    """A float64 deep copy of a module (None when it cannot be made: meta tensors, no module)."""
    if not isinstance(module, torch.nn.Module):
        return None
    if any(t.device.type == "meta" for t in list(module.parameters()) + list(module.buffers())):
        return None
    m = copy.deepcopy(module)
    m.double()
    # tensor constants of a GraphModule are plain attributes: cast them too
    for name, value in list(vars(m).items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(m, name, value.double())
    return m


def runner(model: Any) -> Runner:
    """``model(*args, **kwargs)`` in eval mode, without autograd."""

    def run(args: tuple, kwargs: dict) -> Any:
        with torch.no_grad(), eval_mode(model):
            return model(*args, **kwargs)

    return run
