"""Analysis pass: find the coupled dependency groups of an exported graph.

    PrunableGraph --analyze--> Analysis

Each (tensor, dim) of the graph is a product of atoms (see ``atoms.py``).  Per-op rules from the
registry (``rules.py`` holds the API, ``op_rules.py`` the rules) tie the atoms of an op's inputs
and outputs.  When every node has been visited, the leaf classes of the union-find are the
coupled groups: removing unit ``u`` of a class removes the matching slice of every parameter,
buffer and activation that carries it.

Two more facts are computed per class:

* **frozen**: the class touches a graph input or output, an op without a rule, a user ``ignore``,
  or a tie the algebra cannot express.  Frozen classes are reported, never pruned.
* **exact**: removing units equals zeroing the parameter slices they cover.  A zero-propagation
  dataflow tracks, per tensor and class, whether the removed units are zero once the parameter
  slices are zeroed.  Contracting over a class is exact when one operand is zero there; a mean,
  softmax or norm over it is not.

In-place ops run their functional form's rule; the zero dataflow follows what a write through a
view does to its base (see ``rules.py``).  Parameters the graph never reads are tied to the space
their shape and owner imply, or frozen (:func:`_tie_unread_tensors`): never a group of their own.
Dynamic sizes computed as ``batch * heads`` are resolved to the node that multiplies the static
factor in (:func:`_resolve_symbolic_sizes`), so the rewrite recomputes them.

The result is an immutable :class:`Analysis`.  It also keeps the provenance of every tie, split
and freeze (which op, at which source line), so ``Analysis.coupling_graph()`` (a networkx
MultiGraph), ``Analysis.why(a, b)`` and ``Analysis.explain(x)`` can say *why* two parameters are
coupled or *why* a space is frozen.  Like torchao's pt2e annotations, every visited node also gets
a typed, read-only :class:`NodeAnnotation` in ``node.meta["fxprune"]``; no pass reads it back.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch.fx as fx

import fxprune.passes.op_rules  # noqa: F401 - registers the rules
from fxprune.errors import AnalysisError, BadInputError
from fxprune.graph import (
    FrozenClass,
    Group,
    Member,
    PrunableGraph,
    Unsupported,
    layout_classes,
    source_location,
)
from fxprune.passes.atoms import AtomStore, Site
from fxprune.passes.base import check, fxpass
from fxprune.passes.depth import DepthInfo, detect_branches
from fxprune.passes.experts import detect_experts
from fxprune.passes.op_rules import probe_zero, propagate_values
from fxprune.passes.rules import (AnalysisContext, ZeroSpec, alias_effects, find_rule, flat_args,
                                   is_metadata_only, site_of)
from fxprune.types import ArgPath, GroupKind, Layout, NormScale, Tag, TensorRef
from fxprune.util.names import common_block, matches_prefix, module_of

META_KEY = "fxprune"
"""``node.meta`` key of the :class:`NodeAnnotation` the analysis leaves on every visited node."""


@dataclasses.dataclass(frozen=True)
class NodeAnnotation:
    """What the analysis found for one node: each output's per-dim layout (None: symbolic dim)."""

    layouts: tuple[tuple[Layout | None, ...], ...]
    rule: str | None  # the rule's function name, None for placeholders/outputs


@dataclasses.dataclass(frozen=True)
class Provenance:
    """The analysis' working state, kept for explanations: atoms, which tensor dim made each, edges."""

    store: AtomStore
    dims: Mapping[TensorRef, list[list[int]]]
    origin: Mapping[int, tuple[TensorRef, int]]
    tensor_names: Mapping[str, str]  # placeholder node -> parameter/buffer FQN


