"""The rule API: what an op rule receives, what it must do, and the registry that holds rules.

A rule is a function ``rule(ctx, node)`` registered for ATen overloads or packets with
``@register_rule(aten.op)``.  Through the :class:`AnalysisContext` it says how the index spaces
(atoms) of the op's inputs map onto its output's:

* **ties** (``ctx.tie``, ``ctx.tie_all``, ``ctx.broadcast``, ``ctx.store.unify_prod``): two
  dims are one index space;
* **freezes** (``ctx.freeze_dim``, ``ctx.freeze_ref``): a space that must not be pruned, with a
  reason a user can read;
* **fresh spaces** (``ctx.fresh``): an output dim that is a new index space (a factory op);
* **rewrite records** (``ctx.size_arg``, ``ctx.offset_arg``): shape constants and offsets the
  rewrite must recompute;
* **zero specs** (``ctx.zero_pass`` / ``zero_contract`` / ``zero_probe`` / ``zero_never``):
  how zeros on removed units flow through the op (this decides whether a group is *exact*);
* **contractions / inexact** (``ctx.contraction``, ``ctx.inexact``): a reduction over a space.

**In-place ops** need no rules of their own: ``find_rule`` routes ``add_``/``masked_fill_``/
``index_put_``... to the rule of their functional form (the rule sees the functional op as the
node's target), and the analysis records, from the op schemas, which outputs are views of which
inputs and which inputs an op writes (:func:`alias_effects`).  Ties need nothing more: a view's
dims *are* its base's atoms, so a write through a view ties the written values to the base.  The
zero dataflow uses the writes: after one, the base and every view of it are zero on a class only
where they were before *and* the written values are (see ``analysis._zero_dataflow``).

**A rule's duties**, checked after every rule by the analysis: every output dim of size > 1 is
tied, frozen or declared fresh, and every output has a zero spec.  A rule that forgets either
leaves the space frozen (never guessed at) and is reported in ``Analysis.rule_defects``.

This module imports nothing from the rules themselves (``op_rules.py``) or from the analysis
driver (``analysis.py``): both import it, so there is no import cycle.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from fxprune.graph import Unsupported, source_location
from fxprune.passes.atoms import AtomStore, Site
from fxprune.types import ArgPath, Tag, TensorRef, ZeroKind

__all__ = [
    "RULES", "Rule", "register_rule", "find_rule", "AnalysisContext", "ZeroSpec", "NeedsZero",
    "arg", "flat_args", "is_one", "norm_dim", "tensor_inputs", "int_size", "site_of", "alias_effects",
    "functional_of",
]

Rule = Callable[["AnalysisContext", fx.Node], None]
RULES: dict[Any, Rule] = {}
"""Rules by ATen overload, overload packet, custom-op name, or ``"pointwise"`` (the ATen tag)."""


def register_rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a rule for ATen overloads or packets (a packet covers all its overloads)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return deco


def find_rule(target: Any) -> Rule | None:
    """The rule for an op: its overload, else its packet, else by name, else the pointwise tag;
    an in-place op without a rule of its own gets its functional form's rule."""
    rule = _direct_rule(target)
    if rule is not None:
        return rule
    functional = functional_of(target)
    if functional is None:
        return None
    inner = _direct_rule(functional)
    if inner is None:
        return None
    return _as_functional(inner, functional)


def functional_of(target: Any) -> Any:
    """The functional overload of an in-place ATen op (``add_.Tensor`` -> ``add.Tensor``), or None."""
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.startswith("__") or not _writes_self(target):
        return None
    func_packet = getattr(torch.ops.aten, name[:-1], None)
    if func_packet is None:
        return None
    overload = getattr(func_packet, target._overloadname, None)
    if overload is None and target._overloadname != "default":
        overload = getattr(func_packet, "default", None)
    return overload


def _writes_self(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    args = getattr(schema, "arguments", ())
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


class _FunctionalView:
    """A node seen through its functional op: every attribute is the node's except ``target``."""

    __slots__ = ("_node", "target")

    def __init__(self, node: fx.Node, target: Any) -> None:
        self._node = node
        self.target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)


