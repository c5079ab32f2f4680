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
from fxprune.passes.rules import AnalysisContext, ZeroSpec, find_rule, flat_args, site_of
from fxprune.types import ArgPath, GroupKind, Layout, Tag, TensorRef
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
        if not outs and _is_metadata_only(node):
            return None
        ctx.unsupported_op(node)
        return None
    try:
        rule(ctx, node)
    except Exception as exc:  # noqa: BLE001 - a rule that fails must freeze, never guess
        ctx.unsupported_op(node, f"rule failed: {type(exc).__name__}: {exc}")
        return rule.__name__
    problems = ctx.unmet_duties(node)
    if problems:
        where = f"{node.target} at node {node.name} ({source_location(node)})"
        defects.append(f"rule {rule.__name__} for {where}: " + "; ".join(problems))
        reason = f"the rule for {node.target} left this space unaccounted at node {node.name}"
        for r in outs:
            ctx.freeze_ref(r, reason)
            ctx.zero_specs.setdefault(r, ZeroSpec("never"))
    return rule.__name__


def _is_metadata_only(node: fx.Node) -> bool:
    name = str(node.target)
    return any(k in name for k in ("_assert", "sym_constrain", "sym_size", "sym_numel", "sym_stride"))


# ------------------------------------------------------------------------------------------
# Finalisation: layouts, zero dataflow, exactness, groups
# ------------------------------------------------------------------------------------------
def _finalize(ctx: AnalysisContext, graph: PrunableGraph, param_of: Mapping[str, str],
              buffer_of: Mapping[str, str], ignore: tuple[str, ...], defects: list[str]) -> Analysis:
    store = ctx.store
    layouts: dict[TensorRef, tuple[Layout | None, ...]] = {}
    for ref, dims in ctx.dims.items():
        layouts[ref] = tuple(
            store.layout(atoms) if isinstance(s, int) else None for atoms, s in zip(dims, ctx.shape(ref))
        )
    classes_cache: dict[TensorRef, frozenset[int]] = {}

    def classes_of(ref: TensorRef) -> frozenset[int]:
        if ref not in classes_cache:
            out: set[int] = set()
            for lay in layouts.get(ref, ()):
                if lay is not None:
                    out.update(layout_classes(lay))
            classes_cache[ref] = frozenset(out)
        return classes_cache[ref]

    zero = _zero_dataflow(ctx, layouts, classes_of)
    # --- exactness of contractions over a class
    for nz in ctx.needs_zero:
        lay = layouts[nz.ref][nz.dim] if nz.ref in layouts else None
        if lay is None:
            continue
        for c in layout_classes(lay):
            if not any(c in zero.get(o, ()) for o in nz.operands):
                store.mark_inexact([c], f"{nz.reason}: neither operand is zero on removed units")

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
        kind = _kind_of(store, c)
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
        ignore=ignore,
        rule_defects=tuple(defects),
        provenance=provenance,
    )


def _zero_dataflow(ctx: AnalysisContext, layouts: Mapping[TensorRef, Any], classes_of) -> dict[TensorRef, set[int]]:
    """Per tensor, the classes on which it is zero once the removed parameter slices are zero."""
    zero: dict[TensorRef, set[int]] = {}
    for node in ctx.graph.nodes:
        for ref in ([ctx.ref(node)] if node.op == "placeholder" else ctx.output_refs(node)):
            if ref is None or ref not in layouts:
                continue
            spec = ctx.zero_specs.get(ref)
            mine = classes_of(ref)
            if spec is None or spec.kind == "never":
                zero[ref] = set()
            elif spec.kind == "param":
                zero[ref] = set(mine)
            elif spec.kind == "pass":
                zs = set()
                for c in mine:
                    carriers = [i for i in spec.inputs if c in classes_of(i)]
                    if carriers and all(c in zero.get(i, ()) for i in carriers):
                        zs.add(c)
                zero[ref] = zs
            elif spec.kind == "contract":
                zs = set()
                for c in mine:
                    prod_ok = any(c in zero.get(p, ()) for p in spec.products if c in classes_of(p))
                    add_ok = all(c in zero.get(a, ()) for a in spec.additive)
                    if prod_ok and add_ok:
                        zs.add(c)
                zero[ref] = zs
            elif spec.kind == "probe":
                zs = set()
                for c in mine:
                    pattern = tuple(
                        (i is not None and c in classes_of(i) and c in zero.get(i, ()))
                        for i in spec.inputs
                    )
                    if any(pattern) and probe_zero(node, pattern):
                        zs.add(c)
                zero[ref] = zs
    return zero


def _resolve_size_args(ctx: AnalysisContext, layouts) -> dict[str, dict[ArgPath, Layout | None]]:
    """Each recorded size argument as the layout whose kept size is its new value."""
    out: dict[str, dict[ArgPath, Layout | None]] = {}
    for name, entries in ctx.size_args.items():
        resolved = {}
        for path, entry in entries.items():
            if entry[0] == "dim":
                lay = layouts[entry[1]][entry[2]]
            else:
                lay = ctx.store.layout(entry[1]) if entry[1] else ()
            resolved[path] = lay
        out[name] = resolved
    return out


def _kind_of(store: AtomStore, c: int) -> GroupKind:
    tags = store.all_tags(c)
    parent_tags: set[Tag] = set()
    for anc in store.ancestors(c):
        parent_tags |= store.all_tags(anc)
    if Tag.EXPERTS in tags:
        return "experts"
    if Tag.HEADS in tags or Tag.HEADS in parent_tags:
        if Tag.BROADCAST in tags:
            return "head_repeat"
        if Tag.HEADS in parent_tags:
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