@dataclasses.dataclass(frozen=True)
class Analysis:
    """The result of :func:`analyze`: prunable groups, frozen spaces, ops without rules.

    It is a read-only sequence of its groups (``for g in analysis``, ``len(analysis)``,
    ``analysis[0]``) and also looks groups up by id (``analysis["model.layers.0.mlp:channels"]``).
    The rewrite reads ``layouts``, ``size_args``, ``offset_args``, ``sources`` and
    ``attention_nodes`` from here, never from the graph.
    """

    graph: PrunableGraph
    groups: tuple[Group, ...]
    frozen: tuple[FrozenClass, ...]
    unsupported: tuple[Unsupported, ...]
    layouts: Mapping[TensorRef, tuple[Layout | None, ...]]
    size_args: Mapping[str, Mapping[ArgPath, Layout | None]]
    offset_args: Mapping[str, Mapping[ArgPath, tuple[Layout, int]]]
    sources: frozenset[str]
    attention_nodes: tuple[str, ...]
    norm_scales: tuple[NormScale, ...] = ()  # RMS norms whose weight and eps the rewrite rescales
    ignore: tuple[str, ...] = ()
    rule_defects: tuple[str, ...] = ()
    depth: DepthInfo = dataclasses.field(default_factory=DepthInfo, repr=False)
    experts: tuple = dataclasses.field(default=(), repr=False)  # ExpertRouting per experts group
    provenance: Provenance | None = dataclasses.field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- sequence of groups
    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return self.group(key)
        return self.groups[key]

    def __bool__(self) -> bool:
        return bool(self.groups)

    @functools.cached_property
    def by_id(self) -> dict[str, Group]:
        return {g.id: g for g in self.groups}

    def group(self, group_id: str) -> Group:
        """The group with this id (KeyError with close matches otherwise); ``"blocks"`` too."""
        try:
            return self.by_id[group_id] if group_id in self.by_id else self.block_by_id[group_id]
        except KeyError:
            close = [g for g in self.by_id if group_id.split(":")[0] in g][:5]
            raise KeyError(f"no group {group_id!r}" + (f"; close: {close}" if close else "")) from None

    @property
    def branches(self) -> tuple:
        """Every residual branch found (frozen ones too), see :mod:`fxprune.passes.depth`."""
        return self.depth.branches

    @property
    def blocks(self) -> tuple:
        """The blocks groups (kind ``blocks``): their units are the removable branches."""
        return self.depth.groups

    @functools.cached_property
    def block_by_id(self) -> dict[str, Any]:
        return {g.id: g for g in self.depth.groups}

    @functools.cached_property
    def class_to_group(self) -> dict[int, str]:
        return {g.class_id: g.id for g in self.groups}

    @functools.cached_property
    def param_layouts(self) -> dict[str, tuple[Layout | None, ...]]:
        """Parameter/buffer FQN -> layout per dim (each name of a tied tensor)."""
        names = {**self.graph.param_of, **self.graph.buffer_of}
        return {fqn: self.layouts[TensorRef(node)] for node, fqn in names.items() if TensorRef(node) in self.layouts}

    # ---------------------------------------------------------------- views
    def summary(self, max_rows: int | None = 60) -> str:
        """A table of groups: id, kind, units, exact, member count, parameters they shrink."""
        from fxprune.report import group_table

        return group_table(self, max_rows=max_rows)

    def coupling_graph(self) -> Any:
        """The coupling graph as a ``networkx.MultiGraph`` (see :mod:`fxprune.coupling`)."""
        from fxprune.coupling import coupling_graph

        return coupling_graph(self)

    def why(self, a: str, b: str) -> str:
        """Why two parameters (``name`` or ``name:dim``) or groups are coupled: the chain of ops."""
        from fxprune.coupling import why

        return why(self, a, b)

    def explain(self, target: str) -> str:
        """What a group, parameter or ``parameter:dim`` belongs to, and why it is frozen if it is."""
        from fxprune.coupling import explain

        return explain(self, target)

    def coverage(self) -> Any:
        """Which ops froze which spaces and how many parameters that costs (see
        :mod:`fxprune.coverage_report`), most costly first."""
        from fxprune.coverage_report import coverage

        return coverage(self)

    def to_graphml(self, path: str) -> str:
        """Write the coupling graph as GraphML (for yEd, Gephi, Cytoscape)."""
        from fxprune.coupling import write_graphml

        return write_graphml(self, path)

    def __repr__(self) -> str:
        return (f"Analysis(groups={len(self.groups)}, frozen={len(self.frozen)}, "
                f"unsupported={len(self.unsupported)})")


def _requires(graph: Any, ignore: Any = (), **_: Any) -> None:
    check(isinstance(graph, PrunableGraph), BadInputError,
          f"analyze() needs the PrunableGraph from fxprune.trace(model, ...), got {type(graph).__name__}")


def _ensures(result: Analysis) -> None:
    ids = [g.id for g in result.groups]
    check(len(ids) == len(set(ids)), AnalysisError, "group ids are not unique")
    for g in result.groups:
        check(bool(g.params), AnalysisError, f"group {g.id} has no parameter member")
        check(g.size >= 2, AnalysisError, f"group {g.id} has fewer than 2 units")