def _as_functional(rule: Rule, functional: Any) -> Rule:
    def routed(ctx: "AnalysisContext", node: fx.Node) -> None:
        rule(ctx, _FunctionalView(node, functional))  # type: ignore[arg-type]

    routed.__name__ = rule.__name__
    routed.__doc__ = rule.__doc__
    return routed


def alias_effects(node: fx.Node, ctx: "AnalysisContext") -> tuple[list[tuple[TensorRef, TensorRef]], list[TensorRef]]:
    """From an op's schema: (output ref, the input it is a view of) pairs, and the inputs it writes.

    ``slice(x)`` is a view of ``x``; ``copy_(v, src)`` writes ``v`` (and returns it).  Ops whose
    schema says "may alias" (``reshape``, ``contiguous``) count as views: treating a copy as a view
    only makes the zero dataflow more careful.
    """
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return [], []
    arg_sets: list[tuple[frozenset, TensorRef]] = []
    writes: list[TensorRef] = []
    for i, a in enumerate(schema.arguments):
        info = a.alias_info
        if info is None:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
        ref = ctx.ref(value) if isinstance(value, fx.Node) else None
        if ref is None:
            continue
        arg_sets.append((frozenset(info.before_set), ref))
        if info.is_write:
            writes.append(ref)
    views: list[tuple[TensorRef, TensorRef]] = []
    outs = ctx.output_refs(node)
    for k, ret in enumerate(schema.returns):
        info = ret.alias_info
        if info is None:
            continue
        base = next((ref for sets, ref in arg_sets if sets & frozenset(info.before_set)), None)
        if base is None:
            continue
        if isinstance(ret.type, torch.ListType):  # split/unbind: every output is a view
            views.extend((o, base) for o in outs)
        elif len(schema.returns) == 1 and outs:
            views.append((outs[0], base))
        elif k < len(outs):
            views.append((outs[k], base))
    return views, writes


def _direct_rule(target: Any) -> Rule | None:
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
# Small helpers every rule uses
# ------------------------------------------------------------------------------------------
def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of ``node`` (positional), else keyword ``name``, else ``default``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def flat_args(node: fx.Node) -> list:
    """Every leaf of a node's args and kwargs, in order."""
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


def is_one(s: Any) -> bool:
    """A static size of 1 (a dim that broadcasts and carries no index space)."""
    return isinstance(s, int) and s == 1


def norm_dim(d: int, rank: int) -> int:
    """A possibly negative dim index as a non-negative one."""
    return d + rank if d < 0 else d


def tensor_inputs(ctx: "AnalysisContext", node: fx.Node) -> list[TensorRef]:
    """The tensor refs among a node's arguments."""
    return [r for r in (ctx.ref(a) for a in flat_args(node)) if r is not None]


def int_size(ctx: "AnalysisContext", ref: TensorRef, dim: int) -> int | None:
    """The static size of a dim, or None when it is symbolic."""
    s = ctx.shape(ref)[dim]
    return s if isinstance(s, int) else None


def site_of(node: fx.Node) -> Site:
    """Provenance of an op: node name, op, the user's source line."""
    return Site(node.name, str(node.target), source_location(node))


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


