"""Analysis pass: find the coupled dependency groups of an exported graph.

Each (tensor, dim) of the graph is a product of atoms (see ``atoms.py``).  Per-op rules from the
registry in ``op_rules.py`` tie the atoms of an op's inputs and outputs.  When every node has been
visited, the leaf classes of the union-find are the coupled groups: removing unit ``u`` of a class
removes the matching slice of every parameter, buffer and activation that carries it.

Two more facts are computed per class:

* **frozen**: the class touches a graph input or output, an op without a rule, a user ``ignore``,
  or a tie the algebra cannot express.  Frozen classes are reported, never pruned.
* **exact**: removing units equals zeroing the parameter slices they cover.  A zero-propagation
  dataflow tracks, per tensor and class, whether the removed units are zero once the parameter
  slices are zeroed.  Contracting over a class is exact when one operand is zero there; a mean,
  softmax or norm over it is not.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import re
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from fxprune.graph import (
    FrozenClass,
    Group,
    Member,
    PrunableGraph,
    Unsupported,
    layout_classes,
    source_location,
)
from fxprune.passes.atoms import AtomStore

TRef = tuple  # (node_name, output_index or None)


# ------------------------------------------------------------------------------------------
# Rule registry
# ------------------------------------------------------------------------------------------
Rule = Callable[["AnalysisContext", fx.Node], None]
RULES: dict[Any, Rule] = {}


def register_rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a rule for ATen overloads or packets (a packet covers all its overloads)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return deco


def find_rule(target: Any) -> Rule | None:
    if target in RULES:
        return RULES[target]
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in RULES:
        return RULES[packet]
    name = str(target)
    if name in RULES:  # custom ops registered by name (they may not exist at import time)
        return RULES[name]
    tags = getattr(target, "tags", ())
    if torch.Tag.pointwise in tags:
        return RULES.get("pointwise")
    return None


# ------------------------------------------------------------------------------------------
# Zero-propagation specs recorded by rules and evaluated once the classes are final
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ZeroSpec:
    """How an op's output can be zero on a class, given which inputs are zero on it.

    kind:
      "pass":     zero iff every tensor input carrying the class is zero on it (layout ops)
      "contract": zero iff some ``products`` operand carrying it is zero and every ``additive``
                  operand is zero on it (linear, matmul, conv, norms with affine params)
      "probe":    evaluate the pointwise op itself on tiny tensors (see ``_probe_zero``)
      "never":    the output is not zero on any class (sources, softmax, ...)
    """

    kind: str
    products: list[TRef] = dataclasses.field(default_factory=list)
    additive: list[TRef] = dataclasses.field(default_factory=list)
    inputs: list[TRef] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class NeedsZero:
    """Contraction over (ref, dim): exact only where one of ``operands`` is zero."""

    ref: TRef
    dim: int
    operands: list[TRef]
    reason: str


# ------------------------------------------------------------------------------------------
# Context handed to rules
# ------------------------------------------------------------------------------------------
class AnalysisContext:
    """State of one analysis: atoms per tensor dim, plus what rules record for later phases."""

    def __init__(self, gm_graph: fx.Graph) -> None:
        self.graph = gm_graph
        self.store = AtomStore()
        self.dims: dict[TRef, list[list[int]]] = {}
        self.shapes: dict[TRef, list] = {}
        self.zero_specs: dict[TRef, ZeroSpec] = {}
        self.needs_zero: list[NeedsZero] = []
        self.size_args: dict[str, dict] = collections.defaultdict(dict)
        self.offset_args: dict[str, dict] = collections.defaultdict(dict)
        self.sources: set[str] = set()  # factory nodes whose pruned dims are index_select'ed
        self.unsupported: list[Unsupported] = []
        self.node_by_name: dict[str, fx.Node] = {n.name: n for n in gm_graph.nodes}
        self.attention_nodes: list[str] = []

    # ---------------------------------------------------------------- tensor access
    def ref(self, arg: Any) -> TRef | None:
        """The tensor reference of an fx argument (None for non-tensors)."""
        if isinstance(arg, fx.Node):
            if arg.target is operator.getitem:
                src, idx = arg.args
                return (src.name, idx)
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor):
                return (arg.name, None)
        return None

    def val(self, ref: TRef) -> torch.Tensor | None:
        name, idx = ref
        val = self.node_by_name[name].meta.get("val")
        if idx is not None:
            if isinstance(val, (list, tuple)) and idx < len(val):
                val = val[idx]
            else:
                return None
        return val if isinstance(val, torch.Tensor) else None

    def shape(self, ref: TRef) -> list:
        if ref not in self.shapes:
            val = self.val(ref)
            self.shapes[ref] = [_size_of(s) for s in val.shape] if val is not None else []
        return self.shapes[ref]

    def d(self, ref: TRef) -> list[list[int]]:
        """Atoms of every dimension of ``ref`` (created on first use; size-1 dims have none)."""
        if ref not in self.dims:
            dims = []
            for s in self.shape(ref):
                if isinstance(s, int) and s == 1:
                    dims.append([])
                elif isinstance(s, int) and s == 0:
                    dims.append([])
                else:
                    dims.append([self.store.new(s)])
            self.dims[ref] = dims
        return self.dims[ref]

    def rank(self, ref: TRef) -> int:
        return len(self.shape(ref))

    def out(self, node: fx.Node, idx: int | None = None) -> TRef:
        return (node.name, idx)

    # ---------------------------------------------------------------- ties
    def tie(self, a: TRef, da: int, b: TRef, db: int) -> None:
        """Dimension ``da`` of ``a`` and ``db`` of ``b`` are the same index space."""
        sa, sb = self.shape(a)[da], self.shape(b)[db]
        if _is_one(sa) and _is_one(sb):
            return
        if sa != sb and isinstance(sa, int) and isinstance(sb, int):
            self.freeze_dim(a, da, f"size mismatch {sa} vs {sb}")
            self.freeze_dim(b, db, f"size mismatch {sa} vs {sb}")
            return
        self.store.unify_prod(self.d(a)[da], self.d(b)[db])

    def tie_all(self, a: TRef, b: TRef) -> None:
        """Same-rank tensors whose dims line up one to one (an identity-like op)."""
        for i in range(min(self.rank(a), self.rank(b))):
            self.tie(a, i, b, i)

    def broadcast(self, out: TRef, inputs: Sequence[TRef]) -> None:
        """Right-aligned broadcasting: equal non-1 dims tie, size-1 dims tie nothing."""
        ro = self.rank(out)
        for inp in inputs:
            ri = self.rank(inp)
            for k in range(1, ri + 1):
                if _is_one(self.shape(inp)[ri - k]):
                    continue
                self.tie(inp, ri - k, out, ro - k)

    def freeze_dim(self, ref: TRef, dim: int, reason: str) -> None:
        self.store.freeze(self.d(ref)[dim], reason)

    def freeze_ref(self, ref: TRef, reason: str) -> None:
        for atoms in self.d(ref):
            self.store.freeze(atoms, reason)

    def inexact(self, ref: TRef, dim: int, reason: str) -> None:
        self.store.mark_inexact(self.d(ref)[dim], reason)

    def tag(self, ref: TRef, dim: int, tag: str) -> None:
        self.store.tag(self.d(ref)[dim], tag)

    # ---------------------------------------------------------------- rewrite records
    def size_arg(self, node: fx.Node, path: tuple, ref: TRef, dim: int) -> None:
        """``node``'s argument at ``path`` equals the size of (ref, dim): rewrite recomputes it."""
        self.size_args[node.name][path] = ("dim", ref, dim)

    def size_arg_atoms(self, node: fx.Node, path: tuple, atoms: Sequence[int]) -> None:
        """``node``'s argument at ``path`` equals the product of ``atoms``' sizes."""
        self.size_args[node.name][path] = ("atoms", list(atoms))

    def offset_arg(self, node: fx.Node, path: tuple, ref: TRef, dim: int, offset: int) -> None:
        """``node``'s argument at ``path`` is an offset into (ref, dim)."""
        self.offset_args[node.name][path] = (ref, dim, offset)

    # ---------------------------------------------------------------- zero specs
    def zero_pass(self, out: TRef, inputs: Sequence[TRef]) -> None:
        self.zero_specs[out] = ZeroSpec("pass", inputs=list(inputs))

    def zero_contract(self, out: TRef, products: Sequence[TRef], additive: Sequence[TRef] = ()) -> None:
        self.zero_specs[out] = ZeroSpec("contract", products=list(products), additive=list(additive))

    def zero_never(self, out: TRef) -> None:
        self.zero_specs[out] = ZeroSpec("never")

    def zero_probe(self, out: TRef, inputs: Sequence[TRef]) -> None:
        self.zero_specs[out] = ZeroSpec("probe", inputs=list(inputs))

    def contraction(self, ref: TRef, dim: int, operands: Sequence[TRef], what: str) -> None:
        self.needs_zero.append(NeedsZero(ref, dim, list(operands), what))

    # ---------------------------------------------------------------- unknown ops
    def unsupported_op(self, node: fx.Node, why: str = "no rule") -> None:
        self.unsupported.append(Unsupported(node.name, str(node.target), source_location(node)))
        reason = f"op {node.target} ({why}) at node {node.name}, {source_location(node)}"
        for arg in _flat_args(node):
            r = self.ref(arg)
            if r is not None:
                self.freeze_ref(r, reason)
        for r in self.output_refs(node):
            self.freeze_ref(r, reason)
            self.zero_never(r)

    def output_refs(self, node: fx.Node) -> list[TRef]:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return [(node.name, None)]
        if isinstance(val, (list, tuple)):
            return [(node.name, i) for i, v in enumerate(val) if isinstance(v, torch.Tensor)]
        return []