@fxpass("analyze", requires=_requires, ensures=_ensures)
def analyze(graph: PrunableGraph, ignore: Iterable[str] | str = (), *, annotate: bool = True) -> Analysis:
    """Find the coupled dependency groups of a traced graph.

    ``ignore`` takes parameter or module name prefixes (matched on ``.`` boundaries) whose
    dimensions must not change.  Returns an :class:`Analysis`; the graph is not modified except
    for the read-only ``node.meta["fxprune"]`` annotations (``annotate=False`` skips them).
    """
    ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    ep = graph.exported_program
    g = ep.graph
    ctx = AnalysisContext(g)
    param_of, buffer_of = graph.param_of, graph.buffer_of
    seen_tensors: dict[str, TensorRef] = {}  # canonical FQN -> placeholder, to tie shared weights
    defects: list[str] = []
    rules_used: dict[str, str] = {}

    for node in g.nodes:
        if node.op == "placeholder":
            fqn = param_of.get(node.name) or buffer_of.get(node.name)
            ctx.store.site = Site(node.name, "placeholder", fqn or f"graph input {node.name}")
            _visit_placeholder(ctx, node, param_of, ignore, graph)
            if fqn is not None and ctx.ref(node) is not None:
                canonical = graph.canonical(fqn)
                if canonical in seen_tensors:
                    ctx.store.site = Site(node.name, "tied weights", f"{fqn} is {canonical}")
                    ctx.tie_all(seen_tensors[canonical], ctx.ref(node))
                else:
                    seen_tensors[canonical] = ctx.ref(node)
        elif node.op == "call_function":
            ctx.store.site = site_of(node)
            rule = _visit_call(ctx, node, defects)
            if rule is not None:
                rules_used[node.name] = rule
            propagate_values(ctx, node)  # routing indices: follow or freeze the space they index
        elif node.op == "output":
            ctx.store.site = Site(node.name, "output", "graph output (the model's return value)")
            for a in flat_args(node):
                r = ctx.ref(a)
                if r is not None:
                    ctx.freeze_ref(r, "graph output")
        elif node.op == "get_attr":
            ctx.store.site = Site(node.name, "get_attr", f"constant attribute {node.target}")
            r = ctx.ref(node)
            if r is not None:
                ctx.freeze_ref(r, f"constant attribute {node.target}")
                ctx.zero_never(r)
    _tie_unread_tensors(ctx, graph)
    ctx.store.site = None
    result = _finalize(ctx, graph, param_of, buffer_of, ignore, defects)
    result = dataclasses.replace(result, depth=detect_branches(ctx, graph, ignore),
                                 experts=detect_experts(ctx, result))
    if annotate:
        _annotate(g, ctx, result, rules_used)
    return result


def _visit_placeholder(ctx: AnalysisContext, node: fx.Node, param_of: Mapping[str, str],
                       ignore: Sequence[str], graph: PrunableGraph) -> None:
    r = ctx.ref(node)
    if r is None:
        return
    name = param_of.get(node.name) or graph.buffer_of.get(node.name)
    if name is None:
        ctx.freeze_ref(r, f"graph input {node.name}")
        ctx.zero_never(r)
        return
    ctx.d(r)  # materialise atoms for every parameter dim
    aliases = graph.aliases.get(name, [name])
    if any(matches_prefix(a, ignore) for a in aliases):
        ctx.store.site = Site(node.name, "ignore=", name)
        ctx.freeze_ref(r, f"ignored by the user: {name}")
    if node.name in param_of:
        ctx.zero_specs[r] = ZeroSpec("param")
    else:
        ctx.zero_never(r)


def _visit_call(ctx: AnalysisContext, node: fx.Node, defects: list[str]) -> str | None:
    """Run the op's rule, then check the rule's duties (see ``rules.py``)."""
    if node.target is operator.getitem:
        return None  # getitem refs resolve to (source, index) in ctx.ref; nothing to tie
    outs = ctx.output_refs(node)
    if not outs and not any(ctx.ref(a) is not None for a in flat_args(node)):
        return None  # pure symbolic-int arithmetic, asserts on sizes
    rule = find_rule(node.target)
    if rule is None:
        if not outs and is_metadata_only(node):
            return None
        ctx.unsupported_op(node)
        _record_alias_effects(ctx, node)
        return None
    ctx.current = node.name
    try:
        rule(ctx, node)
    except Exception as exc:  # noqa: BLE001 - a rule that fails must freeze, never guess
        ctx.unsupported_op(node, f"rule failed: {type(exc).__name__}: {exc}")
        _record_alias_effects(ctx, node)
        return rule.__name__
    finally:
        ctx.current = None
    _record_alias_effects(ctx, node)
    problems = ctx.unmet_duties(node)
    if problems:
        where = f"{node.target} at node {node.name} ({source_location(node)})"
        defects.append(f"rule {rule.__name__} for {where}: " + "; ".join(problems))
        reason = f"the rule for {node.target} left this space unaccounted at node {node.name}"
        for r in outs:
            ctx.freeze_ref(r, reason)
            ctx.zero_specs.setdefault(r, ZeroSpec("never"))
    return rule.__name__