# ------------------------------------------------------------------------------------------
# Zero-propagation specs recorded by rules and evaluated once the classes are final
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ZeroSpec:
    """How an op's output can be zero on a class, given which inputs are zero on it.

    kind:
      "param":    a parameter: zero on every class its dims carry (when that slice is zeroed)
      "pass":     zero iff every tensor input carrying the class is zero on it (layout ops)
      "contract": zero iff some ``products`` operand carrying it is zero and every ``additive``
                  operand is zero on it (linear, matmul, conv, norms with affine params)
      "probe":    evaluate the pointwise op itself on tiny tensors (see ``op_rules.probe_zero``)
      "never":    the output is not zero on any class (sources, softmax, ...)
    """

    kind: ZeroKind
    products: tuple[TensorRef, ...] = ()
    additive: tuple[TensorRef, ...] = ()
    inputs: tuple[TensorRef | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class NeedsZero:
    """Contraction over (ref, dim): exact only where one of ``operands`` is zero (read when
    ``node`` runs, before anything later writes into them)."""

    ref: TensorRef
    dim: int
    operands: tuple[TensorRef, ...]
    reason: str
    node: str | None = None


# ------------------------------------------------------------------------------------------
# Context handed to rules
# ------------------------------------------------------------------------------------------
def is_metadata_only(node: fx.Node) -> bool:
    """A node that asserts or reads metadata and computes no tensor (``_assert_tensor_metadata``)."""
    name = str(node.target)
    return any(k in name for k in ("_assert", "sym_constrain", "sym_size", "sym_numel", "sym_stride"))


class AnalysisContext:
    """State of one analysis: atoms per tensor dim, plus what rules record for later phases."""

    def __init__(self, gm_graph: fx.Graph) -> None:
        self.graph = gm_graph
        self.store = AtomStore()
        self.dims: dict[TensorRef, list[list[int]]] = {}
        self.shapes: dict[TensorRef, list] = {}
        self.origin: dict[int, tuple[TensorRef, int]] = {}  # atom -> the (tensor, dim) it was made for
        self.zero_specs: dict[TensorRef, ZeroSpec] = {}
        self.needs_zero: list[NeedsZero] = []
        self.size_args: dict[str, dict[ArgPath, tuple]] = collections.defaultdict(dict)
        self.offset_args: dict[str, dict[ArgPath, tuple]] = collections.defaultdict(dict)
        self.sources: set[str] = set()  # factory nodes whose pruned dims are index_select'ed
        self.unsupported: list[Unsupported] = []
        self.node_by_name: dict[str, fx.Node] = {n.name: n for n in gm_graph.nodes}
        self.attention_nodes: list[str] = []
        self.attention_values: list[TensorRef] = []  # the value operands of sdpa and attention matmuls
        self.fresh_atoms: set[int] = set()
        # value spaces: integer tensors whose *values* are positions in an index space (the
        # indices topk returns index the experts of a router); see op_rules' routing rules
        self.values: dict[TensorRef, tuple[list[int], str]] = {}
        self.values_used: dict[str, set[TensorRef]] = collections.defaultdict(set)
        self.value_args: dict[str, dict[ArgPath, tuple[TensorRef, int, int]]] = collections.defaultdict(dict)
        self.routing: list[tuple[str, Any]] = []  # (fact, details) recorded by routing rules
        self.current: str | None = None  # the node whose rule runs
        self.view_of: dict[TensorRef, TensorRef] = {}  # a view -> the tensor it views
        self.writes: dict[str, list[TensorRef]] = {}  # node -> the inputs it writes in place
        self.symbolic_sizes: list[tuple[str, ArgPath, Any, list[int]]] = []  # node, path, size node, atoms
        self.norm_scales: list[tuple[Any, TensorRef, int]] = []  # (NormScale, normalised tensor, dim)

    # ---------------------------------------------------------------- tensor access
    def ref(self, a: Any) -> TensorRef | None:
        """The tensor reference of an fx argument (None for non-tensors)."""
        if isinstance(a, fx.Node):
            if a.target is operator.getitem:
                src, idx = a.args
                return TensorRef(src.name, idx)
            val = a.meta.get("val")
            if isinstance(val, torch.Tensor):
                return TensorRef(a.name, None)
        return None

    def val(self, ref: TensorRef) -> torch.Tensor | None:
        name, idx = ref
        val = self.node_by_name[name].meta.get("val")
        if idx is not None:
            if isinstance(val, (list, tuple)) and idx < len(val):
                val = val[idx]
            else:
                return None
        return val if isinstance(val, torch.Tensor) else None

    def shape(self, ref: TensorRef) -> list:
        if ref not in self.shapes:
            val = self.val(ref)
            self.shapes[ref] = [_size_of(s) for s in val.shape] if val is not None else []
        return self.shapes[ref]

    def d(self, ref: TensorRef) -> list[list[int]]:
        """Atoms of every dimension of ``ref`` (created on first use; size-0/1 dims have none)."""
        if ref not in self.dims:
            dims = []
            for i, s in enumerate(self.shape(ref)):
                if isinstance(s, int) and s in (0, 1):
                    dims.append([])
                else:
                    atom = self.store.new(s)
                    self.origin[atom] = (ref, i)
                    dims.append([atom])
            self.dims[ref] = dims
        return self.dims[ref]

    def rank(self, ref: TensorRef) -> int:
        return len(self.shape(ref))

    def out(self, node: fx.Node, idx: int | None = None) -> TensorRef:
        return TensorRef(node.name, idx)

    def output_refs(self, node: fx.Node) -> list[TensorRef]:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return [TensorRef(node.name, None)]
        if isinstance(val, (list, tuple)):
            return [TensorRef(node.name, i) for i, v in enumerate(val) if isinstance(v, torch.Tensor)]
        return []

    # ---------------------------------------------------------------- ties
    def tie(self, a: TensorRef, da: int, b: TensorRef, db: int) -> None:
        """Dimension ``da`` of ``a`` and ``db`` of ``b`` are the same index space."""
        sa, sb = self.shape(a)[da], self.shape(b)[db]
        if is_one(sa) and is_one(sb):
            return
        if sa != sb and isinstance(sa, int) and isinstance(sb, int):
            self.freeze_dim(a, da, f"size mismatch {sa} vs {sb}")
            self.freeze_dim(b, db, f"size mismatch {sa} vs {sb}")
            return
        self.store.unify_prod(self.d(a)[da], self.d(b)[db])

    def tie_all(self, a: TensorRef, b: TensorRef) -> None:
        """Same-rank tensors whose dims line up one to one (an identity-like op)."""
        for i in range(min(self.rank(a), self.rank(b))):
            self.tie(a, i, b, i)

    def broadcast(self, out: TensorRef, inputs: Sequence[TensorRef]) -> None:
        """Right-aligned broadcasting: equal non-1 dims tie, size-1 dims tie nothing.

        An output dim that no input carries (every input has size 1 there) is a fresh space.
        """
        ro = self.rank(out)
        carried = set()
        for inp in inputs:
            ri = self.rank(inp)
            for k in range(1, ri + 1):
                if is_one(self.shape(inp)[ri - k]):
                    continue
                self.tie(inp, ri - k, out, ro - k)
                carried.add(ro - k)
        for j in range(ro):
            if j not in carried:
                self.fresh(out, j)

    def fresh(self, ref: TensorRef, dim: int | None = None) -> None:
        """Declare output dims (all, or ``dim``) as new index spaces (factory ops, broadcasts)."""
        dims = self.d(ref)
        for i, atoms in enumerate(dims):
            if dim is None or i == dim:
                self.fresh_atoms.update(atoms)
                self.store.touched.update(atoms)

    def freeze_dim(self, ref: TensorRef, dim: int, reason: str) -> None:
        self.store.freeze(self.d(ref)[dim], reason)

    def freeze_ref(self, ref: TensorRef, reason: str) -> None:
        for atoms in self.d(ref):
            self.store.freeze(atoms, reason)

    def inexact(self, ref: TensorRef, dim: int, reason: str) -> None:
        self.store.mark_inexact(self.d(ref)[dim], reason)

    def tag(self, ref: TensorRef, dim: int, tag: Tag) -> None:
        self.store.tag(self.d(ref)[dim], tag)

    # ---------------------------------------------------------------- rewrite records
    def size_arg(self, node: fx.Node, path: ArgPath, ref: TensorRef, dim: int) -> None:
        """``node``'s argument at ``path`` equals the size of (ref, dim)."""
        self.size_args[node.name][path] = ("dim", ref, dim)

    def shape_args(self, node: fx.Node, path: ArgPath, sizes: Sequence[Any], ref: TensorRef,
                   first_dim: int = 0) -> None:
        """``node``'s argument at ``path`` is a size list for dims ``first_dim...`` of ``ref``.

        Static entries are size arguments; an entry computed from dynamic sizes (``bsz * 4``) is
        resolved once the classes are known: its static factor becomes a size argument of the
        node that multiplies it in, or the static spaces of that dim are frozen.
        """
        for i, s in enumerate(sizes):
            sub = ArgPath(path.where, path.key, i)
            if isinstance(s, int) and s != -1:
                self.size_arg(node, sub, ref, first_dim + i)
            elif isinstance(s, fx.Node):
                self.symbolic_size(node, sub, s, self.d(ref)[first_dim + i])

    def symbolic_size(self, node: fx.Node, path: ArgPath, size: fx.Node, atoms: Sequence[int]) -> None:
        """``node``'s argument at ``path`` is the dynamic size ``size`` of the product of ``atoms``."""
        self.symbolic_sizes.append((node.name, path, size, list(atoms)))

    def size_arg_atoms(self, node: fx.Node, path: ArgPath, atoms: Sequence[int]) -> None:
        """``node``'s argument at ``path`` equals the product of ``atoms``' sizes."""
        self.size_args[node.name][path] = ("atoms", list(atoms))

    def offset_arg(self, node: fx.Node, path: ArgPath, ref: TensorRef, dim: int, offset: int) -> None:
        """``node``'s argument at ``path`` is an offset into (ref, dim)."""
        self.offset_args[node.name][path] = (ref, dim, offset)

    def norm_scale(self, site: Any, ref: TensorRef, dim: int) -> None:
        """An RMS norm over (ref, dim) whose weight and eps the rewrite rescales (``NormScale``)."""
        self.norm_scales.append((site, ref, dim))

    # ---------------------------------------------------------------- value spaces
    def set_values(self, ref: TensorRef, atoms: Sequence[int], origin: str) -> None:
        """The values of integer tensor ``ref`` are positions in the space of ``atoms``."""
        self.values[ref] = (list(atoms), origin)

    def values_of(self, ref: TensorRef | None) -> list[int] | None:
        """The atoms whose positions the values of ``ref`` are, or None."""
        entry = self.values.get(ref) if ref is not None else None
        return entry[0] if entry is not None else None

    def use_values(self, node: fx.Node, ref: TensorRef) -> None:
        """``node``'s rule followed the values of input ``ref`` (tied the space they index)."""
        self.values_used[node.name].add(ref)

    def value_arg(self, node: fx.Node, path: ArgPath, ref: TensorRef, dim: int, delta: int) -> None:
        """``node``'s argument at ``path`` is the size of (ref, dim) plus ``delta`` (``histc``'s max)."""
        self.value_args[node.name][path] = (ref, dim, delta)

    # ---------------------------------------------------------------- zero specs
    def zero_pass(self, out: TensorRef, inputs: Sequence[TensorRef]) -> None:
        self.zero_specs[out] = ZeroSpec("pass", inputs=tuple(inputs))

    def zero_contract(self, out: TensorRef, products: Sequence[TensorRef], additive: Sequence[TensorRef] = ()) -> None:
        self.zero_specs[out] = ZeroSpec("contract", products=tuple(products), additive=tuple(additive))

    def zero_never(self, out: TensorRef) -> None:
        self.zero_specs[out] = ZeroSpec("never")

    def zero_probe(self, out: TensorRef, inputs: Sequence[TensorRef | None]) -> None:
        self.zero_specs[out] = ZeroSpec("probe", inputs=tuple(inputs))

    def contraction(self, ref: TensorRef, dim: int, operands: Sequence[TensorRef], what: str) -> None:
        self.needs_zero.append(NeedsZero(ref, dim, tuple(operands), what, self.current))

    # ---------------------------------------------------------------- unknown ops
    def unsupported_op(self, node: fx.Node, why: str = "no rule") -> None:
        """Freeze every space ``node`` touches and record it: never guess about an op."""
        self.unsupported.append(Unsupported(node.name, str(node.target), source_location(node), why))
        reason = f"op {node.target} ({why}) at node {node.name}, {source_location(node)}"
        for a in flat_args(node):
            r = self.ref(a)
            if r is not None:
                self.freeze_ref(r, reason)
        for r in self.output_refs(node):
            self.freeze_ref(r, reason)
            self.zero_never(r)

    # ---------------------------------------------------------------- duties
    def unmet_duties(self, node: fx.Node) -> list[str]:
        """What a rule left undone for ``node``'s outputs (see the module docstring)."""
        problems = []
        for r in self.output_refs(node):
            if r not in self.zero_specs:
                problems.append(f"no zero spec for output {r}")
            for i, atoms in enumerate(self.d(r)):
                if any(a not in self.store.touched for a in atoms):
                    problems.append(f"output {r} dim {i} neither tied, frozen nor fresh")
        return problems