def _size_of(s: Any):
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        node = s.node
        try:
            if node.is_constant() or not node.expr.free_symbols:
                return int(s)
        except Exception:  # noqa: BLE001 - fall back to the symbolic expression
            pass
        return node.expr
    return int(s)


def _is_one(s: Any) -> bool:
    return isinstance(s, int) and s == 1


def _flat_args(node: fx.Node) -> list:
    flat: list = []

    def visit(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)
        else:
            flat.append(a)

    visit(node.args)
    visit(node.kwargs)
    return flat


# ------------------------------------------------------------------------------------------
# Result of the analysis, kept on the graph for the rewrite
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AnalysisResult:
    groups: list[Group]
    frozen: list[FrozenClass]
    unsupported: list[Unsupported]
    layouts: dict[TRef, list]  # (node, idx) -> layout per dim (None for symbolic dims)
    size_args: dict[str, dict]
    offset_args: dict[str, dict]
    sources: set[str]
    class_to_group: dict[int, str]
    attention_nodes: list[str]


def analyze(graph: PrunableGraph, ignore: Iterable[str] = ()) -> list[Group]:
    """Find the coupled dependency groups of a traced graph.

    Returns the prunable groups; the graph object keeps the full result (frozen spaces with
    reasons, ops without rules, and the layouts the rewrite needs) in ``graph.analysis``.
    ``ignore`` takes parameter or module name prefixes whose dimensions must not change.
    """
    from fxprune.passes import op_rules  # noqa: F401 - registers the rules

    ep = graph.exported_program
    g = ep.graph
    ctx = AnalysisContext(g)
    sig = ep.graph_signature
    param_of = dict(sig.inputs_to_parameters)
    buffer_of = dict(sig.inputs_to_buffers)
    ignore = tuple(ignore)
    seen_tensors: dict[str, TRef] = {}  # canonical FQN -> placeholder, to tie shared weights

    for node in g.nodes:
        if node.op == "placeholder":
            _visit_placeholder(ctx, node, param_of, buffer_of, ignore, graph)
            fqn = param_of.get(node.name) or buffer_of.get(node.name)
            if fqn is not None and ctx.ref(node) is not None:
                canonical = graph.aliases.get(fqn, [fqn])[0]
                if canonical in seen_tensors:
                    ctx.tie_all(seen_tensors[canonical], ctx.ref(node))
                else:
                    seen_tensors[canonical] = ctx.ref(node)
        elif node.op == "call_function":
            _visit_call(ctx, node)
        elif node.op == "output":
            for arg in _flat_args(node):
                r = ctx.ref(arg)
                if r is not None:
                    ctx.freeze_ref(r, "graph output")
        elif node.op == "get_attr":
            r = ctx.ref(node)
            if r is not None:
                ctx.freeze_ref(r, f"constant attribute {node.target}")
                ctx.zero_never(r)

    result = _finalize(ctx, graph, param_of, buffer_of)
    graph.analysis = result
    graph.groups = result.groups
    graph.unsupported = result.unsupported
    graph.frozen = result.frozen
    return result.groups