def _record_alias_effects(ctx: AnalysisContext, node: fx.Node) -> None:
    """Which outputs are views of which inputs, and which inputs the op writes in place."""
    views, writes = alias_effects(node, ctx)
    for out, base in views:
        if out != base:
            ctx.view_of[out] = base
    if writes:
        ctx.writes[node.name] = writes


# ------------------------------------------------------------------------------------------
# Finalisation: layouts, zero dataflow, exactness, groups
# ------------------------------------------------------------------------------------------
def _finalize(ctx: AnalysisContext, graph: PrunableGraph, param_of: Mapping[str, str],
              buffer_of: Mapping[str, str], ignore: tuple[str, ...], defects: list[str]) -> Analysis:
    store = ctx.store
    _resolve_symbolic_sizes(ctx)
    # ``layouts`` (what the rewrite reads) has None for dynamic dims; the zero dataflow also
    # looks inside them, at the static classes a dynamic dim is a product with ([B*H]).
    full: dict[TensorRef, tuple[Layout, ...]] = {ref: tuple(store.layout(atoms) for atoms in dims)
                                                 for ref, dims in ctx.dims.items()}
    layouts: dict[TensorRef, tuple[Layout | None, ...]] = {
        ref: tuple(lay if isinstance(s, int) else None for lay, s in zip(full[ref], ctx.shape(ref)))
        for ref in full
    }
    classes_cache: dict[TensorRef, frozenset[int]] = {}

    def classes_of(ref: TensorRef) -> frozenset[int]:
        if ref not in classes_cache:
            out: set[int] = set()
            for lay in full.get(ref, ()):
                out.update(layout_classes(lay))
            classes_cache[ref] = frozenset(out)
        return classes_cache[ref]

    # --- zero dataflow, and exactness of contractions over a class (read when their op runs)
    contractions: dict[str | None, list] = collections.defaultdict(list)
    for nz in ctx.needs_zero:
        contractions[nz.node].append(nz)

    def check_contractions(node_name: str | None, zero: Mapping[TensorRef, set[int]]) -> None:
        for nz in contractions.pop(node_name, ()):
            lay = full[nz.ref][nz.dim] if nz.ref in full else None
            for c in layout_classes(lay) if lay is not None else ():
                if not any(c in zero.get(o, ()) for o in nz.operands):
                    store.mark_inexact([c], f"{nz.reason}: neither operand is zero on removed units")

    zero = _zero_dataflow(ctx, full, classes_of, check_contractions)
    for name in list(contractions):
        check_contractions(name, zero)
    value_zero = frozenset(c for r in ctx.attention_values for c in zero.get(r, ()))

    # --- RMS norms the rewrite rescales.  Only over the residual width: every norm there shrinks
    # by the same factor, so one config eps can describe them on a reload.  A norm over another
    # width (OLMo2's q_norm over the heads, Qwen3's over head_dim, DeepSeek's over a LoRA rank) would
    # need its own eps, which an HF config cannot hold, and stays inexact; so does one whose weight
    # is not a tensor of the model.
    norm_scales = []
    for site, ref, dim in ctx.norm_scales:
        lay = full[ref][dim]
        fqn = param_of.get(site.weight) or buffer_of.get(site.weight)
        classes = layout_classes(lay)
        if fqn is None or not isinstance(ctx.shape(ref)[dim], int) or \
                any(_kind_of(store, c, value_zero) != "hidden" for c in classes):
            store.mark_inexact(classes, f"mean over this dim at {site.eps_node}")
            continue
        norm_scales.append(site._replace(weight=fqn, layout=lay))

    # --- members per leaf class (parameters and buffers)
    members: dict[int, list[Member]] = collections.defaultdict(list)
    placeholder_order: dict[str, int] = {}
    for node in ctx.graph.nodes:
        if node.op != "placeholder":
            continue
        name = param_of.get(node.name) or buffer_of.get(node.name)
        ref = TensorRef(node.name)
        if name is None or ref not in layouts:
            continue
        kind = "parameter" if node.name in param_of else "buffer"
        placeholder_order[node.name] = len(placeholder_order)
        for dim, lay in enumerate(layouts[ref]):
            if lay is None:
                continue
            for c in layout_classes(lay):
                members[c].append(Member(name, dim, node.name, lay, c, kind))

    # --- groups and frozen classes
    drafts: list[tuple[tuple, int, GroupKind, list[Member], list[str]]] = []
    frozen: list[FrozenClass] = []
    for c, mems in members.items():
        size = store.size[c]
        if not isinstance(size, int):
            continue
        reason = store.frozen_reason(c)
        if reason is None and not any(m.kind == "parameter" for m in mems):
            reason = "no parameter to shrink"
        if reason is None and size < 2:
            reason = "a single unit"
        if reason is not None:
            frozen.append(FrozenClass(c, size, reason, tuple(mems)))
            continue
        kind = _kind_of(store, c, value_zero)
        order = (min(placeholder_order.get(m.node, 10**9) for m in mems), _KIND_ORDER[kind], c)
        drafts.append((order, c, kind, mems, store.inexact_reasons(c)))
    drafts.sort(key=lambda d: d[0])
    groups = []
    for gid, (_, c, kind, mems, inexact) in zip(_ids(drafts), drafts):
        groups.append(Group(
            id=gid, kind=kind, size=store.size[c], exact=not inexact, members=tuple(mems), class_id=c,
            inexact_reasons=tuple(inexact), block=common_block(m.name for m in mems if m.kind == "parameter"),
        ))
    provenance = Provenance(store, ctx.dims, ctx.origin, {**param_of, **buffer_of})
    return Analysis(
        graph=graph,
        groups=tuple(groups),
        frozen=tuple(sorted(frozen, key=lambda f: f.class_id)),
        unsupported=tuple(ctx.unsupported),
        layouts=layouts,
        size_args=_resolve_size_args(ctx, layouts),
        offset_args={
            name: {path: (layouts[ref][dim], off) for path, (ref, dim, off) in entries.items()}
            for name, entries in ctx.offset_args.items()
        },
        sources=frozenset(ctx.sources),
        attention_nodes=tuple(ctx.attention_nodes),
        norm_scales=tuple(norm_scales),
        ignore=ignore,
        rule_defects=tuple(defects),
        provenance=provenance,
    )


