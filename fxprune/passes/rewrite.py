"""Rewrite pass: apply a plan to the exported graph and to the user's own module.

The graph rewrite slices parameters and buffers, recomputes every shape constant the analysis
recorded (view/reshape/expand sizes, slice offsets, split sizes, conv/group-norm group counts),
pins the attention scale to its original value, and index-selects the outputs of factory ops
(``arange`` feeding RoPE, say) along pruned dims.  It is then re-exported, so the result carries
fresh shape metadata and is what the ONNX export consumes.

Both rewrites read their weights from one place, the update pass' ``WeightUpdate`` (the model's
own tensors when nothing was updated).

The module rewrite gives the user their own class back with smaller layers: new parameters,
consistent ``in_features``/``out_features``-style attributes (peft reads them), and per-layer int
attributes that the forward reads (``head_dim``, ``num_key_value_groups``...).  Those attributes
are found from the graph, not from a table of model names: a shape constant that changed sits in
a node whose ``nn_module_stack`` names its module, and that module's int attribute holding the
old value is the one to update.  The result is always checked against the rewritten graph, and everything the pass did is in
the :class:`RewriteResult` it returns (nothing is attached to the module).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import warnings
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import BadInputError, VerificationError
from fxprune.graph import PrunableGraph, kept_indices, kept_size, layout_size
from fxprune.passes.base import check, fxpass
from fxprune.passes.depth import DepthRewrite, bypass_branches, removed_branches, rewrite_depth
from fxprune.passes.experts import masked_reference, oracle_applies, set_value_args
from fxprune.passes.compare import (
    FLOAT64_BUDGET_BYTES,
    Verdict,
    check_cases,
    float32_casts,
    float64_bytes,
    float64_copy,
    judge,
    output_difference,
    runner,
    tolerance,
)
from fxprune.passes.plan import Plan, as_plan
from fxprune.passes.update import IDENTITY, WeightUpdate
from fxprune.types import ArgPath, TensorRef
from fxprune.util import hf
from fxprune.util.modules import eval_mode, get_tensor, set_tensor
from fxprune.util.outputs import tensor_leaves

aten = torch.ops.aten


# ------------------------------------------------------------------------------------------
# Plan resolution
# ------------------------------------------------------------------------------------------
def new_tensor_shapes(analysis: Any, removed: Mapping[int, Any]) -> dict[str, dict[int, np.ndarray]]:
    """For each parameter/buffer FQN that shrinks: {dim: kept indices} (one entry per tied tensor)."""
    graph: PrunableGraph = analysis.graph
    out: dict[str, dict[int, np.ndarray]] = {}
    seen: set[str] = set()
    for fqn, lays in analysis.param_layouts.items():
        canonical = graph.canonical(fqn)
        if canonical in seen:  # a tied weight appears once per use in the signature
            continue
        seen.add(canonical)
        dims = {}
        for d, lay in enumerate(lays):
            if lay is None:
                continue
            kept = kept_indices(lay, removed)
            if len(kept) != layout_size(lay):
                dims[d] = kept
        if dims:
            out[fqn] = dims
    return out


@dataclasses.dataclass(frozen=True)
class NormRescale:
    """One RMS norm whose dim shrinks from ``d`` to ``d'`` (see :class:`fxprune.types.NormScale`)."""

    weight: str  # FQN
    offset: float
    scale: float  # sqrt(d / d')
    eps_node: str
    eps_path: ArgPath
    eps: float
    new_eps: float  # eps * d / d'


def norm_rescales(analysis: Any, removed: Mapping[int, Any]) -> list[NormRescale]:
    """The RMS norms of ``analysis`` whose normalised dim the plan shrinks, with their factors."""
    out = []
    for site in getattr(analysis, "norm_scales", ()):
        d, kept = layout_size(site.layout), kept_size(site.layout, removed)
        if 0 < kept < d:
            out.append(NormRescale(site.weight, site.offset, math.sqrt(d / kept), site.eps_node, site.eps_path,
                                   site.eps, site.eps * d / kept))
    return out


def rescale_norm_weight(t: torch.Tensor, r: NormRescale) -> torch.Tensor:
    """``(w + offset) * scale - offset``: the norm's output equals the zeroed original's."""
    if t.device.type == "meta":
        return t
    w = t.detach().to(torch.float64)
    return ((w + r.offset) * r.scale - r.offset).to(t.dtype)


def _set_module_eps(model: torch.nn.Module, mod_path: str, old: float, new: float) -> list[str]:
    """Set the float attributes of the norm module at ``mod_path`` that hold ``old`` (its eps)."""
    try:
        mod = model.get_submodule(mod_path) if mod_path else model
    except AttributeError:
        return []
    names = [k for k, v in vars(mod).items() if isinstance(v, float) and not isinstance(v, bool)
             and math.isclose(v, old, rel_tol=1e-6, abs_tol=0.0)]
    for k in names:
        setattr(mod, k, new)
    return names


def _slice_tensor(t: torch.Tensor, dims: dict[int, np.ndarray]) -> torch.Tensor:
    for d, kept in dims.items():
        idx = torch.as_tensor(kept, dtype=torch.long, device=t.device)
        t = t.index_select(d, idx) if t.device.type != "meta" else t.new_empty(
            tuple(len(kept) if i == d else s for i, s in enumerate(t.shape))
        )
    return t.contiguous() if t.device.type != "meta" else t


# ------------------------------------------------------------------------------------------
# Graph rewrite
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RewrittenProgram:
    """The pruned graph: a runnable GraphModule and, when re-exported, a fresh ExportedProgram."""

    graph_module: fx.GraphModule
    source: PrunableGraph
    constant_kwargs: dict
    changed_constants: dict[str, dict[ArgPath, tuple[int, int]]]  # node -> path -> (old, new)
    removed: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # class -> units
    # attention node -> (original q/k head_dim, new head_dim, module path): the scale the graph pinned
    pinned_scales: dict[str, tuple[int, int, str]] = dataclasses.field(default_factory=dict)
    norm_rescales: tuple[NormRescale, ...] = ()  # RMS norms whose weight and eps were rescaled
    _exported: Any = None

    @property
    def exported_program(self):
        """The pruned program re-exported (fresh shape metadata); built on first use."""
        if self._exported is None:
            self._exported = _reexport(self.graph_module, self.source)
        return self._exported

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **{**kwargs, **self.constant_kwargs})