def _visit_placeholder(ctx, node, param_of, buffer_of, ignore, graph) -> None:
    r = ctx.ref(node)
    if r is None:
        return
    name = param_of.get(node.name) or buffer_of.get(node.name)
    if name is None:
        ctx.freeze_ref(r, f"graph input {node.name}")
        ctx.zero_never(r)
        return
    ctx.d(r)  # materialise atoms for every parameter dim
    aliases = graph.aliases.get(name, [name])
    if any(_matches(a, ignore) for a in aliases):
        ctx.freeze_ref(r, f"ignored by the user: {name}")
    if name in param_of.values() and node.name in param_of:
        ctx.zero_specs[r] = ZeroSpec("param")
    else:
        ctx.zero_never(r)


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _visit_call(ctx: AnalysisContext, node: fx.Node) -> None:
    if node.target is operator.getitem:
        return  # getitem refs resolve to (source, index) in ctx.ref; nothing to tie
    outs = ctx.output_refs(node)
    if not outs and not any(ctx.ref(a) is not None for a in _flat_args(node)):
        return  # pure symbolic-int arithmetic, asserts on sizes
    rule = find_rule(node.target)
    if rule is None:
        if not outs and _is_metadata_only(node):
            return
        ctx.unsupported_op(node)
        return
    try:
        rule(ctx, node)
    except Exception as exc:  # noqa: BLE001 - a rule that fails must freeze, never guess
        ctx.unsupported_op(node, f"rule failed: {type(exc).__name__}: {exc}")


