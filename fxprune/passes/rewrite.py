"""Rewrite pass: apply a plan to the exported graph and to the user's own module.

The graph rewrite slices parameters and buffers, recomputes every shape constant the analysis
recorded (view/reshape/expand sizes, slice offsets, split sizes, conv/group-norm group counts),
pins the attention scale to its original value, and index-selects the outputs of factory ops
(``arange`` feeding RoPE, say) along pruned dims.  It is then re-exported, so the result carries
fresh shape metadata and is what the ONNX export consumes.

The module rewrite gives the user their own class back with smaller layers: new parameters,
consistent ``in_features``/``out_features``-style attributes (peft reads them), and per-layer int
attributes that the forward reads (``head_dim``, ``num_key_value_groups``...).  Those attributes
are found from the graph, not from a table of model names: a shape constant that changed sits in
a node whose ``nn_module_stack`` names its module, and that module's int attribute holding the
old value is the one to update.  The result is always checked against the rewritten graph.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import PlanError, VerificationError
from fxprune.graph import PrunableGraph, kept_indices, kept_size, layout_size, normalize_plan

aten = torch.ops.aten


# ------------------------------------------------------------------------------------------
# Plan resolution
# ------------------------------------------------------------------------------------------
def removed_by_class(graph: PrunableGraph, plan: dict[str, Iterable[int]]) -> dict[int, list[int]]:
    """Validate ``plan`` ({group_id: units}) and key it by analysis class."""
    if graph.groups is None:
        raise PlanError("the graph has not been analysed; call fxprune.analyze(graph) first")
    groups = {g.id: g for g in graph.groups}
    clean = normalize_plan(plan, groups)
    return {groups[gid].class_id: units for gid, units in clean.items()}


def _param_layouts(graph: PrunableGraph) -> dict[str, list]:
    """Parameter/buffer FQN -> layout per dim."""
    sig = graph.exported_program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    layouts = graph.analysis.layouts
    return {fqn: layouts[(node, None)] for node, fqn in names.items() if (node, None) in layouts}


def new_tensor_shapes(graph: PrunableGraph, removed: dict[int, list[int]]) -> dict[str, dict[int, np.ndarray]]:
    """For each parameter/buffer FQN that shrinks: {dim: kept indices}."""
    out: dict[str, dict[int, np.ndarray]] = {}
    seen: set[str] = set()
    for fqn, lays in _param_layouts(graph).items():
        canonical = graph.aliases.get(fqn, [fqn])[0]
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
    changed_constants: dict[str, dict[tuple, tuple[int, int]]]  # node -> path -> (old, new)
    removed: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # class -> units
    _exported: Any = None

    @property
    def exported_program(self):
        """The pruned program re-exported (fresh shape metadata); built on first use."""
        if self._exported is None:
            self._exported = _reexport(self.graph_module, self.source)
        return self._exported

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **{**kwargs, **self.constant_kwargs})


def rewrite_graph(graph: PrunableGraph, plan: dict[str, Iterable[int]], *, reexport: bool = False) -> RewrittenProgram:
    """Apply ``plan`` to the exported program and return the smaller program."""
    removed = removed_by_class(graph, plan)
    analysis = graph.analysis
    gm = graph.exported_program.module()
    nodes = {n.name: n for n in gm.graph.nodes}

    # 1. parameters and buffers
    for fqn, dims in new_tensor_shapes(graph, removed).items():
        for alias in graph.aliases.get(fqn, [fqn]):
            if _has_attr_path(gm, alias):
                _set_attr_tensor(gm, alias, dims)

    changed: dict[str, dict[tuple, tuple[int, int]]] = {}
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
            if path[0] == "split":
                split_sizes[path[1]] = new
                continue
            if new != old:
                _set_path(node, path, new)
                changed.setdefault(name, {})[path] = (old, new)
        if split_sizes and any(
            kept_size(entries[("split", k)], removed) != layout_size(entries[("split", k)]) for k in split_sizes
        ):
            sizes = [split_sizes[k] for k in sorted(split_sizes)]
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.target = aten.split_with_sizes.default
            node.args = (node.args[0], sizes, dim)
            node.kwargs = {}
            changed.setdefault(name, {})[("split",)] = (-1, -1)
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
        lays = analysis.layouts.get((name, None))
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
            changed.setdefault(name, {})[("index_select", d)] = (layout_size(lay), len(kept))
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


def _set_path(node: fx.Node, path: tuple, value: int) -> None:
    where, key, *rest = path
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


def _has_attr_path(root: torch.nn.Module, fqn: str) -> bool:
    obj: Any = root
    for part in fqn.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return isinstance(obj, torch.Tensor)


def _set_attr_tensor(root: torch.nn.Module, fqn: str, dims: dict[int, np.ndarray]) -> None:
    mod_path, _, attr = fqn.rpartition(".")
    mod = root.get_submodule(mod_path) if mod_path else root
    old = getattr(mod, attr)
    new = _slice_tensor(old.detach(), dims)
    if isinstance(old, torch.nn.Parameter):
        mod._parameters[attr] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
    elif attr in getattr(mod, "_buffers", {}):
        mod._buffers[attr] = new
    else:
        setattr(mod, attr, new)


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


try:  # transformers' GPT-2 style Conv1D (a Linear with a transposed weight)
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    register_module_fixer(_HFConv1D)(_fix_hf_conv1d)
except ImportError:  # pragma: no cover
    pass


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


def rewrite_module(
    model: torch.nn.Module, graph: PrunableGraph, plan: dict[str, Iterable[int]], program: RewrittenProgram
) -> ModuleRewrite:
    """A smaller copy of ``model``: sliced tensors, refreshed size attributes, fixed int attrs."""
    removed = removed_by_class(graph, plan)
    new_model = copy.deepcopy(model)
    apply_shapes_to_module(new_model, new_tensor_shapes(graph, removed), graph.aliases)
    changes, problems, conflicts = _fix_int_attributes(new_model, graph, program)
    return ModuleRewrite(new_model, changes, problems, False, conflicts)


_SKIP_ATTR = re.compile(r"(idx|index|layer|seed|id$|_id$|vocab|position|max_|rank)", re.I)


def _fix_int_attributes(model: torch.nn.Module, graph: PrunableGraph, program: RewrittenProgram):
    """Update module int attributes that produced shape constants which changed in the graph."""
    ep_nodes = {n.name: n for n in graph.exported_program.graph.nodes}
    # requirements[(module_path, attr)] -> set of new values demanded
    requirements: dict[tuple[str, str], set[int]] = {}
    olds: dict[tuple[str, str], int] = {}
    all_constants: list[tuple[str, int, int]] = []  # (module path, old, new) for every size arg
    for name, entries in graph.analysis.size_args.items():
        node = ep_nodes.get(name)
        if node is None:
            continue
        mod_path = _module_path(node)
        splits = {p: lay for p, lay in entries.items() if p[0] == "split" and lay is not None}
        if splits and node.target in (aten.split.Tensor, aten.split_copy.Tensor):
            news = {kept_size(lay, program.removed) for lay in splits.values()}
            if len(news) == 1:  # still an even split: its split_size follows the module attr
                all_constants.append((mod_path, node.args[1], news.pop()))
        for path, lay in entries.items():
            if lay is None or path[0] == "split":
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


def _config_candidates(new_model: torch.nn.Module, old_model: torch.nn.Module, changes):
    """Yield HF configs whose rebuilt skeleton has exactly the pruned parameter shapes.

    Candidate fields are int config entries whose old value changed somewhere in the model (and
    head counts scaled by a width ratio).  Assignments with the fewest changed fields come first.
    Equal shapes are necessary, not sufficient (4 heads of 6 vs 2 heads of 12), so the caller
    also checks each candidate against the rewritten graph.
    """
    import itertools

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
        k: v for k, v in config.to_dict().items() if type(v) is int and not _SKIP_ATTR.search(k)
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


def _update_config(mod: "ModuleRewrite", old_model: torch.nn.Module, check: Callable[[], bool]) -> bool:
    """Adopt the first candidate config under which the module still matches the graph."""
    model = mod.module
    before_cfg = getattr(model, "config", None)
    snapshot = _int_attr_snapshot(model)
    for cfg in _config_candidates(model, old_model, mod.attribute_changes):
        model.config = cfg
        _copy_int_attrs(_skeleton(model, cfg), model)
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


def _skeleton(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model)._from_config(cfg)


def _mismatch(model: torch.nn.Module, cfg: Any, target: dict[str, tuple]) -> int:
    """How far the skeleton built from ``cfg`` is from the pruned model (0 = identical shapes)."""
    try:
        skeleton = _skeleton(model, cfg)
    except Exception:  # noqa: BLE001 - an inconsistent config is just a bad candidate
        return 10**9
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    return sum(shapes.get(n) != s for n, s in target.items()) + sum(n not in target for n in shapes)


def _copy_int_attrs(src: torch.nn.Module, dst: torch.nn.Module) -> None:
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


# ------------------------------------------------------------------------------------------
# Verification and the one-call rewrite
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class VerifyReport:
    exact_checked: bool
    max_abs_diff: float
    output_shapes_ok: bool
    finite: bool

    def __str__(self) -> str:
        what = "outputs equal the zeroed original" if self.exact_checked else "shapes and finiteness"
        return f"verified {what} (max |diff| {self.max_abs_diff:.2e})"


def zeroed_copy(model: torch.nn.Module, graph: PrunableGraph, plan: dict[str, Iterable[int]]) -> torch.nn.Module:
    """A copy of ``model`` with the parameter slices of the removed units set to zero."""
    groups = {g.id: g for g in graph.groups}
    clean = normalize_plan(plan, groups)
    z = copy.deepcopy(model)
    params = dict(z.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for gid, units in clean.items():
            for m in groups[gid].params:
                for name in graph.aliases.get(m.name, [m.name]):
                    if name in params:
                        idx = torch.as_tensor(m.indices(units), dtype=torch.long, device=params[name].device)
                        params[name].index_fill_(m.dim, idx, 0.0)
                        break
    return z


def _leaves(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 2e-2
    return 1e-4, 1e-4


def compare_outputs(a: Any, b: Any, rtol: float | None = None, atol: float | None = None) -> tuple[bool, float, str]:
    la, lb = _leaves(a), _leaves(b)
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
    plan: dict[str, Iterable[int]],
    graph: PrunableGraph,
    inputs: dict | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerifyReport:
    """Check a pruned model: shapes, finiteness and, when every pruned group is exact, equality
    with the original whose removed units are zeroed.  Raises VerificationError on mismatch."""
    groups = {g.id: g for g in graph.groups}
    clean = normalize_plan(plan, groups)
    exact = all(groups[g].exact for g in clean)
    kwargs = {**(inputs if inputs is not None else graph.example_kwargs), **graph.constant_kwargs}
    args = graph.example_args if inputs is None else ()
    with torch.no_grad():
        out_p = _call(pruned, args, kwargs)
        if exact:
            out_o = _call(zeroed_copy(original, graph, clean).eval(), args, kwargs)
        else:
            out_o = _call(original.eval() if isinstance(original, torch.nn.Module) else original, args, kwargs)
    finite = all(bool(torch.isfinite(t).all()) for t in _leaves(out_p) if t.is_floating_point())
    if not finite:
        raise VerificationError("the pruned model produces non-finite outputs")
    la, lb = _leaves(out_o), _leaves(out_p)
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
    was_training = getattr(model, "training", None)
    try:
        if isinstance(model, torch.nn.Module) and not isinstance(model, fx.GraphModule):
            model.eval()
        return model(*args, **kwargs)
    finally:
        if was_training and isinstance(model, torch.nn.Module) and not isinstance(model, fx.GraphModule):
            model.train()


@dataclasses.dataclass
class RewriteResult:
    """What ``rewrite`` hands back besides the module (also attached as ``module.fxprune``)."""

    program: RewrittenProgram
    attribute_changes: dict
    problems: list[str]
    config_updated: bool
    verification: VerifyReport | None
    shapes: dict[str, list[int]]


def rewrite(
    model: torch.nn.Module,
    graph: PrunableGraph,
    plan: dict[str, Iterable[int]],
    *,
    verify_outputs: bool = True,
    inputs: dict | None = None,
    return_graph_on_mismatch: bool = True,
    reexport: bool = False,
) -> torch.nn.Module:
    """Apply ``plan`` ({group_id: units to remove}) and return a smaller model.

    Returns a new instance of the user's own class (the input is untouched) with smaller layers,
    checked against the rewritten graph on the example inputs.  If the eager module cannot be
    made to match (its forward derives a size the graph no longer agrees with), the rewritten
    ``GraphModule`` is returned instead, with a warning that says why.  With
    ``verify_outputs=True`` (default) the result is also checked against the original with the
    removed units zeroed whenever every pruned group is exact.
    """
    removed_by_class(graph, plan)  # validates the plan before any work
    if graph.on_meta:
        program = rewrite_graph(graph, plan, reexport=True)
        mod = rewrite_module(model, graph, plan, program)
        _attach(mod.module, program, mod, None, graph, plan)
        return mod.module
    program = rewrite_graph(graph, plan, reexport=reexport)
    mod = rewrite_module(model, graph, plan, program)
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
    if not ok:
        reason = "; ".join(mod.problems) or why
        if not return_graph_on_mismatch:
            raise VerificationError(f"the pruned {type(model).__name__} does not match the rewritten graph: {reason}")
        warnings.warn(
            f"fxprune: the pruned {type(model).__name__} could not be made to match the rewritten graph "
            f"({reason}); returning the rewritten GraphModule instead.",
            stacklevel=2,
        )
        result_model = program.graph_module
    report = None
    if verify_outputs:
        report = verify(model, result_model if result_model is mod.module else program, plan, graph, inputs)
    _attach(result_model, program, mod, report, graph, plan)
    return result_model


def _matches_graph(module: torch.nn.Module, graph_out: Any, args: tuple, kwargs: dict) -> tuple[bool, str]:
    with torch.no_grad():
        try:
            ok, _, why = compare_outputs(graph_out, _call(module, args, kwargs))
            return ok, why
        except Exception as exc:  # noqa: BLE001 - a failing forward is a mismatch
            return False, f"{type(exc).__name__}: {exc}"


def _resolve_conflicts(mod: ModuleRewrite, graph_out: Any, args: tuple, kwargs: dict) -> bool:
    """Settle attributes whose old value several constants shared (kv heads == repeats, say).

    Values are tried jointly per attribute name (every layer's ``num_key_value_groups`` takes
    the same choice), smallest search first; the rewritten graph is the judge.
    """
    import itertools

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
        if _matches_graph(mod.module, graph_out, args, kwargs)[0]:
            for name, choice in zip(names, combo):
                for owner, old, vals in by_name[name]:
                    target = old if choice is None or choice not in vals else choice
                    if target != old:
                        mod.attribute_changes.setdefault(owner, {})[name] = (old, target)
            mod.problems.clear()
            return True
    return False


def _attach(module: Any, program: RewrittenProgram, mod: ModuleRewrite, report, graph, plan) -> None:
    shapes = {n: list(t.shape) for n, t in module.state_dict().items()} if isinstance(module, torch.nn.Module) else {}
    info = RewriteResult(program, mod.attribute_changes, mod.problems, mod.config_updated, report, shapes)
    try:
        object.__setattr__(module, "fxprune", info)
    except Exception:  # noqa: BLE001
        pass