def _zero_dataflow(ctx: AnalysisContext, layouts: Mapping[TensorRef, Any], classes_of,
                   after_node: Any = None) -> dict[TensorRef, set[int]]:
    """Per tensor, the classes on which it is zero once the removed parameter slices are zero.

    Nodes are visited in order; ``after_node(name, zero)`` runs once a node's outputs are known
    and before its in-place writes take effect.  A write into ``v`` (a view of a base ``b``)
    changes what every alias of ``b`` holds from then on: an alias stays zero on a class only
    if it was, and the written values are zero there too (classes the written view does not
    carry lie outside the written region and keep their status).
    """
    zero: dict[TensorRef, set[int]] = {}
    roots: dict[TensorRef, TensorRef] = {}

    def root(ref: TensorRef) -> TensorRef:
        if ref not in roots:
            seen = [ref]
            while seen[-1] in ctx.view_of and len(seen) < 256:
                seen.append(ctx.view_of[seen[-1]])
            roots[ref] = seen[-1]
        return roots[ref]

    for node in ctx.graph.nodes:
        for ref in ([ctx.ref(node)] if node.op == "placeholder" else ctx.output_refs(node)):
            if ref is None or ref not in layouts:
                continue
            zero[ref] = _zero_of(ctx, node, ref, zero, classes_of)
        if after_node is not None:
            after_node(node.name, zero)
        for written in ctx.writes.get(node.name, ()):
            outs = ctx.output_refs(node)
            new = zero.get(outs[0], set()) if outs else set()
            base = root(written)
            written_classes = classes_of(written)
            for alias in [r for r in zero if r not in outs and root(r) == base]:
                keep = new | (classes_of(alias) - written_classes)
                zero[alias] = zero[alias] & keep
    return zero