def _is_metadata_only(node: fx.Node) -> bool:
    name = str(node.target)
    return any(k in name for k in ("_assert", "sym_constrain", "sym_size", "sym_numel", "sym_stride"))


# ------------------------------------------------------------------------------------------
# Finalisation: layouts, zero dataflow, exactness, groups
# ------------------------------------------------------------------------------------------
def _finalize(ctx: AnalysisContext, graph, param_of, buffer_of) -> AnalysisResult:
    store = ctx.store
    layouts: dict[TRef, list] = {}
    for ref, dims in ctx.dims.items():
        lay = []
        for atoms, s in zip(dims, ctx.shape(ref)):
            lay.append(store.layout(atoms) if isinstance(s, int) else None)
        layouts[ref] = lay

    def classes_of(ref: TRef) -> set[int]:
        out: set[int] = set()
        for lay in layouts.get(ref, ()):
            if lay is not None:
                out.update(layout_classes(lay))
        return out

    # --- zero dataflow, in graph order
    zero: dict[TRef, set[int]] = {}
    from fxprune.passes.op_rules import probe_zero

    for node in ctx.graph.nodes:
        for ref in ([ctx.ref(node)] if node.op == "placeholder" else ctx.output_refs(node)):
            if ref is None or ref not in layouts:
                continue
            spec = ctx.zero_specs.get(ref)
            mine = classes_of(ref)
            if spec is None or spec.kind == "never":
                zero[ref] = set()
            elif spec.kind == "param":
                zero[ref] = mine
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
    # --- exactness of contractions over a class
    for nz in ctx.needs_zero:
        lay = layouts.get(nz.ref, [None])[nz.dim] if nz.ref in layouts else None
        if lay is None:
            continue
        for c in layout_classes(lay):
            if not any(c in zero.get(o, ()) for o in nz.operands):
                store.mark_inexact([c], f"{nz.reason}: neither operand is zero on removed units")

    # --- members per leaf class (parameters and buffers)
    members: dict[int, list[Member]] = collections.defaultdict(list)
    placeholder_refs = []
    for node in ctx.graph.nodes:
        if node.op != "placeholder":
            continue
        name = param_of.get(node.name) or buffer_of.get(node.name)
        ref = (node.name, None)
        if name is None or ref not in layouts:
            continue
        kind = "parameter" if node.name in param_of else "buffer"
        placeholder_refs.append(ref)
        for dim, lay in enumerate(layouts[ref]):
            if lay is None:
                continue
            for c in layout_classes(lay):
                members[c].append(Member(name, dim, node.name, lay, c, kind))

    # --- groups and frozen classes
    groups: list[Group] = []
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
            frozen.append(FrozenClass(c, size, reason, mems))
            continue
        inexact = store.inexact_reasons(c)
        groups.append(
            Group(
                id="",
                kind=_kind_of(store, c),
                size=size,
                exact=not inexact,
                members=mems,
                class_id=c,
                inexact_reasons=inexact,
                block=_block_of(mems),
            )
        )
    groups.sort(key=lambda g: _param_order(g, placeholder_refs))
    _assign_ids(groups)
    class_to_group = {g.class_id: g.id for g in groups}
    return AnalysisResult(
        groups=groups,
        frozen=frozen,
        unsupported=ctx.unsupported,
        layouts=layouts,
        size_args=_resolve_size_args(ctx, layouts),
        offset_args={
            name: {path: (layouts[ref][dim], off) for path, (ref, dim, off) in entries.items()}
            for name, entries in ctx.offset_args.items()
        },
        sources=ctx.sources,
        class_to_group=class_to_group,
        attention_nodes=ctx.attention_nodes,
    )