def rewrite_graph(analysis: Any, plan: Any, weights: WeightUpdate | None = None, *,
                  reexport: bool = False) -> RewrittenProgram:
    """Apply ``plan`` to the exported program (with ``weights``) and return the smaller program."""
    plan = as_plan(analysis, plan)
    weights = weights or IDENTITY
    graph: PrunableGraph = analysis.graph
    removed = plan.removed_by_class
    gm = graph.exported_program.module()
    nodes = {n.name: n for n in gm.graph.nodes}

    # 1. parameters and buffers: the updated values, sliced
    shapes = new_tensor_shapes(analysis, removed)
    for fqn in sorted(set(shapes) | set(weights.changed)):
        dims = shapes.get(graph.canonical(fqn), shapes.get(fqn, {}))
        for alias in graph.aliases.get(fqn, [fqn]):
            old = get_tensor(gm, alias)
            if old is not None:
                src = weights.changed.get(alias, old)
                _set_sliced(gm, alias, src, dims)
    if weights.added:
        _add_tensors_to_graph(gm, weights, analysis, shapes)
    rescales = norm_rescales(analysis, removed)
    for r in rescales:  # RMS norms over a shrunk dim: weight and eps keep the zeroed original's output
        for alias in graph.aliases.get(r.weight, [r.weight]):
            if (t := get_tensor(gm, alias)) is not None:
                _set_sliced(gm, alias, rescale_norm_weight(t, r), {})
        if r.eps_node in nodes:
            _set_path(nodes[r.eps_node], r.eps_path, r.new_eps)

    changed: dict[str, dict[ArgPath, tuple[int, int]]] = {}
    pinned_scales: dict[str, tuple[int, int, str]] = {}
    # 2. shape constants
    for name, entries in analysis.size_args.items():
        node = nodes.get(name)
        if node is None:
            continue
        split_sizes: dict[int, int] = {}
        for path, lay in entries.items():
            if lay is None:
                continue
            new = kept_size(lay, removed) if lay else 1
            old = layout_size(lay) if lay else 1
            if path.where == "split":
                split_sizes[path.key] = new
                continue
            if new != old:
                _set_path(node, path, new)
                changed.setdefault(name, {})[path] = (old, new)
        if split_sizes and any(
            kept_size(entries[ArgPath("split", k)], removed) != layout_size(entries[ArgPath("split", k)])
            for k in split_sizes
        ):
            sizes = [split_sizes[k] for k in sorted(split_sizes)]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.target = aten.split_with_sizes.default
            node.args = (node.args[0], sizes, dim)
            node.kwargs = {}
            changed.setdefault(name, {})[ArgPath("split", -1)] = (-1, -1)
    # 3. slice offsets
    for name, entries in analysis.offset_args.items():
        node = nodes.get(name)
        if node is None:
            continue
        for path, (lay, offset) in entries.items():
            kept = kept_indices(lay, removed)
            new = int(np.searchsorted(kept, offset))
            if new != offset:
                _set_path(node, path, new)
                changed.setdefault(name, {})[path] = (offset, new)
    # 4. keep the attention scale at its original value
    for name in analysis.attention_nodes:
        node = nodes.get(name)
        if node is None or node.kwargs.get("scale") is not None or (len(node.args) > 6 and node.args[6] is not None):
            continue
        q = node.args[0]
        e = q.meta["val"].shape[-1] if isinstance(q, fx.Node) and "val" in q.meta else None
        if e is not None:
            node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(int(e))}
            q_lays = analysis.layouts.get(TensorRef(q.name)) if isinstance(q, fx.Node) else None
            new_e = kept_size(q_lays[-1], removed) if q_lays and q_lays[-1] else int(e)
            if new_e != int(e):
                pinned_scales[name] = (int(e), int(new_e), _module_path(node))
    # 5. factory ops whose outputs lie in pruned spaces: select the kept positions
    for name in analysis.sources:
        node = nodes.get(name)
        lays = analysis.layouts.get(TensorRef(name))
        if node is None or not lays:
            continue
        last = node
        for d, lay in enumerate(lays):
            if lay is None:
                continue
            kept = kept_indices(lay, removed)
            if len(kept) == layout_size(lay):
                continue
            const_name = f"_fxprune_keep_{name}_{d}"
            gm.register_buffer(const_name, torch.as_tensor(kept, dtype=torch.long), persistent=False)
            with gm.graph.inserting_after(last):
                getter = gm.graph.get_attr(const_name)
            with gm.graph.inserting_after(getter):
                sel = gm.graph.call_function(aten.index_select.default, (last, d, getter))
            users = [u for u in list(last.users) if u is not sel]
            for u in users:
                u.replace_input_with(last, sel)
            last = sel
            changed.setdefault(name, {})[ArgPath("args", "index_select", d)] = (layout_size(lay), len(kept))
    # 6. constants counting experts with an offset (histc max = E - 1)
    for name, paths in set_value_args(nodes, analysis, removed, _set_path).items():
        changed.setdefault(name, {}).update(paths)
    # 7. removed residual branches: x + f(x) becomes x, the branch's nodes and tensors go
    bypass_branches(gm, analysis, plan)
    # 8. a view that was legal on the original strides may not be after pruning (a kernel can
    #    pick another output layout for the new head_dim), so views become reshapes.
    #    view_as_complex needs an even stride on every dim but the last: its input is made contiguous.
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
        elif node.op == "call_function" and node.target is aten.view_as_complex.default \
                and isinstance(node.args[0], fx.Node):
            with gm.graph.inserting_before(node):
                dense = gm.graph.call_function(aten.clone.default, (node.args[0],),
                                               {"memory_format": torch.contiguous_format})
            node.args = (dense, *node.args[1:])
    gm.graph.lint()
    gm.recompile()

    program = RewrittenProgram(gm, graph, dict(graph.constant_kwargs), changed, removed, pinned_scales,
                               tuple(rescales))
    if reexport:
        program.exported_program  # noqa: B018 - validates that the smaller graph traces
    return program


def _reexport(gm: fx.GraphModule, graph: PrunableGraph):
    args = graph.example_args
    kwargs = {**graph.example_kwargs, **graph.constant_kwargs}
    if graph.on_meta:
        args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(gm, args, kwargs, dynamic_shapes=graph.dynamic_shapes, strict=False)
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"the rewritten graph does not trace: {exc}") from exc
    return ep


def _set_path(node: fx.Node, path: ArgPath, value: int) -> None:
    where, key = path.where, path.key
    rest = [] if path.sub is None else [path.sub]
    if where == "args":
        args = list(node.args)
        if rest:
            inner = list(args[key])
            inner[rest[0]] = value
            args[key] = type(node.args[key])(inner) if isinstance(node.args[key], tuple) else inner
        else:
            args[key] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        if rest:
            inner = list(kwargs[key])
            inner[rest[0]] = value
            kwargs[key] = inner
        else:
            kwargs[key] = value
        node.kwargs = kwargs


def _set_sliced(root: torch.nn.Module, fqn: str, value: torch.Tensor, dims: Mapping[int, np.ndarray]) -> None:
    """Put ``value`` sliced to ``dims`` at ``fqn`` (a Parameter stays a Parameter, a buffer a buffer)."""
    old = get_tensor(root, fqn)
    new = _slice_tensor(value.detach(), dims) if dims else value.detach()
    if isinstance(old, torch.nn.Parameter):
        new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
    set_tensor(root, fqn, new)


def added_dims(fqn: str, shapes: Mapping) -> dict[int, np.ndarray]:
    """How a tensor an update added is sliced: a linear's new bias follows its weight's rows."""
    if fqn in shapes:
        return shapes[fqn]
    mod_path, _, attr = fqn.rpartition(".")
    weight = shapes.get(f"{mod_path}.weight" if mod_path else "weight", {})
    return {0: weight[0]} if attr == "bias" and 0 in weight else {}


def _add_tensors_to_graph(gm: fx.GraphModule, weights: WeightUpdate, analysis: Any, shapes: Mapping) -> None:
    """Tensors an update adds (a compensating bias) enter the graph through the op that uses them.

    Only biases of ``aten.linear`` are supported: the bias becomes the op's third argument.
    """
    by_weight = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.linear.default:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                by_weight[w.target] = node
    for fqn, value in weights.added.items():
        mod_path, _, attr = fqn.rpartition(".")
        if attr != "bias":
            raise VerificationError(f"the update added {fqn!r}; only biases of linear layers can be added")
        node = by_weight.get(f"{mod_path}.weight" if mod_path else "weight")
        if node is None or (len(node.args) > 2 and node.args[2] is not None):
            raise VerificationError(f"the update added {fqn!r} but no bias-free linear reads {mod_path}.weight")
        dims = added_dims(fqn, shapes)
        name = fqn.replace(".", "_") + "_fxprune_added"
        gm.register_parameter(name, torch.nn.Parameter(_slice_tensor(value.detach(), dims) if dims else value.detach()))
        with gm.graph.inserting_before(node):
            getter = gm.graph.get_attr(name)
        node.args = (node.args[0], node.args[1], getter)


# ------------------------------------------------------------------------------------------
# Module rewrite
# ------------------------------------------------------------------------------------------
ModuleFixer = Callable[[torch.nn.Module], None]
MODULE_FIXERS: dict[type, ModuleFixer] = {}


def register_module_fixer(*types: type) -> Callable[[ModuleFixer], ModuleFixer]:
    """Register how a module type refreshes its size attributes after its tensors shrink."""

    def deco(fn: ModuleFixer) -> ModuleFixer:
        for t in types:
            MODULE_FIXERS[t] = fn
        return fn

    return deco