def _zero_of(ctx: AnalysisContext, node: fx.Node, ref: TensorRef, zero: Mapping[TensorRef, set[int]],
             classes_of) -> set[int]:
    """The classes one op output is zero on, from its zero spec and its inputs' zero sets."""
    spec = ctx.zero_specs.get(ref)
    mine = classes_of(ref)
    if spec is None or spec.kind == "never":
        return set()
    if spec.kind == "param":
        return set(mine)
    zs: set[int] = set()
    for c in mine:
        if spec.kind == "pass":
            carriers = [i for i in spec.inputs if c in classes_of(i)]
            ok = bool(carriers) and all(c in zero.get(i, ()) for i in carriers)
        elif spec.kind == "contract":
            prod_ok = any(c in zero.get(p, ()) for p in spec.products if c in classes_of(p))
            ok = prod_ok and all(c in zero.get(a, ()) for a in spec.additive)
        else:  # probe
            pattern = tuple((i is not None and c in classes_of(i) and c in zero.get(i, ())) for i in spec.inputs)
            ok = any(pattern) and probe_zero(node, pattern)
        if ok:
            zs.add(c)
    return zs


# ------------------------------------------------------------------------------------------
# Parameters the trace never reads
# ------------------------------------------------------------------------------------------
UNREAD = "not read by the traced graph (used on a path the trace did not take)"


def _tie_unread_tensors(ctx: AnalysisContext, graph: PrunableGraph) -> None:
    """Give every dim of a parameter the graph never reads a space, or freeze it: never a group alone.

    Such a parameter (Dinov2's ``mask_token``, Wav2Vec2's ``masked_spec_embed``) is used on a
    path the trace did not take, where it stands in for, or is added to, activations of the
    module that owns it.  So each of its dims joins the space of the same size among the dims of
    the *read* parameters of the nearest enclosing module that has one.  When several spaces
    there have that size, the residual width (a space a norm or an embedding acts on) is the one
    a stand-in vector belongs to; without a unique such space the dim is frozen, and so are the
    candidates, since the untraced path may combine the parameter with any of them.  A dim with
    no candidate is frozen.  Buffers never form a group anyway: a floating-point one follows an
    unambiguous space and is frozen alone otherwise (``original_inv_freq`` next to two RoPE
    tables); ids and masks are frozen whole.
    """
    store = ctx.store
    placeholders = [n for n in ctx.graph.nodes if n.op == "placeholder"]
    names = {**graph.param_of, **graph.buffer_of}
    read = [(names[n.name], ctx.ref(n)) for n in placeholders
            if n.users and n.name in names and ctx.ref(n) is not None]
    per_tensor = collections.Counter(graph.canonical(names[n.name]) for n in placeholders if n.name in names)
    for node in placeholders:
        fqn = names.get(node.name)
        ref = ctx.ref(node)
        if fqn is None or ref is None or node.users or per_tensor[graph.canonical(fqn)] > 1:
            continue  # read, or another name of a tensor that is tied to its reads already
        store.site = Site(node.name, "unread parameter", fqn)
        val = ctx.val(ref)
        if node.name not in graph.param_of and (val is None or not val.is_floating_point()):
            ctx.freeze_ref(ref, f"buffer {fqn} is {UNREAD}")
            continue
        for dim, atoms in enumerate(ctx.d(ref)):
            if atoms:
                _tie_unread_dim(ctx, fqn, ref, dim, read, strict=node.name in graph.param_of)


def _tie_unread_dim(ctx: AnalysisContext, fqn: str, ref: TensorRef, dim: int,
                    read: Sequence[tuple[str, TensorRef]], strict: bool) -> None:
    store = ctx.store
    size = ctx.shape(ref)[dim]
    parts = fqn.split(".")[:-1]
    for depth in range(len(parts), -1, -1):
        prefix = ".".join(parts[:depth])
        spaces: dict[Layout, tuple[TensorRef, int]] = {}  # by layout: one entry per distinct space
        for name, other in read:
            if prefix and not name.startswith(prefix + "."):
                continue
            for d, s in enumerate(ctx.shape(other)):
                if s == size and ctx.d(other)[d]:
                    spaces.setdefault(store.layout(ctx.d(other)[d]), (other, d))
        if not spaces:
            continue
        if len(spaces) > 1:
            residual = {k: v for k, v in spaces.items() if _is_residual(store, ctx.d(v[0])[v[1]])}
            spaces = residual if len(residual) == 1 else spaces
        if len(spaces) == 1:
            (other, d), = spaces.values()
            store.unify_prod(ctx.d(ref)[dim], ctx.d(other)[d])
            return
        reason = (f"{fqn} is {UNREAD} and has the size ({size}) of several spaces of "
                  f"{prefix or 'the model'}; it could meet any of them there")
        ctx.freeze_dim(ref, dim, reason)
        for other, d in spaces.values() if strict else ():
            ctx.freeze_dim(other, d, reason)
        return
    ctx.freeze_dim(ref, dim, f"{fqn} is {UNREAD}; no read parameter has a dim of its size ({size})")