def _resolve_size_args(ctx: AnalysisContext, layouts) -> dict[str, dict]:
    """Each recorded size argument as the layout whose kept size is its new value."""
    out: dict[str, dict] = {}
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


def _kind_of(store: AtomStore, c: int) -> str:
    tags = store.all_tags(c)
    for anc in store.ancestors(c):
        tags |= {f"parent:{t}" for t in store.all_tags(anc)}
    if "heads" in tags or "parent:heads" in tags:
        if "broadcast" in tags:
            return "head_repeat"
        if "parent:heads" in tags:
            return "kv_heads"
        return "heads"
    if "head_dim" in tags or "parent:head_dim" in tags:
        return "head_dim"
    if "experts" in tags:
        return "experts"
    if "embedding_dim" in tags or "normalized" in tags:
        return "hidden"
    return "channels"


_BLOCK_RE = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def _block_of(members: Sequence[Member]) -> str | None:
    blocks = set()
    for m in members:
        if m.kind != "parameter" or m.name is None:
            continue
        match = _BLOCK_RE.match(m.name)
        blocks.add(match.group(1) if match else None)
    if len(blocks) == 1:
        return blocks.pop()
    return None


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _assign_ids(groups: list[Group]) -> None:
    seen: collections.Counter = collections.Counter()
    for g in groups:
        first = next((m for m in g.members if m.kind == "parameter"), g.members[0])
        base = f"{_module_of(first.name)}:{g.kind}"
        seen[base] += 1
        g.id = base if seen[base] == 1 else f"{base}#{seen[base]}"


def _param_order(g: Group, refs: list[TRef]) -> tuple:
    order = {r[0]: i for i, r in enumerate(refs)}
    return (min(order.get(m.node, 10**9) for m in g.members), _KIND_ORDER.get(g.kind, 9), g.class_id)


_KIND_ORDER = {"heads": 0, "kv_heads": 1, "head_repeat": 2, "head_dim": 3, "channels": 4, "experts": 5, "hidden": 6}
