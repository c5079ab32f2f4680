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

    changed: dict[str, dict[ArgPath, tuple[int, int]]] = {}
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
    # 6. a view that was legal on the original strides may not be after pruning (a kernel can
    #    pick another output layout for the new head_dim), so views become reshapes.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
    gm.graph.lint()
    gm.recompile()

    program = RewrittenProgram(gm, graph, dict(graph.constant_kwargs), changed, removed)
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


@register_module_fixer(torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
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
                   weights: WeightUpdate | None = None) -> ModuleRewrite:
    """A smaller copy of ``model``: updated and sliced tensors, refreshed size attributes, int attrs."""
    new_model = copy.deepcopy(model)
    if weights is not None and not weights.is_identity:
        weights.apply_to(new_model)
    shapes = new_tensor_shapes(analysis, plan.removed_by_class)
    if weights is not None:  # tensors an update added are sliced like the tensors they sit beside
        shapes = {**shapes, **{f: d for f in weights.added if (d := added_dims(f, shapes))}}
    apply_shapes_to_module(new_model, shapes, analysis.graph.aliases)
    changes, problems, conflicts = _fix_int_attributes(new_model, analysis, program)
    return ModuleRewrite(new_model, changes, problems, False, conflicts)


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


def _update_config(mod: "ModuleRewrite", old_model: torch.nn.Module, check: Callable[[], bool]) -> bool:
    """Adopt the first candidate config under which the module still matches the graph."""
    model = mod.module
    before_cfg = getattr(model, "config", None)
    snapshot = _int_attr_snapshot(model)
    for cfg in hf.config_candidates(model, old_model, mod.attribute_changes, skip=_SKIP_ATTR):
        model.config = cfg
        hf.copy_int_attrs(hf.skeleton(model, cfg), model)
        if check():
            return True
        model.config = before_cfg
        _restore_int_attrs(model, snapshot)
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
    exact_checked: bool
    max_abs_diff: float
    output_shapes_ok: bool
    finite: bool

    def __str__(self) -> str:
        what = "outputs equal the zeroed original" if self.exact_checked else "shapes and finiteness"
        return f"verified {what} (max |diff| {self.max_abs_diff:.2e})"


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
        for gid, units in plan.items():
            for m in groups[gid].params:
                for name in graph.aliases.get(m.name, [m.name]):
                    if name in params:
                        idx = torch.as_tensor(m.indices(units), dtype=torch.long, device=params[name].device)
                        params[name].index_fill_(m.dim, idx, 0.0)
                        break
    return z


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 2e-2
    return 1e-4, 1e-4


def compare_outputs(a: Any, b: Any, rtol: float | None = None, atol: float | None = None) -> tuple[bool, float, str]:
    la, lb = tensor_leaves(a), tensor_leaves(b)
    if len(la) != len(lb):
        return False, float("inf"), f"{len(la)} outputs vs {len(lb)}"
    worst = 0.0
    for i, (x, y) in enumerate(zip(la, lb)):
        if x.shape != y.shape:
            return False, float("inf"), f"output {i} shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False, float("inf"), f"output {i} differs"
            continue
        r, at = _tolerance(x.dtype)
        r, at = rtol or r, atol or at
        diff = (x.float() - y.float()).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        scale = x.float().abs().max().item() if x.numel() else 1.0
        if not torch.allclose(x.float(), y.float(), rtol=r, atol=at * max(1.0, scale)):
            return False, worst, f"output {i} differs by up to {worst:.3e}"
    return True, worst, ""


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
) -> VerifyReport:
    """Check a pruned model: shapes, finiteness and, when every pruned group is exact, equality
    with the original (``weights`` applied) whose removed units are zeroed.

    Raises VerificationError on mismatch.
    """
    plan = as_plan(analysis, plan)
    graph = analysis.graph
    groups = analysis.by_id
    exact = all(groups[g].exact for g in plan)
    kwargs = {**(inputs if inputs is not None else graph.example_kwargs), **graph.constant_kwargs}
    args = graph.example_args if inputs is None else ()
    with torch.no_grad():
        out_p = _call(pruned, args, kwargs)
        if exact:
            out_o = _call(zeroed_copy(original, analysis, plan, weights), args, kwargs)
        else:
            out_o = _call(original, args, kwargs)
    finite = all(bool(torch.isfinite(t).all()) for t in tensor_leaves(out_p, floating=True))
    if not finite:
        raise VerificationError("the pruned model produces non-finite outputs")
    la, lb = tensor_leaves(out_o), tensor_leaves(out_p)
    shapes_ok = [t.shape for t in la] == [t.shape for t in lb]
    if not shapes_ok:
        raise VerificationError(
            f"pruned output shapes {[tuple(t.shape) for t in lb]} differ from {[tuple(t.shape) for t in la]}"
        )
    worst = 0.0
    if exact:
        ok, worst, why = compare_outputs(out_o, out_p, rtol, atol)
        if not ok:
            raise VerificationError(
                f"pruned model differs from the original with the removed units zeroed: {why}. "
                "This is a bug in fxprune's analysis or rewrite; please report it with the model."
            )
    return VerifyReport(exact, worst, shapes_ok, finite)


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
    kwargs = {**(inputs or graph.example_kwargs), **graph.constant_kwargs}
    args = graph.example_args if inputs is None else ()
    with torch.no_grad():
        graph_out = program(*args, **(inputs or graph.example_kwargs))
    ok, why = _matches_graph(mod.module, graph_out, args, kwargs)
    if not ok and mod.conflicts:
        ok = _resolve_conflicts(mod, graph_out, args, kwargs)
    if ok:
        mod.config_updated = _update_config(
            mod, model, lambda: _matches_graph(mod.module, graph_out, args, kwargs)[0]
        )
    returned = "module"
    if not ok:
        reason = "; ".join(mod.problems) or why
        if not return_graph_on_mismatch:
            raise VerificationError(f"the pruned {type(model).__name__} does not match the rewritten graph: {reason}")
        note = (f"the pruned {type(model).__name__} could not be made to match the rewritten graph "
                f"({reason}); returning the rewritten GraphModule instead.")
        warnings.warn(f"fxprune: {note}", stacklevel=3)
        notes.append(note)
        result_model, returned = program.graph_module, "graph"
    report = None
    if verify_outputs:
        report = verify(model, result_model if returned == "module" else program, plan, analysis, inputs,
                        weights=weights)
    return _result(result_model, program, plan, mod, report, weights, notes, returned)