def _is_residual(store: AtomStore, atoms: Sequence[int]) -> bool:
    """A space a norm or an embedding acts on (the residual width), by its tags."""
    for a in atoms:
        for c in [store.find(a), *store.leaves(a)]:
            if store.all_tags(c) & {Tag.NORMALIZED, Tag.EMBEDDING_DIM}:
                return True
    return False


# ------------------------------------------------------------------------------------------
# Shape constants computed from dynamic sizes
# ------------------------------------------------------------------------------------------
def _resolve_symbolic_sizes(ctx: AnalysisContext) -> None:
    """Turn each dynamic size entry (``bsz * 4`` in ``view(x, [bsz * 4, s, 8])``, ``n // 4`` in a
    ``repeat``) into a size argument of the node that brings in its static constant, or freeze
    the static spaces it cannot follow.

    The entry must be a product/quotient of ``sym_size`` terms (which follow pruning by
    themselves) and at most one integer constant; the static classes of the space it sizes must
    be those of the terms, times (or divided by) the constant's.
    """
    store = ctx.store
    for node_name, path, size_node, atoms in ctx.symbolic_sizes:
        want = _static_leaves(ctx, atoms)
        terms = _size_terms(size_node)
        need: list[int] | None = None
        const = None
        if terms is not None:
            num, den = [], []
            for kind, a, b, sign in terms:
                if kind == "const":
                    if const is not None:  # two constants: which one would change is ambiguous
                        terms = None
                        break
                    const = (a, b, sign)
                else:
                    tref = ctx.ref(a)
                    if tref is None or not isinstance(b, int) or b >= ctx.rank(tref):
                        terms = None
                        break
                    (num if sign > 0 else den).extend(_static_leaves(ctx, ctx.d(tref)[b]))
        if terms is not None:
            have = collections.Counter(num)
            have.subtract(den)
            diff = collections.Counter(want)
            diff.subtract(have)  # what the constant must bring (> 0) or take away (< 0)
            extra = sorted(diff.elements())
            missing = sorted((-diff).elements())
            if not extra and not missing:
                need = []
            elif const is not None and (not missing if const[2] > 0 else not extra):
                need = extra if const[2] > 0 else missing
        ok = need is not None
        if ok and need:
            owner, idx, _ = const
            total = 1
            for leaf in need:
                total *= store.size[leaf]
            prev = ctx.size_args[owner.name].get(ArgPath("args", idx))
            ok = owner.args[idx] == total and (prev is None or sorted(map(store.find, prev[1])) == sorted(need))
            if ok:
                ctx.size_args[owner.name][ArgPath("args", idx)] = ("atoms", need)
        if not ok:  # the static spaces it sizes, and those it reads sizes of, must not change
            read = [leaf for t, d in _sizes_read(size_node) for leaf in _static_leaves(ctx, _dim_atoms(ctx, t, d))]
            frozen = want + read
            if frozen:
                store.site = Site(node_name, "dynamic size", f"{path} of node {node_name}")
                store.freeze(frozen, f"a size computed from dynamic dims at node {node_name} ({path}) "
                                     "cannot be recomputed for this space")
                store.site = None


def _static_leaves(ctx: AnalysisContext, atoms: Sequence[int]) -> list[int]:
    out: list[int] = []
    for a in atoms:
        for leaf in ctx.store.leaves(a):
            if isinstance(ctx.store.size[leaf], int) and ctx.store.size[leaf] > 1:
                out.append(leaf)
    return out


def _sizes_read(n: Any) -> list[tuple[Any, Any]]:
    """Every (tensor node, dim) whose ``sym_size`` an integer expression reads, through any op."""
    out, stack, seen = [], [n], set()
    while stack:
        x = stack.pop()
        if not isinstance(x, fx.Node) or x in seen:
            continue
        seen.add(x)
        if x.op == "call_function" and str(x.target) == "aten.sym_size.int":
            out.append((x.args[0], x.args[1]))
        elif x.op == "call_function":
            stack.extend(a for a in x.args if isinstance(a, fx.Node))
    return out


def _dim_atoms(ctx: AnalysisContext, t: Any, d: Any) -> list[int]:
    ref = ctx.ref(t)
    return ctx.d(ref)[d] if ref is not None and isinstance(d, int) and d < ctx.rank(ref) else []