@register_module_fixer(torch.nn.Linear)
def _fix_linear(m: torch.nn.Module) -> None:
    m.out_features, m.in_features = m.weight.shape


@register_module_fixer(torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
def _fix_conv(m: torch.nn.Module) -> None:
    m.out_channels = m.weight.shape[0]
    m.in_channels = m.weight.shape[1] * m.groups


@register_module_fixer(torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
def _fix_conv_transpose(m: torch.nn.Module) -> None:
    m.in_channels = m.weight.shape[0]
    m.out_channels = m.weight.shape[1] * m.groups


@register_module_fixer(torch.nn.Embedding)
def _fix_embedding(m: torch.nn.Module) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@register_module_fixer(torch.nn.LayerNorm, torch.nn.RMSNorm)
def _fix_layer_norm(m: torch.nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        m.normalized_shape = tuple(m.weight.shape)


@register_module_fixer(torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                       torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
def _fix_batch_norm(m: torch.nn.Module) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


@register_module_fixer(torch.nn.GroupNorm)
def _fix_group_norm(m: torch.nn.Module) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


def _fix_hf_conv1d(m: torch.nn.Module) -> None:
    m.nf = m.weight.shape[1]


if hf.HFConv1D is not None:  # transformers' GPT-2 style Conv1D (a Linear with a transposed weight)
    register_module_fixer(hf.HFConv1D)(_fix_hf_conv1d)


# Size attributes the fixers above own: the graph-driven int fix-up must leave them alone.
MANAGED_ATTRS = {
    "in_features", "out_features", "in_channels", "out_channels", "num_embeddings",
    "embedding_dim", "num_features", "num_channels", "nf", "normalized_shape",
}


def _fix_module(m: torch.nn.Module) -> None:
    for cls in type(m).__mro__:
        if cls in MODULE_FIXERS:
            MODULE_FIXERS[cls](m)
            return


@dataclasses.dataclass
class ModuleRewrite:
    module: torch.nn.Module
    attribute_changes: dict[str, dict[str, tuple[int, int]]]  # module path -> attr -> (old, new)
    problems: list[str]
    config_updated: bool
    conflicts: list[tuple[str, str, int, list[int]]] = dataclasses.field(default_factory=list)
    depth: DepthRewrite | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def apply_shapes_to_module(
    model: torch.nn.Module,
    tensor_dims: dict[str, dict[int, np.ndarray]],
    aliases: dict[str, list[str]],
) -> None:
    """Slice parameters/buffers of ``model`` in place (a copy the caller owns); tied stay tied."""
    touched_modules: set[str] = set()
    for fqn, dims in tensor_dims.items():
        names = aliases.get(fqn, [fqn])
        mod_path, _, attr = names[0].rpartition(".")
        mod = model.get_submodule(mod_path) if mod_path else model
        old = getattr(mod, attr)
        new = _slice_tensor(old.detach(), dims)
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        for name in names:
            mp, _, at = name.rpartition(".")
            m = model.get_submodule(mp) if mp else model
            if isinstance(new, torch.nn.Parameter):
                m._parameters[at] = new
            elif at in m._buffers:
                m._buffers[at] = new
            else:
                setattr(m, at, new)
            touched_modules.add(mp)
    for mp in touched_modules:
        _fix_module(model.get_submodule(mp) if mp else model)


def rewrite_module(model: torch.nn.Module, analysis: Any, plan: Plan, program: RewrittenProgram,
                   weights: WeightUpdate | None = None, *, delete_layers: bool = True) -> ModuleRewrite:
    """A smaller copy of ``model``: updated and sliced tensors, refreshed size attributes, int attrs.

    Removed residual branches are deleted with their layer when it has no other work
    (``delete_layers``), else replaced by modules returning zeros.
    """
    new_model = copy.deepcopy(model)
    if weights is not None and not weights.is_identity:
        weights.apply_to(new_model)
    shapes = new_tensor_shapes(analysis, plan.removed_by_class)
    if weights is not None:  # tensors an update added are sliced like the tensors they sit beside
        shapes = {**shapes, **{f: d for f in weights.added if (d := added_dims(f, shapes))}}
    apply_shapes_to_module(new_model, shapes, analysis.graph.aliases)
    eps_set = _rescale_module_norms(new_model, analysis, program)
    changes, problems, conflicts = _fix_int_attributes(new_model, analysis, program)
    for path, attrs in eps_set.items():
        changes.setdefault(path, {}).update(attrs)
    depth = None
    if removed_branches(analysis, plan):
        changes, problems, conflicts, depth = _rewrite_module_depth(new_model, model, analysis, plan, changes,
                                                                    problems, conflicts, delete_layers)
    return ModuleRewrite(new_model, changes, problems, False, conflicts, depth)


def _rescale_module_norms(model: torch.nn.Module, analysis: Any, program: RewrittenProgram) -> dict[str, dict]:
    """The graph's RMS-norm rescales (:func:`norm_rescales`) in the module: weights and eps attributes."""
    nodes = {n.name: n for n in analysis.graph.exported_program.graph.nodes}
    done: dict[str, Any] = {}
    for r in program.norm_rescales:
        for alias in analysis.graph.aliases.get(r.weight, [r.weight])[:1]:
            t = get_tensor(model, alias)
            if t is not None:
                _set_sliced(model, alias, rescale_norm_weight(t, r), {})
        node = nodes.get(r.eps_node)
        if node is not None:
            path = _module_path(node)
            for attr in _set_module_eps(model, path, r.eps, r.new_eps):
                done.setdefault(path, {})[attr] = (r.eps, r.new_eps)
    _rescale_config_eps(model, done)
    return done


def _rescale_config_eps(model: torch.nn.Module, done: Mapping[str, Mapping[str, tuple]]) -> None:
    """Keep a reload exact: when every norm of the model that held an eps now holds one new eps,
    the HF config's eps field says so too (else the config keeps the old one, which a reloaded
    model then uses: a difference of the order of eps / mean(x**2))."""
    config = hf.config_of(model)
    pairs = {v for attrs in done.values() for v in attrs.values()}
    if config is None or len(pairs) != 1:
        return
    old, new = next(iter(pairs))
    for path, mod in model.named_modules():
        for k, v in vars(mod).items():
            if isinstance(v, float) and math.isclose(v, old, rel_tol=1e-6) and k not in done.get(path, {}):
                return  # a norm left at the old eps (Qwen3's q_norm when only the hidden width shrinks)
    for k, v in list(vars(config).items()):
        if "eps" in k and isinstance(v, float) and math.isclose(v, old, rel_tol=1e-6):
            setattr(config, k, new)


def _fold_rebuilt_scalars(model: torch.nn.Module, analysis: Any) -> tuple[list[str], Callable[[], None]]:
    """Keep a reload exact when the class recomputes a scalar buffer from its (now pruned) config.

    Gemma scales its embeddings by a non-persistent ``embed_scale`` buffer built from
    ``sqrt(hidden_size)``: the pruned module keeps the original's scale ``s`` (right), but a model
    rebuilt from the pruned config computes ``s'``.  When the graph shows the buffer multiplying
    nothing but an embedding lookup, the scale moves into the weights: the buffer (and the float
    attribute it is built from) becomes ``s'``, the embedding weight is multiplied by ``s/s'``, and
    a linear sharing that weight (tied ``lm_head``) gets its input scaled back by ``s'/s`` through
    the RMS norm weight feeding it.  Any other use leaves everything as it was (then the saved
    checkpoint carries the buffer and says it loads with ``fxprune.load``).  Returns the notes
    and a function that undoes the fold."""
    from fxprune.passes.op_rules import compute_users, op_packet, other_operand, through_casts

    config = hf.config_of(model)
    if config is None or not hasattr(type(model), "_from_config"):
        return [], lambda: None
    try:
        rebuilt = dict(hf.skeleton(model, config).named_modules())
    except Exception:  # noqa: BLE001 - a class that does not rebuild from its config: nothing to fold
        return [], lambda: None
    ep = analysis.graph.exported_program
    sig = ep.graph_signature
    placeholder = {fqn: name for name, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items()}
    fqn_of = {name: fqn for fqn, name in placeholder.items()}
    nodes = {n.name: n for n in ep.graph.nodes}
    sites = {s.weight: s for s in getattr(analysis, "norm_scales", ())}
    persistent = set(model.state_dict())
    undo: list[Callable[[], None]] = []
    notes: list[str] = []

    def fold_plan(buf_node: fx.Node, r: float) -> list[tuple[str, float, float]] | None:
        """[(tensor FQN, offset, factor)]: ``(t + offset) * factor - offset`` for each tensor."""
        out: list[tuple[str, float, float]] = []
        scale = through_casts(buf_node, forward=True)
        for use in compute_users(scale):
            emb = other_operand(use, scale) if op_packet(use) is torch.ops.aten.mul else None
            emb = through_casts(emb, forward=False) if isinstance(emb, fx.Node) else None
            if emb is None or op_packet(emb) is not torch.ops.aten.embedding or emb.args[0].op != "placeholder":
                return None
            weight = emb.args[0]
            for other in compute_users(weight):
                if other is emb:
                    continue
                if op_packet(other) is torch.ops.aten.embedding:
                    return None  # an unscaled lookup of the same table
                if op_packet(other) is not torch.ops.aten.linear or other.args[1] is not weight:
                    return None
                norm_out = through_casts(other.args[0], forward=False)
                site = None
                if op_packet(norm_out) is torch.ops.aten.mul and through_casts(norm_out, forward=True) is other.args[0]:
                    for arg in norm_out.args:
                        if isinstance(arg, fx.Node):
                            cand = through_casts(arg, forward=False)
                            if op_packet(cand) is torch.ops.aten.add:
                                cand = next((through_casts(a, forward=False) for a in cand.args
                                             if isinstance(a, fx.Node)), cand)
                            site = sites.get(fqn_of.get(cand.name, "")) or site
                if site is None:
                    return None
                out.append((site.weight, site.offset, 1.0 / r))
            out.append((fqn_of[weight.name], 0.0, r))
        return out or None

    for path, mod in model.named_modules():
        ref = rebuilt.get(path)
        if ref is None:
            continue
        for bname, buf in list(mod._buffers.items()):
            fqn = f"{path}.{bname}" if path else bname
            if buf is None or fqn in persistent or buf.numel() != 1 or buf.device.type == "meta":
                continue
            value = float(buf)
            attrs = [k for k, v in vars(mod).items() if type(v) is float and math.isclose(v, value, rel_tol=1e-6)
                     and type(vars(ref).get(k)) is float and not math.isclose(vars(ref)[k], v, rel_tol=1e-6)]
            node = nodes.get(placeholder.get(fqn, ""))
            if not attrs or node is None or not value:
                continue
            new = float(vars(ref)[attrs[0]])
            steps = fold_plan(node, value / new) if new else None
            if steps is None:
                continue
            for tfqn, offset, factor in steps:
                t = get_tensor(model, tfqn)
                old_data = t.data
                t.data = ((t.detach().to(torch.float64) + offset) * factor - offset).to(t.dtype)
                undo.append(lambda t=t, d=old_data: setattr(t, "data", d))
            old_buf, old_attrs = buf, {k: getattr(mod, k) for k in attrs}
            mod._buffers[bname] = torch.full_like(buf, new)
            for k in attrs:
                setattr(mod, k, new)
            undo.append(lambda m=mod, b=bname, ob=old_buf, oa=old_attrs: (
                m._buffers.__setitem__(b, ob), [setattr(m, k, v) for k, v in oa.items()]))
            notes.append(f"{fqn}: the class rebuilds it from the pruned config as {new:g} (was {value:g}); "
                         f"the factor {value / new:.6g} moved into {', '.join(t for t, _, _ in steps)}, "
                         "so a reload with from_pretrained is exact")

    def revert() -> None:
        for step in reversed(undo):
            step()

    return notes, revert


def _rewrite_module_depth(new_model: torch.nn.Module, original: torch.nn.Module, analysis: Any, plan: Plan,
                          changes: dict, problems: list[str], conflicts: list, delete_layers: bool) -> tuple:
    """Removed branches in the module (see :func:`fxprune.passes.depth.rewrite_depth`); the
    attribute records move to the module paths the model has after layers were deleted."""
    depth = rewrite_depth(new_model, analysis, plan, original, delete_layers=delete_layers)

    def where(path: str) -> str | None:  # None: the module is gone (deleted layer, zeroed branch)
        new_path = depth.remap(path)
        if new_path is None or any(new_path == z or new_path.startswith(z + ".") for z in depth.zeroed):
            return None
        return new_path

    moved: dict[str, dict[str, tuple[int, int]]] = {}
    for path, attrs in changes.items():
        if where(path) is not None:
            moved.setdefault(where(path), {}).update(attrs)
    for path, attrs in depth.layer_attrs.items():
        moved.setdefault(path, {}).update(attrs)
    conflicts = [(where(o), a, old, vals) for o, a, old, vals in conflicts if where(o) is not None]
    return moved, problems + depth.problems, conflicts, depth


_SKIP_ATTR = re.compile(r"(idx|index|layer|seed|id$|_id$|vocab|position|max_|rank)", re.I)


def _fix_int_attributes(model: torch.nn.Module, analysis: Any, program: RewrittenProgram):
    """Update module int attributes that produced shape constants which changed in the graph."""
    ep_nodes = {n.name: n for n in analysis.graph.exported_program.graph.nodes}
    # requirements[(module_path, attr)] -> set of new values demanded
    requirements: dict[tuple[str, str], set[int]] = {}
    olds: dict[tuple[str, str], int] = {}
    all_constants: list[tuple[str, int, int]] = []  # (module path, old, new) for every size arg
    for name, entries in analysis.size_args.items():
        node = ep_nodes.get(name)
        if node is None:
            continue
        mod_path = _module_path(node)
        splits = {p: lay for p, lay in entries.items() if p.where == "split" and lay is not None}
        if splits and node.target in (aten.split.Tensor, aten.split_copy.Tensor):
            news = {kept_size(lay, program.removed) for lay in splits.values()}
            if len(news) == 1:  # still an even split: its split_size follows the module attr
                all_constants.append((mod_path, node.args[1], news.pop()))
        elif splits and node.target in (aten.split_with_sizes.default, aten.split_with_sizes_copy.default):
            for lay in splits.values():  # each size follows a module attr (MLA's [nope, rope])
                all_constants.append((mod_path, layout_size(lay), kept_size(lay, program.removed)))
        for path, lay in entries.items():
            if lay is None or path.where == "split":
                continue
            old = layout_size(lay) if lay else 1
            new = program.changed_constants.get(name, {}).get(path, (old, old))[1]
            all_constants.append((mod_path, old, new))
    changed_any = {(mp, old) for mp, old, new in all_constants if new != old}
    for mod_path, old in changed_any:
        cands = _candidate_attrs(model, mod_path, old)
        for owner, attr in cands:
            key = (owner, attr)
            olds[key] = old
            vals = requirements.setdefault(key, set())
            for mp, o, n in all_constants:
                if o == old and (mp == owner or mp.startswith(owner + ".") or owner == ""):
                    vals.add(n)
    changes: dict[str, dict[str, tuple[int, int]]] = {}
    problems: list[str] = []
    conflicts: list[tuple[str, str, int, list[int]]] = []
    for (owner, attr), vals in requirements.items():
        old = olds[(owner, attr)]
        if len(vals) == 1:
            new = next(iter(vals))
            if new != old:
                setattr(model.get_submodule(owner) if owner else model, attr, new)
                changes.setdefault(owner, {})[attr] = (old, new)
        else:
            problems.append(
                f"{owner or '<root>'}.{attr}={old} would need several values {sorted(vals)}: "
                "the module uses one attribute for spaces that were pruned differently"
            )
            conflicts.append((owner, attr, old, sorted(vals)))
    return changes, problems, conflicts


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_fqn(path)


def _clean_fqn(path: str) -> str:
    # strict-mode stacks look like "L['self'].model.layers[0]"
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _candidate_attrs(model: torch.nn.Module, mod_path: str, old: int) -> list[tuple[str, str]]:
    """Int attributes equal to ``old`` on the node's module, else on its nearest ancestor."""
    parts = mod_path.split(".") if mod_path else []
    for depth in range(len(parts), -1, -1):
        owner = ".".join(parts[:depth])
        try:
            mod = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue
        found = [
            (owner, k)
            for k, v in vars(mod).items()
            if type(v) is int and v == old and not k.startswith("_") and not _SKIP_ATTR.search(k)
            and not (k in MANAGED_ATTRS and isinstance(mod, tuple(MODULE_FIXERS)))
        ]
        if found:
            return found
        if depth <= len(parts) - 2:  # look at most one level up
            break
    return []


_UNSET = object()


def _update_config(mod: "ModuleRewrite", search: hf.ConfigSearch, check: Callable[[], bool]) -> bool:
    """Adopt the first candidate config under which the module matches the graph.

    The update is made in place on the model's config object, which its submodules share (an
    attention that reads ``self.config.num_attention_heads`` in its forward, as Phi-3's does,
    sees it), and the skeleton's int attributes are copied onto the modules.
    """
    model = mod.module
    config = hf.config_of(model)
    snapshot = _int_attr_snapshot(model)
    for updates in hf.config_candidates(model, model, search=search):
        before = {k: getattr(config, k, _UNSET) for k in updates}
        for k, v in updates.items():
            setattr(config, k, v)
        hf.copy_int_attrs(search.skeleton(updates), model)
        if check():
            return True
        _restore_config(config, before)
        _restore_int_attrs(model, snapshot)
    return False


def _per_block_configs(mod: "ModuleRewrite", search: hf.ConfigSearch, analysis: Any, plan: Plan,
                       check: Callable[[], bool]) -> bool:
    """Give each pruned block its own config copy when no single config describes the model.

    For a forward that reads sizes from ``self.config`` (Phi-3's attention) and layers pruned to
    different widths: every submodule of a block that holds the shared config gets a copy with
    the fields that describe that block's shapes.  Kept only if the whole model then matches.
    """
    model = mod.module
    config = hf.config_of(model)
    target = hf.state_shapes(model)
    blocks = sorted({analysis.by_id[gid].block for gid in plan if analysis.by_id[gid].block})
    in_block = {n for n in target if any(n.startswith(b + ".") for b in blocks)}
    snapshot = _int_attr_snapshot(model)
    replaced: list[tuple[torch.nn.Module, Any]] = []
    for block in blocks:
        scope = {n for n in target if n.startswith(block + ".") or n not in in_block}
        updates = next(iter(search.search(target, scope=scope, limit=1)), None)
        holders = [m for name, m in model.named_modules()
                   if (name == block or name.startswith(block + ".")) and getattr(m, "config", None) is config]
        if updates is None or not holders:
            continue
        block_cfg = search.config_with(updates)
        for m in holders:
            replaced.append((m, m.config))
            m.config = block_cfg
        hf.copy_int_attrs(search.skeleton(updates), model, prefix=block)
    if replaced and check():
        return True
    for m, cfg in replaced:
        m.config = cfg
    _restore_int_attrs(model, snapshot)
    return False


def _restore_config(config: Any, before: Mapping[str, Any]) -> None:
    for k, v in before.items():
        if v is _UNSET:
            with contextlib.suppress(AttributeError):
                delattr(config, k)
        else:
            setattr(config, k, v)


def pruned_shapes(analysis: Any, removed: Mapping[int, Any], original: Mapping[str, tuple]) -> dict[str, tuple]:
    """``original`` state-dict shapes with ``removed`` ({class: units}) applied (tied names too)."""
    graph: PrunableGraph = analysis.graph
    out = {n: tuple(s) for n, s in original.items()}
    for fqn, dims in new_tensor_shapes(analysis, removed).items():
        for name in graph.aliases.get(fqn, [fqn]):
            if name in out:
                out[name] = tuple(len(dims[d]) if d in dims else s for d, s in enumerate(out[name]))
    return out


def describable_kinds(model: torch.nn.Module, analysis: Any, kinds: Any, round_to: Any = 1,
                      search: hf.ConfigSearch | None = None) -> dict[str, bool]:
    """For each kind, whether one HF config can describe every layer of it cut alike.

    Asked of the model's own class on the meta device: the smallest uniform cut of the kind
    (one ``round_to`` step in every group) must have a config whose skeleton has those shapes.
    BERT-style attentions derive the head width as ``hidden_size // num_attention_heads``, so no
    config describes fewer heads; Llama-style configs carry ``head_dim`` and do.  A model
    without an HF config describes everything (there is no config to keep in step).
    """
    from fxprune.passes.plan import allowed_removals, round_for

    search = search or (hf.ConfigSearch(model, skip=_SKIP_ATTR) if hf.config_of(model) is not None else None)
    kinds = list(kinds)
    if search is None or not search.usable:
        return {k: True for k in kinds}
    original = hf.state_shapes(model)
    out: dict[str, bool] = {}
    for kind in kinds:
        removed: dict[int, tuple[int, ...]] = {}
        for g in analysis.groups:
            if g.kind == kind:
                steps = allowed_removals(g.size, round_for(kind, round_to), 0.9)
                if len(steps) > 1:
                    removed[g.class_id] = tuple(range(steps[1]))
        if removed:
            target = pruned_shapes(analysis, removed, original)
            out[kind] = target == original or next(iter(search.search(target, limit=1)), None) is not None
    return out


def _config_describes(model: torch.nn.Module) -> bool:
    """Whether the model's own config rebuilds exactly its tensors (after depth changes)."""
    cfg = hf.config_of(model)
    if cfg is None or not hasattr(type(model), "_from_config"):
        return False
    try:
        return hf.state_shapes(hf.skeleton(model, cfg)) == hf.state_shapes(model)
    except Exception:  # noqa: BLE001 - the class refuses the config: it does not describe the model
        return False


def _int_attr_snapshot(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    return {
        name: {k: v for k, v in vars(m).items() if type(v) is int and not k.startswith("_")}
        for name, m in model.named_modules()
    }


def _restore_int_attrs(model: torch.nn.Module, snapshot: dict[str, dict[str, int]]) -> None:
    for name, m in model.named_modules():
        for k, v in snapshot.get(name, {}).items():
            setattr(m, k, v)


# ------------------------------------------------------------------------------------------
# Verification and the one-call rewrite
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` checked: ``rel_diff`` is max |diff| / max |output| in ``judged_in``."""

    exact_checked: bool
    max_abs_diff: float
    output_shapes_ok: bool
    finite: bool
    rel_diff: float = 0.0
    judged_in: str = "float32"
    shapes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    oracle: str = "zeroed"  # "zeroed", or "masked-router" when experts were removed

    def __str__(self) -> str:
        if not self.exact_checked:
            return "verified shapes and finiteness"
        where = f" at {len(self.shapes)} input shapes" if len(self.shapes) > 1 else ""
        masked = " with the removed experts masked in the router" if self.oracle == "masked-router" else ""
        return (f"verified outputs equal the zeroed original{masked}{where} (relative difference "
                f"{self.rel_diff:.1e} in {self.judged_in}, max |diff| {self.max_abs_diff:.2e})")


def zeroed_copy(model: torch.nn.Module, analysis: Any, plan: Any, weights: WeightUpdate | None = None) -> torch.nn.Module:
    """A copy of ``model`` (with ``weights`` applied) whose removed units' parameter slices are zero."""
    plan = as_plan(analysis, plan)
    groups = analysis.by_id
    graph = analysis.graph
    z = copy.deepcopy(model)
    if weights is not None and not weights.is_identity:
        weights.apply_to(z)
    params = dict(z.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for br in removed_branches(analysis, plan):  # a removed branch: its output is zero
            for name in br.zero_params:
                if name in params:
                    params[name].zero_()
        for gid, units in plan.items():
            if gid not in groups:
                continue
            for m in groups[gid].params:
                for name in graph.aliases.get(m.name, [m.name]):
                    if name in params:
                        idx = torch.as_tensor(m.indices(units), dtype=torch.long, device=params[name].device)
                        params[name].index_fill_(m.dim, idx, 0.0)
                        break
    return z


def compare_outputs(a: Any, b: Any, rtol: float | None = None, atol: float | None = None) -> tuple[bool, float, str]:
    """``(equal, max |diff|, why)`` for two outputs, ``a`` the reference.

    Equal means the relative difference ``max |a - b| / max |a|`` (worst output leaf, each
    relative to its own scale) is within ``rtol`` (default: :func:`~fxprune.passes.compare.tolerance`
    of the dtype, 1.5e-5 for float32); ``atol`` additionally accepts absolute differences below it.
    For a decision that also tries other shapes and float64, see :func:`verify`.
    """
    d = output_difference(a, b)
    if d.structural:
        return False, math.inf, d.why
    tol = rtol if rtol is not None else tolerance(d.dtype)
    if d.rel <= tol or (atol is not None and d.max_abs <= atol):
        return True, d.max_abs, ""
    return False, d.max_abs, f"relative difference {d.rel:.2e} (max |diff| {d.max_abs:.2e})"


def _float64_pair(a: Any, b: Any) -> Callable[[], tuple[Callable, Callable] | None]:
    """Lazily build float64 copies of two models for the judge (None when too big or impossible)."""

    def make() -> tuple[Callable, Callable] | None:
        ma, mb = (x.graph_module if isinstance(x, RewrittenProgram) else x for x in (a, b))
        if float64_bytes(ma, mb) > FLOAT64_BUDGET_BYTES:
            return None
        a64, b64 = float64_copy(ma), float64_copy(mb)
        if a64 is None or b64 is None:
            return None
        consts = (a.constant_kwargs if isinstance(a, RewrittenProgram) else {},
                  b.constant_kwargs if isinstance(b, RewrittenProgram) else {})
        return (_runner_with(a64, consts[0]), _runner_with(b64, consts[1]))

    return make


def _runner_with(model: Any, constants: Mapping[str, Any]) -> Callable:
    run = runner(model)
    return (lambda args, kwargs: run(args, {**kwargs, **constants})) if constants else run


def _model_runner(model: Any) -> Callable:
    if isinstance(model, RewrittenProgram):  # the program adds its own constant kwargs
        return lambda args, kwargs: runner(model.graph_module)(args, {**kwargs, **model.constant_kwargs})
    return runner(model)


def _cases(graph: PrunableGraph, inputs: dict | None) -> list:
    args = graph.example_args if inputs is None else ()
    kwargs = dict(inputs if inputs is not None else graph.example_kwargs)
    names: list[str] = []
    if args:
        import inspect

        try:
            names = list(inspect.signature(graph.module.forward).parameters)[: len(args)]
        except (TypeError, ValueError):
            names = []
    cases = check_cases(args, kwargs, dict(graph.constant_kwargs), _traced_dynamic_dims(graph), arg_names=names)
    if len(cases) > 1 and not graph.on_meta:  # keep the shapes the original program itself takes
        original = graph.exported_program.module()
        run = runner(original)
        kept = [cases[0]]
        for case in cases[1:]:
            try:
                run(*case)
            except Exception:  # noqa: BLE001 - a guard of the trace (a specialised size): not a check
                continue
            kept.append(case)
        cases = kept
    return cases


def _traced_dynamic_dims(graph: PrunableGraph) -> dict[str, dict[int, str] | None]:
    """Input name -> {dim: symbol} for the dims the exported program really kept dynamic.

    Not the spec passed to torch.export: with ``Dim.AUTO`` a dim may have been specialised
    (a pooling that needs a fixed length, say), and the program then only takes that size.
    """
    ep = graph.exported_program
    user = set(ep.graph_signature.user_inputs)
    spec: dict[str, dict[int, str] | None] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                dims = {d: str(s) for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt)}
                spec[node.name] = dims or None
    return spec


def verify(
    original: torch.nn.Module,
    pruned: Any,
    plan: Any,
    analysis: Any,
    inputs: dict | None = None,
    *,
    weights: WeightUpdate | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    cases: list | None = None,
) -> VerifyReport:
    """Check a pruned model: shapes, finiteness and, when every pruned group is exact, equality
    with the original (``weights`` applied) whose removed units are zeroed.

    Outputs are compared relative to their own scale, at the example inputs and at another batch
    size and sequence length (the dims the trace made dynamic), and judged again in float64 when
    float32 rounding cannot tell (see :mod:`fxprune.passes.compare`).  ``rtol`` overrides the
    float32 tolerance; ``cases`` (``[(args, kwargs), ...]``) the inputs compared.  Raises
    VerificationError on mismatch.
    """
    plan = as_plan(analysis, plan)
    graph = analysis.graph
    exact = _plan_is_exact(analysis, plan)
    masked = not exact and _plan_is_exact(analysis, plan, but_experts=True) and oracle_applies(analysis, plan)
    cases = cases or _cases(graph, inputs)
    if masked:  # removed experts: the original with their router logits at -inf
        def reference_run(args: tuple, kwargs: dict) -> Any:
            return masked_reference(original, analysis, plan, weights, args, kwargs)
        reference = None
        exact = True
    else:
        reference = zeroed_copy(original, analysis, plan, weights) if exact else original
        reference_run = runner(reference)
    with torch.no_grad():
        out_p = _model_runner(pruned)(*cases[0])
        out_o = reference_run(*cases[0])
    finite = all(bool(torch.isfinite(t).all()) for t in tensor_leaves(out_p, floating=True))
    if not finite:
        raise VerificationError("the pruned model produces non-finite outputs")
    la, lb = tensor_leaves(out_o), tensor_leaves(out_p)
    shapes_ok = [t.shape for t in la] == [t.shape for t in lb]
    if not shapes_ok:
        raise VerificationError(
            f"pruned output shapes {[tuple(t.shape) for t in lb]} differ from {[tuple(t.shape) for t in la]}"
        )
    if not exact:
        return VerifyReport(False, 0.0, shapes_ok, finite)
    oracle = "masked-router" if masked else "zeroed"
    if rtol is not None or atol is not None:  # the caller's own float32 tolerance, every case
        worst = 0.0
        for case in cases:
            ok, diff, why = compare_outputs(reference_run(*case), _model_runner(pruned)(*case), rtol, atol)
            if not ok:
                raise VerificationError(
                    f"pruned model differs from the original with the removed units zeroed: {why}. "
                    "This is a bug in fxprune's analysis or rewrite; please report it with the model."
                )
            worst = max(worst, diff)
        return VerifyReport(True, worst, shapes_ok, finite, judged_in="float32 (rtol/atol given)", oracle=oracle)
    float64 = _float64_pair(reference, pruned) if reference is not None else None
    floor = float32_casts(graph.exported_program.graph) + [r.eps_node for r in norm_rescales(analysis, plan.removed_by_class)]
    verdict = judge(reference_run, _model_runner(pruned), cases, float64=float64, float64_floor=floor)
    if not verdict:
        raise VerificationError(
            f"pruned model differs from the original with the removed units zeroed: {verdict.why}. "
            "This is a bug in fxprune's analysis or rewrite; please report it with the model."
        )
    return VerifyReport(True, verdict.max_abs, shapes_ok, finite, verdict.rel, verdict.judged_in, verdict.shapes,
                        verdict.notes, oracle)


def _plan_is_exact(analysis: Any, plan: Plan, but_experts: bool = False) -> bool:
    """Every planned width group is exact and every removed branch has a zeroing set
    (``but_experts``: experts groups aside, they have the masked-router oracle)."""
    groups = analysis.by_id
    blocks = getattr(analysis, "block_by_id", {})
    for gid, units in plan.items():
        if gid in blocks:
            if not blocks[gid].exact_for(units):
                return False
        elif not groups[gid].exact and not (but_experts and groups[gid].kind == "experts"):
            return False
    return True


def _call(model: Any, args: tuple, kwargs: dict) -> Any:
    with eval_mode(model):
        return model(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class RewriteResult:
    """What :func:`rewrite` returns.

    ``model`` is the user's own class, smaller (``returned == "module"``), or the rewritten
    ``GraphModule`` when the eager class cannot express the result (``returned == "graph"``, with
    the reason in ``notes``).  ``program`` is the rewritten graph either way.
    ``attribute_changes`` lists the per-module int attributes the rewrite set (module path ->
    attr -> (old, new)); ``config_updated`` says whether the HF config now describes the model.
    """

    model: Any
    program: RewrittenProgram
    plan: Plan
    returned: Literal["module", "graph"]
    verification: VerifyReport | None
    attribute_changes: Mapping[str, Mapping[str, tuple[int, int]]]
    config_updated: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    shapes: Mapping[str, list[int]]
    weights: WeightUpdate = IDENTITY
    depth: DepthRewrite | None = None  # layers deleted / branches zeroed (recorded by save)

    def __repr__(self) -> str:
        return (f"RewriteResult(model={type(self.model).__name__}, returned={self.returned!r}, "
                f"verification={self.verification})")


def _rewrite_requires(model: Any, analysis: Any, plan: Any, *args: Any, **kwargs: Any) -> None:
    check(isinstance(model, torch.nn.Module), BadInputError,
          f"rewrite() needs the user's nn.Module, got {type(model).__name__}")
    check(hasattr(analysis, "layouts") and hasattr(analysis, "graph"), BadInputError,
          "rewrite() needs the Analysis from fxprune.analyze(graph), not the graph itself")


def _rewrite_ensures(result: RewriteResult) -> None:
    if result.returned == "module" and isinstance(result.model, torch.nn.Module):
        got = {n: list(t.shape) for n, t in result.model.state_dict().items()}
        check(got == dict(result.shapes), VerificationError, "the returned module's shapes are not the recorded ones")


@fxpass("rewrite", requires=_rewrite_requires, ensures=_rewrite_ensures)
def rewrite(
    model: torch.nn.Module,
    analysis: Any,
    plan: Any,
    weights: WeightUpdate | None = None,
    *,
    verify_outputs: bool = True,
    inputs: dict | None = None,
    return_graph_on_mismatch: bool = True,
    reexport: bool = False,
) -> RewriteResult:
    """Apply ``plan`` ({group_id: units to remove}, or a Plan) to ``model`` and return a RewriteResult.

    ``result.model`` is a new instance of the user's own class (the input is untouched) with
    smaller layers, checked against the rewritten graph on the example inputs.  If the eager
    module cannot be made to match (its forward derives a size the graph no longer agrees with),
    the rewritten ``GraphModule`` is returned instead, and a note says why.  With
    ``verify_outputs=True`` (default) the result is also checked against the original (with
    ``weights`` applied) with the removed units zeroed whenever every pruned group is exact.
    """
    plan = as_plan(analysis, plan)
    graph: PrunableGraph = analysis.graph
    weights = weights or IDENTITY
    notes: list[str] = list(weights.notes)
    if graph.on_meta:
        program = rewrite_graph(analysis, plan, weights, reexport=True)
        mod = rewrite_module(model, analysis, plan, program, weights)
        return _result(mod.module, program, plan, mod, None, weights, notes, "module")
    program = rewrite_graph(analysis, plan, weights, reexport=reexport)
    mod = rewrite_module(model, analysis, plan, program, weights)
    result_model: Any = mod.module
    pin_notes = _pin_scales(mod.module, program)
    # A forward may derive its attention scale from the pruned head_dim at run time, an error that
    # can hide below float32 noise: with a pruned head_dim the module is judged in float64 when it
    # fits, and where the graph had to pin an SDPA default scale it is accepted on nothing less.
    head_dims = any(g in analysis.by_id and analysis.by_id[g].kind == "head_dim" for g in plan)
    cases = _cases(graph, inputs)
    matches = _GraphCheck(program, cases, force_float64=head_dims,
                          require_float64=bool(program.pinned_scales) and not pin_notes)
    verdict = matches(mod.module)
    if not verdict and mod.conflicts:
        verdict = _resolve_conflicts(mod, matches) or verdict
    if not verdict and mod.depth is not None and mod.depth.deleted:  # the forward indexes its layers:
        mod = rewrite_module(model, analysis, plan, program, weights, delete_layers=False)  # zero them
        pin_notes = _pin_scales(mod.module, program)
        verdict = matches(mod.module)
        if not verdict and mod.conflicts:
            verdict = _resolve_conflicts(mod, matches) or verdict
    if verdict and mod.depth is not None and mod.depth.problems:  # a branch module that could not go
        verdict = Verdict(False, math.inf, math.inf, "-", (), "; ".join(mod.depth.problems))
        mod.problems.extend(p for p in mod.depth.problems if p not in mod.problems)
    if verdict:
        notes.extend(_drop_untestable_changes(mod, matches))
    depth_problems = bool(mod.depth is not None and mod.depth.problems)
    search = hf.ConfigSearch(model, skip=_SKIP_ATTR) if hf.config_of(model) is not None else None
    if search is not None and search.usable and not depth_problems:
        def check() -> bool:
            return bool(matches(mod.module))

        mod.config_updated = _update_config(mod, search, check)
        if not verdict and (mod.config_updated or _per_block_configs(mod, search, analysis, plan, check)):
            verdict = matches(mod.module)
            mod.problems.clear()
    if verdict and mod.config_updated:
        folded, unfold = _fold_rebuilt_scalars(mod.module, analysis)
        if folded and matches(mod.module):
            notes.extend(folded)
        else:
            unfold()
    if verdict and not mod.config_updated and mod.depth is not None and mod.depth.changed:
        mod.config_updated = _config_describes(mod.module)
    if mod.depth is not None:
        notes.extend(mod.depth.notes)
    returned = "module"
    if not verdict:
        reason = "; ".join(mod.problems) or verdict.why
        hint = _scale_hint(program, pin_notes, analysis, plan)
        if not return_graph_on_mismatch:
            raise VerificationError(
                f"the pruned {type(model).__name__} does not match the rewritten graph: {reason}{hint}")
        note = (f"the pruned {type(model).__name__} could not be made to match the rewritten graph "
                f"({reason}){hint}; returning the rewritten GraphModule instead.")
        warnings.warn(f"fxprune: {note}", stacklevel=3)
        notes.append(note)
        result_model, returned = program.graph_module, "graph"
    else:
        notes.extend(pin_notes)
        notes.extend(verdict.notes)
    report = None
    if verify_outputs:
        report = verify(model, result_model if returned == "module" else program, plan, analysis, inputs,
                        weights=weights, cases=cases)
        notes.extend(n for n in report.notes if n not in notes)
    return _result(result_model, program, plan, mod, report, weights, notes, returned)


def _result(module: Any, program: RewrittenProgram, plan: Plan, mod: ModuleRewrite, report: VerifyReport | None,
            weights: WeightUpdate, notes: list[str], returned: str) -> RewriteResult:
    shapes = {n: list(t.shape) for n, t in module.state_dict().items()} if returned == "module" else {}
    return RewriteResult(module, program, plan, returned, report,
                         {k: dict(v) for k, v in mod.attribute_changes.items()}, mod.config_updated,
                         tuple(mod.problems), tuple(notes), shapes, weights, mod.depth)


class _GraphCheck:
    """The module-vs-graph judge: does a module compute what the rewritten graph computes?

    The graph's outputs at every check case (the example inputs and another batch size and
    sequence length) are computed once; a float64 copy of the graph is made only if a module's
    float32 difference is ambiguous (see :func:`~fxprune.passes.compare.judge`).
    """

    def __init__(self, program: RewrittenProgram, cases: list, force_float64: bool = False,
                 require_float64: bool = False) -> None:
        self.program = program
        self.force_float64, self.require_float64 = force_float64, require_float64
        run = _model_runner(program)
        self.cases, self.outputs = [], {}
        for i, case in enumerate(cases):
            try:
                out = run(*case)
            except Exception:  # noqa: BLE001 - a shape the graph does not take is not evidence
                if i == 0:
                    raise
                continue
            self.cases.append(case)
            self.outputs[id(case[1])] = out
        self._graph64: Any = None
        self._casts = float32_casts(program.graph_module.graph)  # once: every trial module is judged here

    def _reference(self, args: tuple, kwargs: dict) -> Any:
        return self.outputs[id(kwargs)]

    def _float64(self, module: torch.nn.Module) -> Callable[[], tuple[Callable, Callable] | None]:
        def make() -> tuple[Callable, Callable] | None:
            gm = self.program.graph_module
            if float64_bytes(gm, module) > FLOAT64_BUDGET_BYTES:
                return None
            if self._graph64 is None:
                self._graph64 = float64_copy(gm) or False
            m64 = float64_copy(module)
            if not self._graph64 or m64 is None:
                return None
            return _runner_with(self._graph64, self.program.constant_kwargs), runner(m64)

        return make

    def __call__(self, module: torch.nn.Module) -> Verdict:
        try:
            return judge(self._reference, runner(module), self.cases, float64=self._float64(module),
                         force_float64=self.force_float64, require_float64=self.require_float64,
                         float64_floor=self._casts)
        except Exception as exc:  # noqa: BLE001 - a failing forward is a mismatch
            return Verdict(False, math.inf, math.inf, "-", (), f"{type(exc).__name__}: {exc}")


def _resolve_conflicts(mod: ModuleRewrite, matches: _GraphCheck) -> Verdict | None:
    """Settle attributes whose old value several constants shared (kv heads == repeats, say).

    Values are tried jointly per attribute name (every layer's ``num_key_value_groups`` takes
    the same choice); the rewritten graph is the judge.  Every combination is tried (at most 32),
    because a value is accepted only if the judge can tell it from the others: when several
    combinations match, an attribute they disagree on is not read by the forward, and it keeps
    its old value (with a note) instead of an arbitrary guess.
    """
    import itertools

    by_name: dict[str, list[tuple[str, int, list[int]]]] = {}
    for owner, attr, old, vals in mod.conflicts:
        by_name.setdefault(attr, []).append((owner, old, vals))
    names = sorted(by_name)
    options = [sorted({v for _, old, vals in by_name[n] for v in vals} | {None}, key=lambda v: (v is not None, v or 0)) for n in names]

    def apply(combo: tuple) -> None:
        for name, choice in zip(names, combo):
            for owner, old, vals in by_name[name]:
                target = old if choice is None or choice not in vals else choice
                setattr(mod.module.get_submodule(owner) if owner else mod.module, name, target)

    matching: list[tuple[tuple, Verdict]] = []
    for trial, combo in enumerate(itertools.product(*options)):
        if trial >= 32:
            break
        apply(combo)
        verdict = matches(mod.module)
        if verdict:
            matching.append((combo, verdict))
    if not matching:
        apply(tuple(None for _ in names))
        return None
    unread = {n for i, n in enumerate(names) if len({c[i] for c, _ in matching}) > 1}
    chosen = [m for m in matching if all(m[0][i] is None for i, n in enumerate(names) if n in unread)]
    if not chosen:  # several values work and the old one does not: cannot tell which is right
        apply(tuple(None for _ in names))
        mod.problems.append(
            f"cannot tell which value of {sorted(unread)} is right: several give the same outputs")
        return None
    combo, verdict = chosen[0]
    apply(combo)
    for name, choice in zip(names, combo, strict=True):
        for owner, old, vals in by_name[name]:
            target = old if choice is None or choice not in vals else choice
            if target != old:
                mod.attribute_changes.setdefault(owner, {})[name] = (old, target)
    for name in sorted(unread):
        mod.notes.append(
            f"{name} (on {', '.join(sorted(o or '<root>' for o, _, _ in by_name[name]))}) kept its old value: the "
            "forward does not read it at the checked shapes, so its new value cannot be determined")
    mod.problems.clear()
    return verdict


def _drop_untestable_changes(mod: ModuleRewrite, matches: _GraphCheck) -> list[str]:
    """Undo attribute changes the judge cannot tell apart from the old value.

    An int attribute is changed because a shape constant with its old value changed in its
    module.  When several attributes of that module share the old value, the constant may have
    come from any of them; one whose old value gives the same outputs is not read by the forward,
    so the new value would be a guess: it is put back, with a note.
    """
    notes: list[str] = []
    for owner, attrs in list(mod.attribute_changes.items()):
        target = mod.module.get_submodule(owner) if owner else mod.module
        for attr, (old, new) in list(attrs.items()):
            peers = [k for k, v in vars(target).items() if type(v) is int and k != attr and not k.startswith("_")
                     and (v == old or mod.attribute_changes.get(owner, {}).get(k, (None,))[0] == old)]
            if not peers:
                continue  # the only attribute with that value: the constant came from it
            setattr(target, attr, old)
            if matches(mod.module):
                del attrs[attr]
                notes.append(f"{owner or '<root>'}.{attr} kept its old value {old}: the forward does not read it "
                             f"at the checked shapes, so {new} could not be confirmed")
            else:
                setattr(target, attr, new)
        if not attrs:
            del mod.attribute_changes[owner]
    return notes + list(mod.notes)


# ------------------------------------------------------------------------------------------
# The attention scale in the eager module
# ------------------------------------------------------------------------------------------
ScalePinner = Callable[[torch.nn.Module, float], None]
SCALE_PINNERS: dict[type, ScalePinner] = {}
"""Module type -> how to give it a fixed attention scale (for forwards that derive it from q)."""


def register_scale_pinner(*types: type) -> Callable[[ScalePinner], ScalePinner]:
    """Register how an attention class takes a fixed scale, e.g. ``lambda m, s: setattr(m, "scale", s)``.

    When a plan removes q/k ``head_dim`` units, the rewritten graph keeps the original scale
    ``1/sqrt(head_dim)``.  A forward that computes its scale from ``q.shape[-1]`` at run time
    (SDPA's default, or ``q.shape[-1] ** -0.5``) would use the new head_dim: such a module is
    returned only if a pinner for its class is registered; otherwise the graph is returned.
    """

    def deco(fn: ScalePinner) -> ScalePinner:
        for t in types:
            SCALE_PINNERS[t] = fn
        return fn

    return deco


def _pin_scales(model: torch.nn.Module, program: RewrittenProgram) -> list[str]:
    """Apply registered scale pinners to modules whose attention head_dim changed."""
    notes = []
    for old_e, new_e, mod_path in program.pinned_scales.values():
        try:
            owner = model.get_submodule(mod_path) if mod_path else model
        except AttributeError:
            continue
        pinner = next((SCALE_PINNERS[c] for c in type(owner).__mro__ if c in SCALE_PINNERS), None)
        if pinner is not None:
            pinner(owner, 1.0 / math.sqrt(old_e))
            notes.append(f"{mod_path or '<root>'}: attention scale pinned to 1/sqrt({old_e}) (head_dim {old_e}->{new_e})")
    return notes


def _scale_hint(program: RewrittenProgram, pinned: list[str], analysis: Any, plan: Plan) -> str:
    """Why a module may disagree with the graph when a plan shrinks attention head_dims."""
    changed = {p for (_, _, p) in program.pinned_scales.values()}
    if pinned or not (changed or any(analysis.by_id[g].kind == "head_dim" for g in plan)):
        return ""
    where = f" in {', '.join(sorted(p or '<root>' for p in changed))}" if changed else ""
    return (f"; the q/k head_dim of the attention{where} changed: a forward that derives its scale from "
            "q.shape[-1] at run time (the SDPA default, or q.shape[-1] ** -0.5) no longer uses the original "
            "1/sqrt(head_dim), which the graph keeps (register a pinner with "
            "fxprune.passes.rewrite.register_scale_pinner, or pass the scale explicitly)")