def _result(module: Any, program: RewrittenProgram, plan: Plan, mod: ModuleRewrite, report: VerifyReport | None,
            weights: WeightUpdate, notes: list[str], returned: str) -> RewriteResult:
    shapes = {n: list(t.shape) for n, t in module.state_dict().items()} if returned == "module" else {}
    return RewriteResult(module, program, plan, returned, report,
                         {k: dict(v) for k, v in mod.attribute_changes.items()}, mod.config_updated,
                         tuple(mod.problems), tuple(notes), shapes, weights)


def _matches_graph(module: torch.nn.Module, graph_out: Any, args: tuple, kwargs: dict) -> tuple[bool, str]:
    with torch.no_grad():
        try:
            ok, _, why = compare_outputs(graph_out, _call(module, args, kwargs))
            return ok, why
        except Exception as exc:  # noqa: BLE001 - a failing forward is a mismatch
            return False, f"{type(exc).__name__}: {exc}"


def _resolve_conflicts(mod: ModuleRewrite, graph_out: Any, args: tuple, kwargs: dict,
                       judge: Callable[[torch.nn.Module], bool] | None = None) -> bool:
    """Settle attributes whose old value several constants shared (kv heads == repeats, say).

    Values are tried jointly per attribute name (every layer's ``num_key_value_groups`` takes
    the same choice), smallest search first; the rewritten graph is the judge (``judge(module)``
    replaces the comparison of outputs, e.g. a shape check on meta).
    """
    import itertools

    if judge is None:
        def judge(module: torch.nn.Module) -> bool:
            return _matches_graph(module, graph_out, args, kwargs)[0]

    by_name: dict[str, list[tuple[str, int, list[int]]]] = {}
    for owner, attr, old, vals in mod.conflicts:
        by_name.setdefault(attr, []).append((owner, old, vals))
    names = sorted(by_name)
    options = [sorted({v for _, old, vals in by_name[n] for v in vals} | {None}, key=lambda v: (v is not None, v or 0)) for n in names]
    for trial, combo in enumerate(itertools.product(*options)):
        if trial >= 32:
            break
        for name, choice in zip(names, combo):
            for owner, old, vals in by_name[name]:
                target = old if choice is None or choice not in vals else choice
                setattr(mod.module.get_submodule(owner) if owner else mod.module, name, target)
        if judge(mod.module):
            for name, choice in zip(names, combo):
                for owner, old, vals in by_name[name]:
                    target = old if choice is None or choice not in vals else choice
                    if target != old:
                        mod.attribute_changes.setdefault(owner, {})[name] = (old, target)
            mod.problems.clear()
            return True
    return False