def _size_terms(n: Any, sign: int = 1, depth: int = 0) -> list[tuple[str, Any, Any, int]] | None:
    """A dynamic size as a product and quotient of terms: ("const", node, arg index, +-1) and
    ("size", tensor node, dim, +-1); None when it is anything else (a sum, a max...)."""
    if not isinstance(n, fx.Node) or depth > 16 or n.op != "call_function":
        return None
    if n.target in (operator.mul, operator.floordiv):
        out: list[tuple[str, Any, Any, int]] = []
        for i, a in enumerate(n.args):
            s = sign if (i == 0 or n.target is operator.mul) else -sign
            if isinstance(a, int):
                out.append(("const", n, i, s))
                continue
            sub = _size_terms(a, s, depth + 1)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if str(n.target) == "aten.sym_size.int":
        return [("size", n.args[0], n.args[1], sign)]
    return None


def _resolve_size_args(ctx: AnalysisContext, layouts) -> dict[str, dict[ArgPath, Layout | None]]:
    """Each recorded size argument as the layout whose kept size is its new value.

    A constant whose every class is frozen can never change (RoPE's ``[..., -1, 2]`` pair): it is
    left out, so the module rewrite does not read it as a demand on an attribute of equal value.
    """
    out: dict[str, dict[ArgPath, Layout | None]] = {}
    for name, entries in ctx.size_args.items():
        resolved = {}
        for path, entry in entries.items():
            if entry[0] == "dim":
                lay = layouts[entry[1]][entry[2]]
            else:
                lay = ctx.store.layout(entry[1]) if entry[1] else ()
            if lay and path.where != "split" and all(ctx.store.freeze_of(c) for c in layout_classes(lay)):
                continue
            resolved[path] = lay
        out[name] = resolved
    return out


def _kind_of(store: AtomStore, c: int, value_zero: frozenset[int] = frozenset()) -> GroupKind:
    """A class's kind from its tags and its enclosing spaces' tags.

    Heads: a broadcast (expand/repeat) class is a GQA ``head_repeat`` unless attention's values
    are zero on it, i.e. carry it themselves (MLA's heads, which a shared RoPE key is broadcast
    over).  A factor of a heads space that has other static factors is ``kv_heads``;
    the static factor of ``[batch * heads]`` is just ``heads``.
    """
    tags = store.all_tags(c)
    parent_tags: set[Tag] = set()
    head_products = False
    for anc in store.ancestors(c):
        anc_tags = store.all_tags(anc)
        parent_tags |= anc_tags
        if Tag.HEADS in anc_tags:
            static = [leaf for leaf in store.leaves(anc) if isinstance(store.size[leaf], int) and store.size[leaf] > 1]
            head_products = head_products or len(static) > 1
    if Tag.EXPERTS in tags:
        return "experts"
    if Tag.HEADS in tags or Tag.HEADS in parent_tags:
        if Tag.BROADCAST in tags and c not in value_zero:
            return "head_repeat"
        if head_products:
            return "kv_heads"
        return "heads"
    if Tag.HEAD_DIM in tags or Tag.HEAD_DIM in parent_tags:
        return "head_dim"
    if Tag.EMBEDDING_DIM in tags or Tag.NORMALIZED in tags:
        return "hidden"
    return "channels"


_KIND_ORDER: dict[str, int] = {"heads": 0, "kv_heads": 1, "head_repeat": 2, "head_dim": 3, "channels": 4,
                               "experts": 5, "hidden": 6}


def _ids(drafts: Sequence[tuple]) -> list[str]:
    seen: collections.Counter = collections.Counter()
    ids = []
    for _, _, kind, mems, _ in drafts:
        first = next((m for m in mems if m.kind == "parameter"), mems[0])
        base = f"{module_of(first.name)}:{kind}"
        seen[base] += 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return ids


def _annotate(g: fx.Graph, ctx: AnalysisContext, result: Analysis, rules_used: Mapping[str, str]) -> None:
    for node in g.nodes:
        refs = [ctx.ref(node)] if node.op in ("placeholder", "get_attr") else ctx.output_refs(node)
        lays = tuple(result.layouts.get(r, ()) for r in refs if r is not None)
        if lays:
            node.meta[META_KEY] = NodeAnnotation(lays, rules_used.get(node.name))


def annotation(node: fx.Node) -> NodeAnnotation | None:
    """The analysis' annotation of a node, if the node was analysed."""
    return node.meta.get(META_KEY)
