"""Depth: residual branches found from the graph, and the blocks group whose units they are.

A *branch* is the subgraph that computes ``f(x)`` in ``out = x + f(x)`` on a residual stream:
an attention branch, an MLP branch, a ResNet bottleneck, a ViT block half, a parallel
attention + MLP block (GPT-J, Falcon, Cohere).  Removing it turns ``x + f(x)`` into ``x``.  No
model names are involved; a branch is recognised by the dataflow alone:

* the node is an ``add`` of two tensors of the output's shape, and one operand (the stream
  ``x``) is an ancestor of the other (the branch output ``y``);
* the branch's nodes are the descendants of ``x`` that are ancestors of ``y``; none of their
  values may be used outside the branch (an attention map returned as an output, say), none
  may write into a tensor outside it, and it must use a parameter (``x + 0.04 * x**3`` in a
  GELU is no branch);
* its *private parameters* are those used by branch nodes only: they are what removing the
  branch saves.

Two facts are recorded per branch:

* **exact**: the parameters whose zeroing makes ``y`` identically zero (the last projection's
  weight and bias, a post-norm's weight...), found from the zero-propagation specs the op rules
  recorded.  Removing the branch then equals zeroing them: the same oracle as width pruning
  (``verify`` / ``zeroed_copy``).  A branch without such a set is inexact, with the reason.
* **frozen**: the branch cannot be removed (its values escape, it mutates the stream, removing
  it would change the output's shape, it contains other branches); the reason is kept.  A
  residual whose shortcut is not the identity (``a * x + f(x)``: scaled or gated streams,
  projection shortcuts) is reported as a frozen branch too.

For the module rewrite the branch also records the *modules* that lie entirely inside it
(replaced by a module returning zeros when the branch goes but its layer stays) and the
*layer* (an element of a ``ModuleList``/``Sequential``) it belongs to: a layer whose branches
all go and whose remaining computation is the identity is deleted from its container.

Post-norm encoders (BERT) are handled by the same rule: the stream is the add's operand, and
the LayerNorm after the add belongs to the stream, not to the branch.  Removing the attention
branch of a BERT layer gives ``LayerNorm(x)``, which is exactly what zeroing its output
projection gives; the layer keeps its norms and is never deleted (its computation is not the
identity).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from fxprune.types import TensorRef
from fxprune.util.modules import get_tensor
from fxprune.util.names import block_of_name, matches_prefix

aten = torch.ops.aten

__all__ = ["Branch", "BlockGroup", "LayerInfo", "DepthInfo", "BLOCKS_GROUP_ID", "detect_branches"]

BLOCKS_GROUP_ID = "blocks"
"""The id of the blocks group (one per model; its units are the removable branches)."""

BLOCKS_CLASS_ID = -1
"""The class id the blocks group reports (no layout carries it: width rewrites never see it)."""


@dataclasses.dataclass(frozen=True)
class Branch:
    """One residual branch ``f`` in ``out = x + f(x)``.

    ``add`` is the residual add node, ``stream`` the operand ``x``, ``output`` the operand
    ``y = f(x)``; ``nodes`` are the branch's own nodes (graph order).  ``params`` are the
    parameters only the branch uses (removing it removes them), ``zero_params`` a subset whose
    zeroing makes ``y`` zero (empty when none was found: then ``exact`` is False).
    ``modules`` are the maximal modules lying entirely inside the branch, ``layer`` the
    container element (``model.layers.3``) it belongs to, or None.  ``frozen`` says why the
    branch cannot be removed (None when it can); ``unit`` is its unit in the blocks group.
    """

    id: str
    add: str
    stream: str
    output: str
    nodes: tuple[str, ...]
    params: tuple[str, ...]
    buffers: tuple[str, ...]
    zero_params: tuple[str, ...]
    exact: bool
    inexact_reasons: tuple[str, ...]
    frozen: str | None
    modules: tuple[str, ...]
    layer: str | None
    loose_params: tuple[str, ...] = ()  # private parameters owned by no module inside the branch
    unit: int = -1
    sinks: tuple[str, ...] = ()  # assertion nodes on branch values (removed with the branch)
    terms: tuple[str, ...] = ()  # every term of f when the add is a sum (x + attn + mlp); else (output,)

    @property
    def removable(self) -> bool:
        return self.frozen is None

    def __repr__(self) -> str:
        state = "frozen" if self.frozen else ("exact" if self.exact else "inexact")
        return f"Branch({self.id!r}, {state}, params={len(self.params)})"


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A container element (``model.layers.3``) holding residual branches.

    ``passthrough`` is True when, without its branches, the layer computes the identity on the
    stream (only residual adds and no-op casts remain): then it can be deleted from
    ``container`` once every branch in ``branches`` is removed.  ``params`` are all the
    parameters under the layer; ``removable`` is True when every one of them belongs to one
    of its branches.
    """

    path: str
    container: str
    index: int
    branches: tuple[str, ...]
    passthrough: bool
    removable: bool


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """The blocks group: unit ``u`` is the removable branch ``branches[u]``.

    It is the depth counterpart of :class:`~fxprune.graph.Group` and answers the same questions
    the planner and the plan ask (``id``, ``kind``, ``size``, ``class_id``, ``exact``,
    ``block``); it has no tensor-dim members (``params`` is empty: a unit removes whole
    tensors, listed per branch).
    """

    id: str
    branches: tuple[Branch, ...]
    kind: str = "blocks"
    class_id: int = BLOCKS_CLASS_ID
    block: str | None = None

    @property
    def size(self) -> int:
        return len(self.branches)

    @property
    def exact(self) -> bool:
        return all(b.exact for b in self.branches)

    @property
    def inexact_reasons(self) -> tuple[str, ...]:
        return tuple(f"{b.id}: {r}" for b in self.branches for r in b.inexact_reasons)

    @property
    def members(self) -> tuple:
        return ()

    @property
    def params(self) -> list:
        return []

    @property
    def param_names(self) -> list[str]:
        return sorted({p for b in self.branches for p in b.params})

    def unit_params(self, unit: int) -> tuple[str, ...]:
        return self.branches[unit].params

    def exact_for(self, units: Iterable[int]) -> bool:
        return all(self.branches[u].exact for u in units)

    def __repr__(self) -> str:
        return f"BlockGroup(id={self.id!r}, size={self.size}, exact={self.exact})"


@dataclasses.dataclass(frozen=True)
class DepthInfo:
    """What the detection found: every branch (frozen ones too), the group, the layers."""

    branches: tuple[Branch, ...] = ()
    groups: tuple[BlockGroup, ...] = ()
    layers: tuple[LayerInfo, ...] = ()


# ------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------
_ADDS = {aten.add.Tensor, aten.add_.Tensor}
_TRANSPARENT = {
    str(p) for p in (aten._to_copy, aten.to, aten.alias, aten.clone, aten.contiguous, aten.detach,
                     aten.lift_fresh_copy, aten.dropout, aten.type_as, aten.view_as, aten.reshape_as, aten.positive)
}


def _tensor_val(node: Any) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def _inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _is_sink(node: fx.Node) -> bool:
    """An assertion-like node: no users and no tensor output (``_assert_tensor_metadata``)."""
    return node.op == "call_function" and not node.users and node.meta.get("val") is None


def _is_transparent(node: fx.Node) -> bool:
    """A node whose value equals its (first) input: a no-op cast, alias, clone, eval dropout."""
    if node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    if str(packet) not in _TRANSPARENT or not node.args or not isinstance(node.args[0], fx.Node):
        return _is_sink(node)
    src, out = _tensor_val(node.args[0]), _tensor_val(node)
    if src is None or out is None:
        return False
    if str(packet) == str(aten.dropout) and len(node.args) > 2 and node.args[2]:
        return False
    return src.dtype == out.dtype and tuple(src.shape) == tuple(out.shape)


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


class _GraphIndex:
    """Topological positions, parameter ownership and module membership of one exported graph."""

    def __init__(self, ep_graph: fx.Graph, param_of: Mapping[str, str], buffer_of: Mapping[str, str],
                 canonical: Any) -> None:
        from fxprune.passes.rewrite import _clean_fqn

        clean = functools.lru_cache(maxsize=None)(_clean_fqn)
        self.nodes = list(ep_graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.param_of = {k: canonical(v) for k, v in param_of.items()}
        self.buffer_of = {k: canonical(v) for k, v in buffer_of.items()}
        # param-derived nodes: parameters/buffers/constants and ops on them alone (w.t(), w.to())
        self.derived: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder":
                if n.name in self.param_of or n.name in self.buffer_of:
                    self.derived.add(n)
            elif n.op == "get_attr":
                self.derived.add(n)
            elif n.op == "call_function":
                ins = _inputs(n)
                if ins and all(i in self.derived for i in ins):
                    self.derived.add(n)
        # consumers of every parameter/buffer: the first non-derived nodes its value reaches
        self.consumers: dict[str, set[fx.Node]] = collections.defaultdict(set)
        self.param_nodes: dict[str, set[fx.Node]] = collections.defaultdict(set)
        for n in self.nodes:
            name = self.param_of.get(n.name) or self.buffer_of.get(n.name)
            if name is None:
                continue
            stack, seen = [n], {n}
            while stack:
                cur = stack.pop()
                self.param_nodes[name].add(cur)
                for u in cur.users:
                    if u in seen:
                        continue
                    seen.add(u)
                    if u in self.derived:
                        stack.append(u)
                    elif not _is_sink(u):
                        self.consumers[name].add(u)
        self.tensors_read: dict[fx.Node, set[str]] = collections.defaultdict(set)  # consumer -> tensors
        for name, users in self.consumers.items():
            for u in users:
                self.tensors_read[u].add(name)
        self.numel = {fqn: int(v.numel()) for node, fqn in self.param_of.items()
                      if (v := _tensor_val(self.by_name[node])) is not None}
        self.modules_of: dict[fx.Node, tuple[str, ...]] = {}
        self.nodes_of: dict[str, list[fx.Node]] = collections.defaultdict(list)
        for n in self.nodes:
            stack = n.meta.get("nn_module_stack") or {}
            paths = tuple(p for p in (clean(v[0]) for v in stack.values()) if p)
            self.modules_of[n] = paths
            for p in paths:
                self.nodes_of[p].append(n)

    def reaches(self, src: fx.Node, dst: fx.Node) -> bool:
        """Whether ``src`` is an ancestor of ``dst`` (backward search bounded by positions)."""
        lo = self.pos[src]
        if lo >= self.pos[dst]:
            return False
        stack, seen = [dst], {dst}
        while stack:
            cur = stack.pop()
            for i in _inputs(cur):
                if i is src:
                    return True
                if i not in seen and self.pos[i] > lo:
                    seen.add(i)
                    stack.append(i)
        return False

    def branch_nodes(self, x: fx.Node, y: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
        """(descendants of ``x`` that are ancestors of ``y``, other ancestors of ``y`` after ``x``)."""
        lo = self.pos[x]
        stack, region = [y], {y}
        while stack:
            cur = stack.pop()
            for i in _inputs(cur):
                if i not in region and i is not x and self.pos[i] > lo:
                    region.add(i)
                    stack.append(i)
        inside: set[fx.Node] = set()
        for n in sorted(region, key=self.pos.__getitem__):
            if any(i is x or i in inside for i in _inputs(n)):
                inside.add(n)
        order = sorted(inside, key=self.pos.__getitem__)
        side = sorted(region - inside, key=self.pos.__getitem__)
        return order, side


def detect_branches(ctx: Any, graph: Any, ignore: Sequence[str] = ()) -> DepthInfo:
    """Find the residual branches of an analysed graph (called by :func:`analyze`).

    ``ctx`` is the analysis context (its zero-propagation specs decide exactness), ``graph``
    the :class:`~fxprune.graph.PrunableGraph`; a branch with a parameter under one of the
    ``ignore`` prefixes is frozen.
    """
    ep_graph = graph.exported_program.graph
    index = _GraphIndex(ep_graph, graph.param_of, graph.buffer_of, graph.canonical)
    adds = [n for n in index.nodes if n.op == "call_function" and n.target in _ADDS and _operands(index, n)]
    drafts = [d for d in (_identity_residual(index, n) for n in adds) if d is not None]
    _mark_nesting(drafts)
    covered = {n for d in drafts if d["frozen"] is None for n in d["inside"]}
    drafts = [d for d in drafts if d["frozen"] is None or d["add"] not in covered]  # x + attn inside x + attn + mlp
    covered |= {d["add"] for d in drafts}
    for n in adds:  # residuals whose shortcut is not the identity: reported, never removed
        if n not in covered:
            d = _shortcut_residual(index, n)
            if d is not None:
                drafts.append(d)
    drafts.sort(key=lambda d: index.pos[d["add"]])
    branches = [_finish(index, ctx, graph, d) for d in drafts]
    branches = [b if b.frozen or not any(matches_prefix(p, ignore) for p in b.params)
                else dataclasses.replace(b, frozen="a parameter matches `ignore`", exact=False)
                for b in branches]
    branches = _unique_ids(branches)
    units = [b for b in branches if b.removable]
    numbered = {b.id: dataclasses.replace(b, unit=i) for i, b in enumerate(units)}
    branches = [numbered.get(b.id, b) for b in branches]
    groups = (BlockGroup(BLOCKS_GROUP_ID, tuple(numbered[b.id] for b in units)),) if units else ()
    layers = _layers(index, graph, branches)
    return DepthInfo(tuple(branches), groups, layers)


def _operands(index: _GraphIndex, add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of an add (in graph order), or None (a scalar or bias add)."""
    ops = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(ops) != 2 or _tensor_val(add) is None or any(_tensor_val(a) is None for a in ops):
        return None
    if any(a in index.derived for a in ops) or ops[0] is ops[1]:
        return None
    if len(add.args) > 2 or add.kwargs.get("alpha", 1) != 1:
        alpha = add.kwargs.get("alpha", add.args[2] if len(add.args) > 2 else 1)
        if alpha == 0:
            return None
    a, b = sorted(ops, key=index.pos.__getitem__)
    return a, b


def _terms(index: _GraphIndex, add: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The terms of a sum of adds (``x + attn + mlp`` as ``(x + attn) + mlp``) and the inner adds.

    An operand is expanded when it is itself a plain add of the same shape used only here.
    """
    shape = tuple(_tensor_val(add).shape)
    terms, inner, stack = [], [], list(_operands(index, add))
    while stack:
        t = stack.pop(0)
        if (t.op == "call_function" and t.target is aten.add.Tensor and len(t.users) == 1
                and _operands(index, t) is not None and tuple(_tensor_val(t).shape) == shape):
            inner.append(t)
            stack.extend(_operands(index, t))
        else:
            terms.append(t)
    return terms, inner


def _identity_residual(index: _GraphIndex, add: fx.Node) -> dict[str, Any] | None:
    """A draft branch when one term of ``add`` is an ancestor of the others (``x + f(x)``, or
    ``x + attn(x) + mlp(x)`` for a parallel block written as two adds)."""
    out = _tensor_val(add)
    terms, inner = _terms(index, add)
    terms = sorted(terms, key=index.pos.__getitem__)
    x = terms[0]
    ys = terms[1:]
    xv = _tensor_val(x)
    if tuple(xv.shape) != tuple(out.shape) or not xv.is_floating_point() \
            or not all(index.reaches(x, y) for y in ys):
        if not inner:
            return None  # a broadcast mask or bias add, not a stream
        x, ys, inner = (*_operands(index, add), [])
        ys = [ys]
        xv = _tensor_val(x)
        if tuple(xv.shape) != tuple(out.shape) or not xv.is_floating_point() or not index.reaches(x, ys[0]):
            return None
    y = ys[0]
    inside_all: set[fx.Node] = set(inner)
    side_all: set[fx.Node] = set()
    for t in ys:
        part, side = index.branch_nodes(x, t)
        inside_all.update(part)
        side_all.update(side)
    inside = sorted(inside_all, key=index.pos.__getitem__)
    side = sorted(side_all - inside_all, key=index.pos.__getitem__)
    if not _uses_params(index, inside):
        return None
    frozen = None
    if xv.dtype != out.dtype:
        frozen = f"the add changes the dtype of the stream ({xv.dtype} -> {out.dtype})"
    if add.target is aten.add_.Tensor and add.args[0] is x:
        frozen = frozen or f"the add writes into the stream {x.name} in place"
    inside_set = set(inside)
    sinks: list[fx.Node] = []
    for n in inside:
        for u in n.users:
            if u in inside_set or u is add:
                continue
            if _is_sink(u):
                sinks.append(u)
                continue
            frozen = frozen or (f"the branch value {n.name} is also used by {u.name} outside the branch "
                                f"(an intermediate result escapes)")
        if n not in ys and _is_mutating(n) and isinstance(n.args[0], fx.Node) and n.args[0] not in inside_set:
            frozen = frozen or f"{n.name} ({n.target}) writes into {n.args[0].name}, outside the branch"
    return {"add": add, "x": x, "y": y, "terms": ys, "inside": inside, "side": side, "frozen": frozen,
            "sinks": sorted(set(sinks), key=index.pos.__getitem__)}


def _shortcut_residual(index: _GraphIndex, add: fx.Node) -> dict[str, Any] | None:
    """A frozen draft for ``g(x) + f(x)`` where ``g`` is a short chain (scaled, gated, projected)."""
    a, b = _operands(index, add)
    out = _tensor_val(add)
    found = _non_identity_shortcut(index, a, b, out) or _non_identity_shortcut(index, b, a, out)
    if found is None:
        return None
    x, y, via = found
    inside, side = index.branch_nodes(x, y)
    if not _uses_params(index, inside):
        return None
    ops_txt = ", ".join(str(getattr(n.target, "__name__", n.target)) for n in via)
    xv = _tensor_val(x)
    what = ("removing the branch would change the shape" if tuple(xv.shape) != tuple(out.shape)
            else "removing the branch would not leave the stream unchanged")
    return {"add": add, "x": x, "y": y, "inside": inside, "side": side, "sinks": [],
            "frozen": f"the shortcut is not the identity: the stream passes through {ops_txt} before the "
                      f"add (a scaled, gated or projected residual); {what}"}


def _uses_params(index: _GraphIndex, inside: Sequence[fx.Node]) -> bool:
    return any(i in index.derived and i.op in ("placeholder", "get_attr") or
               (i in index.derived and any(p in index.derived for p in _inputs(i)))
               for n in inside for i in _inputs(n))


def _non_identity_shortcut(index: _GraphIndex, u: fx.Node, v: fx.Node, out: torch.Tensor):
    """``(x, v, via)`` when ``u`` is a float stream ``x`` seen through a short chain of ops and
    ``x`` also feeds ``v``."""
    via: list[fx.Node] = []
    cur = u
    for _ in range(4):
        live = [i for i in _inputs(cur) if i not in index.derived and _tensor_val(i) is not None]
        if len(live) != 1:
            return None
        via.append(cur)
        cur = live[0]
        cv = _tensor_val(cur)
        if cv.dtype == out.dtype and cv.dim() == out.dim() and index.reaches(cur, v):
            return cur, v, list(reversed(via))
    return None


def _mark_nesting(drafts: list[dict[str, Any]]) -> None:
    """A branch containing another (removable) branch's add is frozen: the inner ones are the units."""
    adds = {d["add"]: d for d in drafts}
    for d in sorted(drafts, key=lambda d: len(d["inside"])):
        inner = [adds[n] for n in d["inside"] if n in adds and adds[n] is not d and adds[n]["frozen"] is None]
        if inner and d["frozen"] is None:
            names = ", ".join(i["add"].name for i in inner[:3])
            d["frozen"] = f"contains the residual adds {names} (nested residuals: its inner branches are the units)"


def _finish(index: _GraphIndex, ctx: Any, graph: Any, d: dict[str, Any]) -> Branch:
    inside: list[fx.Node] = d["inside"]
    inside_set = set(inside)
    private: list[str] = []
    private_buffers: list[str] = []
    params = set(index.param_of.values())
    read = set().union(*(index.tensors_read.get(n, set()) for n in inside))
    for name in sorted(read):
        if index.consumers[name] <= inside_set:
            (private if name in params else private_buffers).append(name)
    zero, why = None, ""
    parts = [_zeroing_set(index, ctx, t, inside_set, set(private)) for t in d.get("terms", [d["y"]])]
    if all(p[0] is not None for p in parts):
        zero = frozenset().union(*(p[0] for p in parts))
    else:
        why = next(p[1] for p in parts if p[0] is None)
    modules = _inside_modules(index, graph, inside_set, set(private) | set(private_buffers), d["x"])
    owned = set()
    module_root = graph.module
    for mp in modules:
        try:
            sub = module_root.get_submodule(mp)
        except AttributeError:
            continue
        for pn, _ in sub.named_parameters(prefix=mp, remove_duplicate=False):
            owned.add(graph.canonical(pn))
    loose = tuple(p for p in private if p not in owned)
    layer = _layer_of(index, graph, d["add"], modules, private)
    name = _branch_name(index, graph, inside, private, modules)
    if layer is not None and private and set(private) == _params_under(graph, layer):
        name = layer  # the branch is the whole layer (a parallel block, a ResNet/ConvNeXt block)
    return Branch(
        id=name, add=d["add"].name, stream=d["x"].name, output=d["y"].name,
        terms=tuple(t.name for t in d.get("terms", [d["y"]])),
        nodes=tuple(n.name for n in inside), params=tuple(private), buffers=tuple(private_buffers),
        zero_params=tuple(sorted(zero or ())), exact=zero is not None and d["frozen"] is None,
        inexact_reasons=() if zero is not None else (why,), frozen=d["frozen"], modules=tuple(modules),
        layer=layer, loose_params=loose,
        sinks=tuple(n.name for n in d.get("sinks", ())),
    )


def _zeroing_set(index: _GraphIndex, ctx: Any, y: fx.Node, inside: set[fx.Node],
                 private: set[str]) -> tuple[frozenset[str] | None, str]:
    """Private parameters whose zeroing makes ``y`` identically zero (smallest found), or None.

    Reads the zero-propagation specs the op rules recorded: a contraction is zero when one of
    its product operands is, a layout op when its input is, a pointwise op is probed.
    """
    from fxprune.passes.op_rules import probe_zero

    numel = index.numel
    memo: dict[TensorRef, frozenset[str] | None] = {}

    def cost(s: frozenset[str]) -> int:
        return sum(numel.get(p, 0) for p in s)

    def best(options: list[frozenset[str] | None]) -> frozenset[str] | None:
        ok = [o for o in options if o is not None]
        return min(ok, key=lambda s: (cost(s), sorted(s))) if ok else None

    def solve(ref: TensorRef | None, depth: int = 0) -> frozenset[str] | None:
        if ref is None:
            return None
        if ref in memo:
            return memo[ref]
        memo[ref] = None  # cycles cannot happen in a DAG; this also bounds the recursion
        node = index.by_name[ref.node]
        result: frozenset[str] | None = None
        if node.op == "placeholder":
            fqn = index.param_of.get(node.name)
            result = frozenset([fqn]) if fqn in private else None
        elif node.op == "call_function" and depth < 400 and (node in inside or node in index.derived):
            spec = ctx.zero_specs.get(ref)
            if spec is None or spec.kind == "never":
                result = None
            elif spec.kind == "pass":
                parts = [solve(i, depth + 1) for i in spec.inputs]
                result = frozenset().union(*parts) if parts and all(p is not None for p in parts) else None
            elif spec.kind == "contract":
                prod = best([solve(p, depth + 1) for p in spec.products])
                adds = [solve(a, depth + 1) for a in spec.additive]
                if prod is not None and all(a is not None for a in adds):
                    result = prod.union(*adds)
            elif spec.kind == "probe":
                inputs = list(spec.inputs)
                options = []
                for k, inp in enumerate(inputs):
                    if inp is None:
                        continue
                    pattern = tuple(j == k for j in range(len(inputs)))
                    if probe_zero(node, pattern):
                        options.append(solve(inp, depth + 1))
                if not any(o is not None for o in options):
                    pattern = tuple(i is not None for i in inputs)
                    if any(pattern) and probe_zero(node, pattern):
                        parts = [solve(i, depth + 1) for i in inputs if i is not None]
                        if all(p is not None for p in parts):
                            options.append(frozenset().union(*parts))
                result = best(options)
        memo[ref] = result
        return result

    ref = ctx.ref(y) if ctx.ref(y) is not None else TensorRef(y.name)
    found = solve(ref)
    if found is None or not found:
        return None, ("no set of the branch's own parameters makes its output zero (it ends in an op "
                      "that is not zero on zero input), so removal cannot be checked against zeroing")
    return found, ""


def _inside_modules(index: _GraphIndex, graph: Any, inside: set[fx.Node], private: set[str],
                    x: fx.Node) -> list[str]:
    """Maximal modules whose every node lies in the branch and whose tensors are all private."""
    cands: set[str] = set()
    for n in inside:
        cands.update(index.modules_of.get(n, ()))
    good: list[str] = []
    root = graph.module
    for path in sorted(cands):
        nodes = index.nodes_of.get(path, [])
        if not any(n in inside for n in nodes):
            continue
        members = set(nodes)
        allowed: set[fx.Node] = set()
        ok = True
        for n in reversed(nodes):  # users come after their inputs: decide them first
            if n in inside or _is_sink(n):
                allowed.add(n)
            elif _is_transparent(n) and (n is x or x in _inputs(n)):
                allowed.add(n)  # a no-op cast of the stream the module reads (RMSNorm's x.to(float32))
            elif _side_of(n, inside, members, allowed):
                allowed.add(n)  # a side computation (RoPE cos/sin slices) feeding only the branch
            else:
                ok = False
                break
        if not ok:
            continue
        try:
            sub = root.get_submodule(path)
        except AttributeError:
            continue
        names = [graph.canonical(f"{path}.{k}") for k, _ in sub.named_parameters(remove_duplicate=False)]
        names += [graph.canonical(f"{path}.{k}") for k, b in sub.named_buffers(remove_duplicate=False)
                  if b is not None and f"{path}.{k}" in _persistent_names(root)]
        if all(nm in private or not index.consumers.get(nm) for nm in names):
            good.append(path)
    return [p for p in good if not any(p.startswith(q + ".") for q in good)]


def _params_under(graph: Any, path: str) -> set[str]:
    try:
        sub = graph.module.get_submodule(path)
    except AttributeError:
        return set()
    return {graph.canonical(f"{path}.{k}") for k, _ in sub.named_parameters(remove_duplicate=False)}


def _side_of(n: fx.Node, inside: set[fx.Node], members: set[fx.Node], allowed: set[fx.Node]) -> bool:
    """A node of a module that only feeds the branch (or is shape arithmetic on SymInts)."""
    if n.op != "call_function":
        return False
    if not isinstance(n.meta.get("val"), torch.Tensor) and not isinstance(n.meta.get("val"), (list, tuple)):
        return True  # SymInt arithmetic, sym_size: shapes, no compute
    return bool(n.users) and all(u in inside or (u in members and u in allowed) for u in n.users)


def _persistent_names(root: torch.nn.Module) -> set[str]:
    cached = getattr(_persistent_names, "_cache", None)
    if cached is not None and cached[0] is root:
        return cached[1]
    names = set(root.state_dict().keys()) if not _on_meta(root) else {
        n for n, _ in root.named_buffers() if n.rpartition(".")[2] not in _nonpersistent(root, n)}
    _persistent_names._cache = (root, names)  # type: ignore[attr-defined]
    return names


def _on_meta(root: torch.nn.Module) -> bool:
    p = next(iter(root.parameters()), None)
    return p is not None and p.device.type == "meta"


def _nonpersistent(root: torch.nn.Module, name: str) -> set[str]:
    mp = name.rpartition(".")[0]
    try:
        mod = root.get_submodule(mp) if mp else root
    except AttributeError:
        return set()
    return set(getattr(mod, "_non_persistent_buffers_set", ()))


def _branch_name(index: _GraphIndex, graph: Any, inside: Sequence[fx.Node], private: Sequence[str],
                 modules: Sequence[str]) -> str:
    """The branch's module path: the common prefix of its modules (or of its private parameters)."""
    paths = list(modules) or [p.rpartition(".")[0] for p in private]
    if not paths:
        paths = [index.modules_of.get(n, ("",))[-1] if index.modules_of.get(n) else "" for n in inside]
    common = _common_prefix(paths)
    if common in paths and len(paths) == 1:
        return common
    # several modules (pre-norm + attention): name the branch after its largest module
    if len(paths) > 1:
        root = graph.module
        sizes = []
        for p in paths:
            try:
                sizes.append((sum(t.numel() for t in root.get_submodule(p).parameters()), p))
            except AttributeError:
                sizes.append((0, p))
        return max(sizes)[1]
    return common or "branch"


def _common_prefix(paths: Sequence[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    out = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def _layer_of(index: _GraphIndex, graph: Any, add: fx.Node, modules: Sequence[str],
              private: Sequence[str]) -> str | None:
    """The deepest container element (``ModuleList``/``Sequential`` child) holding the branch."""
    root = graph.module
    stack = index.modules_of.get(add, ())
    names = list(modules) + [p.rpartition(".")[0] for p in private]
    for path in reversed(stack):
        head, _, last = path.rpartition(".")
        if not last.isdigit() or not head:
            continue
        try:
            container = root.get_submodule(head)
        except AttributeError:
            continue
        if not isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)) or \
                len({type(m) for m in container}) != 1:
            continue  # a stack of layers of one kind (not [attention, feed-forward] as in T5's blocks)
        if all(n == path or n.startswith(path + ".") for n in names):
            return path
    return None


def _layers(index: _GraphIndex, graph: Any, branches: Sequence[Branch]) -> tuple[LayerInfo, ...]:
    by_layer: dict[str, list[Branch]] = collections.defaultdict(list)
    for b in branches:
        if b.layer is not None:
            by_layer[b.layer].append(b)
    out = []
    for path, bs in by_layer.items():
        container, _, idx = path.rpartition(".")
        own: set[str] = set()
        adds = set()
        for b in bs:
            own.update(b.nodes)
            own.update(b.sinks)
            adds.add(b.add)
        passthrough = all(b.removable for b in bs)
        nodes = index.nodes_of.get(path, [])
        members, allowed = set(nodes), set()
        for n in reversed(nodes):
            if (n.name in own or n.name in adds or _is_sink(n) or n.op != "call_function" or n in index.derived
                    or _is_transparent(n) or n.target is operator.getitem):
                allowed.add(n)
            elif _side_of(n, {index.by_name[o] for o in own if o in index.by_name}, members, allowed):
                allowed.add(n)
            else:
                passthrough = False
                break
        layer_params = _params_under(graph, path)
        branch_params = {p for b in bs for p in b.params}
        out.append(LayerInfo(path, container, int(idx), tuple(b.id for b in bs), passthrough,
                             layer_params <= branch_params))
    return tuple(sorted(out, key=lambda li: (li.container, li.index)))


def _unique_ids(branches: list[Branch]) -> list[Branch]:
    seen: collections.Counter = collections.Counter()
    out = []
    for b in branches:
        seen[b.id] += 1
        out.append(b if seen[b.id] == 1 else dataclasses.replace(b, id=f"{b.id}#{seen[b.id]}"))
    return out


def branch_numel(branch: Branch, numel: Mapping[str, int]) -> int:
    """Parameters removing ``branch`` saves."""
    return int(sum(numel.get(p, 0) for p in branch.params))


def block_of(branch: Branch) -> str | None:
    """The repeated block (``model.layers.3``) a branch lives in, for keep_blocks_first/last."""
    if branch.layer is not None:
        return branch.layer
    return block_of_name(branch.id + ".") if branch.id else None



def removed_branches(analysis: Any, plan: Mapping[str, Sequence[int]]) -> list[Branch]:
    """The branches a plan removes, in graph order."""
    out = []
    for g in getattr(analysis, "blocks", ()):
        for u in plan.get(g.id, ()) if hasattr(plan, "get") else ():
            out.append(g.branches[u])
    order = {b.id: i for i, b in enumerate(getattr(analysis, "branches", ()))}
    return sorted(out, key=lambda b: order.get(b.id, 0))


# ------------------------------------------------------------------------------------------
# Graph rewrite: bypass
# ------------------------------------------------------------------------------------------
def bypass_branches(gm: fx.GraphModule, analysis: Any, plan: Mapping[str, Sequence[int]]) -> list[str]:
    """Turn ``x + f(x)`` into ``x`` for every removed branch; drop the branch's nodes and tensors.

    Returns the FQNs of the tensors deleted from ``gm``.
    """
    branches = removed_branches(analysis, plan)
    if not branches:
        return []
    nodes = {n.name: n for n in gm.graph.nodes}
    alias: dict[str, fx.Node] = {}  # erased add -> the stream value that replaced it

    def resolve(name: str) -> fx.Node:
        node = alias.get(name)
        return node if node is not None else nodes[name]

    for br in branches:
        add, stream = nodes.get(br.add), resolve(br.stream)
        if add is None:
            continue
        add.replace_all_uses_with(stream)
        alias[br.add] = stream
        for name in (br.add, *reversed(br.sinks), *reversed(br.nodes)):
            node = nodes.get(name)
            if node is None or node.graph is not gm.graph:
                continue
            for user in list(node.users):  # assertions on branch values go with them
                if not user.users and user.meta.get("val") is None and user.op == "call_function":
                    gm.graph.erase_node(user)
            if not node.users:
                gm.graph.erase_node(node)
                nodes.pop(name, None)
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    graph = analysis.graph
    deleted = []
    for br in branches:
        for fqn in (*br.params, *br.buffers):
            for name in graph.aliases.get(fqn, [fqn]):
                if name not in used and _delete_tensor(gm, name):
                    deleted.append(name)
    return deleted


def _delete_tensor(root: torch.nn.Module, fqn: str) -> bool:
    mod_path, _, attr = fqn.rpartition(".")
    try:
        mod = root.get_submodule(mod_path) if mod_path else root
    except AttributeError:
        return False
    if get_tensor(mod, attr) is None:
        return False
    if attr in mod._parameters:
        del mod._parameters[attr]
        return True
    if attr in mod._buffers:
        del mod._buffers[attr]
        return True
    return False


# ------------------------------------------------------------------------------------------
# Module rewrite: zero modules, deleted layers, layer indices, config
# ------------------------------------------------------------------------------------------
class ZeroBranch(torch.nn.Module):
    """Stands in for a module of a removed residual branch: zeros of the shape it returned.

    ``spec`` describes the output (recorded from one call of the module it replaces): each
    tensor is ``ref.new_zeros`` shaped like one of the call's inputs (``ref``) except for the
    dims listed in ``dims``; non-tensor leaves (``None`` attention weights) are returned as
    they were.  Nothing is computed, and it holds no parameters.
    """

    def __init__(self, spec: Mapping[str, Any], replaces: str = "") -> None:
        super().__init__()
        self.spec = dict(spec)
        self.replaces = replaces

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _build_output(self.spec["out"], args, kwargs)

    def extra_repr(self) -> str:
        return f"replaces={self.replaces!r}"


def _build_output(tree: Mapping[str, Any], args: tuple, kwargs: Mapping[str, Any]) -> Any:
    kind = tree["t"]
    if kind == "tensor":
        ref = _find_ref(tree, args, kwargs)
        shape = list(ref.shape)
        for d, size in tree.get("dims", {}).items():
            shape[int(d)] = int(size)
        return ref.new_zeros(shape, dtype=getattr(torch, tree["dtype"]))
    if kind in ("tuple", "list"):
        items = [_build_output(t, args, kwargs) for t in tree["items"]]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _build_output(t, args, kwargs) for k, t in tree["items"].items()}
    return tree.get("value")


def _find_ref(tree: Mapping[str, Any], args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    where, key = tree["ref"]
    cand = args[key] if where == "arg" and key < len(args) else kwargs.get(key) if where == "kw" else None
    if isinstance(cand, torch.Tensor) and cand.dim() == tree["rank"]:
        return cand
    for v in list(args) + list(kwargs.values()):  # called differently (positional vs keyword)
        if isinstance(v, torch.Tensor) and v.dim() == tree["rank"] and v.is_floating_point():
            return v
    raise RuntimeError(f"ZeroBranch: no input of rank {tree['rank']} to shape its output on")


def output_spec(args: tuple, kwargs: Mapping[str, Any], output: Any) -> dict[str, Any] | None:
    """The :class:`ZeroBranch` spec of one recorded call, or None when an output has no model."""
    refs = [(("arg", i), a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    refs += [(("kw", k), v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]

    def enc(o: Any) -> dict[str, Any] | None:
        if isinstance(o, torch.Tensor):
            best = None
            for key, r in refs:
                if r.dim() != o.dim():
                    continue
                diff = {str(d): int(o.shape[d]) for d in range(o.dim()) if o.shape[d] != r.shape[d]}
                score = (len(diff), not r.is_floating_point())
                if best is None or score < best[0]:
                    best = (score, key, diff)
            if best is None or best[0][0] > 1:
                return None
            return {"t": "tensor", "ref": list(best[1]), "rank": o.dim(), "dims": best[2],
                    "dtype": str(o.dtype).replace("torch.", "")}
        if isinstance(o, (tuple, list)) and type(o) in (tuple, list):
            items = [enc(x) for x in o]
            return None if any(i is None for i in items) else {"t": type(o).__name__, "items": items}
        if isinstance(o, dict) and type(o) is dict:
            items = {k: enc(v) for k, v in o.items()}
            return None if any(i is None for i in items.values()) else {"t": "dict", "items": items}
        if o is None or isinstance(o, (bool, int, float, str)):
            return {"t": "const", "value": o}
        return None

    out = enc(output)
    return None if out is None else {"out": out}


@dataclasses.dataclass
class DepthRewrite:
    """What the module rewrite did for depth (recorded by ``save`` so ``load`` can redo it).

    ``deleted``: container path -> (original length, deleted indices); ``zeroed``: module path
    (after deletion) -> ZeroBranch spec; ``layer_attrs``: module path -> attr -> (old, new)
    layer indices; ``config``: config field -> (old, new); ``notes``: what a user should know.
    """

    deleted: dict[str, tuple[int, list[int]]] = dataclasses.field(default_factory=dict)
    zeroed: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    layer_attrs: dict[str, dict[str, tuple[int, int]]] = dataclasses.field(default_factory=dict)
    config: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    zeroed_params: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.deleted or self.zeroed)

    def remap(self, path: str) -> str | None:
        """A module path of the model before deletion, as it is after (None: it was deleted)."""
        for container, (_, gone) in self.deleted.items():
            prefix = container + "."
            if path.startswith(prefix):
                head, _, rest = path[len(prefix):].partition(".")
                if head.isdigit():
                    i = int(head)
                    if i in gone:
                        return None
                    j = i - sum(1 for g in gone if g < i)
                    return f"{container}.{j}" + (f".{rest}" if rest else "")
        return path

    def to_json(self) -> dict[str, Any]:
        return {"deleted": {k: [n, list(v)] for k, (n, v) in self.deleted.items()},
                "zeroed": self.zeroed, "zeroed_params": list(self.zeroed_params)}


_LAYER_ATTR = ("layer_idx", "layer_id", "layer_index", "layer_number", "layer_num", "block_idx")


def rewrite_depth(model: torch.nn.Module, analysis: Any, plan: Mapping[str, Sequence[int]],
                  original: torch.nn.Module | None = None, *, delete_layers: bool = True) -> DepthRewrite:
    """Apply the plan's removed branches to ``model`` (a copy the caller owns), in place.

    Layers whose branches all go (and whose remaining computation is the identity) are
    deleted from their container; the modules of the other removed branches are replaced by
    :class:`ZeroBranch`; layer-index attributes and the config fields that count layers
    follow.  ``original`` (the unpruned model, default ``model``) is run once on the example
    inputs to record the output shapes of the replaced modules; a fixed output width that is a
    pruned stream width (``hidden``) takes its kept size.
    """
    result = DepthRewrite()
    branches = removed_branches(analysis, plan)
    if not branches:
        return result
    gone_ids = {b.id for b in branches}
    layers = {li.path: li for li in analysis.depth.layers}
    deleted_layers = {li.path for li in layers.values() if delete_layers
                      and li.passthrough and li.removable and li.branches and set(li.branches) <= gone_ids}
    to_zero = [b for b in branches if b.layer not in deleted_layers]
    specs = _probe_specs(original if original is not None else model, analysis,
                         [m for b in to_zero for m in b.modules], _stream_sizes(analysis, plan, to_zero))
    for b in to_zero:
        for mp in b.modules:
            spec = specs.get(mp)
            if spec is None:
                result.problems.append(f"cannot replace {mp} of removed branch {b.id} by zeros "
                                       "(its output shape does not follow its inputs)")
                continue
            _replace_module(model, mp, ZeroBranch(spec, type(model.get_submodule(mp)).__name__))
            result.zeroed[mp] = spec
        if b.loose_params:  # owned by a module that stays: zero them so the output is zero
            with torch.no_grad():
                for fqn in b.loose_params:
                    t = get_tensor(model, fqn)
                    if t is not None:
                        t.zero_()
                        result.zeroed_params.append(fqn)
            result.notes.append(f"branch {b.id}: parameters {list(b.loose_params)} are owned by a module that "
                                "stays; they were zeroed, not removed")
    by_container: dict[str, list[int]] = collections.defaultdict(list)
    for path in deleted_layers:
        li = layers[path]
        by_container[li.container].append(li.index)
    for container, idxs in by_container.items():
        seq = model.get_submodule(container)
        length = len(seq)
        for i in sorted(idxs, reverse=True):
            del seq[i]
        result.deleted[container] = (length, sorted(idxs))
    result.zeroed = {result.remap(k) or k: v for k, v in result.zeroed.items()}
    result.zeroed_params = [_remap_fqn(result, p) for p in result.zeroed_params]
    containers = {li.container for li in layers.values() if li.branches and
                  (li.container in result.deleted or any(b.layer == li.path for b in to_zero))}
    _update_layer_config(model, result)
    types = getattr(getattr(model, "config", None), "layer_types", None)
    for container in containers:
        _renumber_layer_attrs(model, container, result, types if isinstance(types, list) else None)
    return result


def _remap_fqn(result: DepthRewrite, fqn: str) -> str:
    mp, _, attr = fqn.rpartition(".")
    new = result.remap(mp) if mp else mp
    return f"{new}.{attr}" if new else attr


def _replace_module(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = new


def _stream_sizes(analysis: Any, plan: Any, branches: Sequence[Branch]) -> dict[int, int]:
    """Old -> new size of every pruned dim of the removed branches' streams (the hidden width)."""
    from fxprune.graph import kept_size, layout_size

    removed = plan.removed_by_class if hasattr(plan, "removed_by_class") else {}
    out: dict[int, int] = {}
    for b in branches:
        for lay in analysis.layouts.get(TensorRef(b.stream), ()):
            if lay:
                old, new = layout_size(lay), kept_size(lay, removed)
                if old != new:
                    out[old] = new
    return out


def _probe_specs(model: torch.nn.Module, analysis: Any, paths: Sequence[str],
                 sizes: Mapping[int, int] | None = None) -> dict[str, dict[str, Any]]:
    """Run the example inputs once with hooks on ``paths``; the ZeroBranch spec of each.

    Fixed output sizes found in ``sizes`` (old -> new) are replaced by their new value.
    """
    from fxprune.util.modules import eval_mode

    specs: dict[str, dict[str, Any] | None] = {}
    handles = []

    def hook_for(path: str):
        def hook(module, args, kwargs, output):
            if path not in specs:
                specs[path] = output_spec(tuple(args), dict(kwargs), output)
        return hook

    for p in dict.fromkeys(paths):
        try:
            sub = model.get_submodule(p)
        except AttributeError:
            continue
        handles.append(sub.register_forward_hook(hook_for(p), with_kwargs=True))
    graph = analysis.graph
    try:
        with torch.no_grad(), eval_mode(model):
            model(*graph.example_args, **{**graph.example_kwargs, **graph.constant_kwargs})
    except Exception:  # noqa: BLE001 - an unmatched model fails later, against the graph
        pass
    finally:
        for h in handles:
            h.remove()
    return {k: _resize_spec(v, sizes or {}) for k, v in specs.items() if v is not None}


def _resize_spec(tree: Any, sizes: Mapping[int, int]) -> Any:
    if isinstance(tree, dict):
        out = {k: _resize_spec(v, sizes) for k, v in tree.items()}
        if tree.get("t") == "tensor":
            out["dims"] = {d: sizes.get(n, n) for d, n in tree.get("dims", {}).items()}
        return out
    if isinstance(tree, list):
        return [_resize_spec(v, sizes) for v in tree]
    return tree


def _renumber_layer_attrs(model: torch.nn.Module, container: str, result: DepthRewrite,
                          types: Sequence[str] | None = None) -> None:
    """Layer indices (``layer_idx``...) count the layers that are left, per module role.

    For each module role inside the layers (``self_attn``, the layer itself...), the layers
    that still have that module with a layer-index attribute are numbered 0, 1, 2...: after a
    deletion every later layer moves down, and an attention-only removal leaves the KV cache
    slots of the remaining attentions contiguous (the cache's first slot is always used).
    With per-layer ``types`` (``config.layer_types``: sliding and full attention), a module
    takes the lowest free slot of its own layer's type, so every cache slot keeps its kind.
    """
    seq = model.get_submodule(container)
    length, gone = result.deleted.get(container, (len(seq), []))
    original = [i for i in range(length) if i not in set(gone)]  # position -> original index
    found: dict[tuple[str, str], list[tuple[int, torch.nn.Module, int]]] = collections.defaultdict(list)
    for pos, layer in enumerate(seq):
        for rel, mod in layer.named_modules():
            if isinstance(mod, ZeroBranch):
                continue
            for attr in _LAYER_ATTR:
                old = vars(mod).get(attr)
                if type(old) is int:
                    found[(rel, attr)].append((pos, mod, old))
    for (rel, attr), entries in found.items():
        if any(old != original[pos] for pos, _, old in entries):
            continue  # not a layer index (it does not count the layers)
        taken: set[int] = set()
        for k, (pos, mod, old) in enumerate(entries):
            new = k
            if types is not None and len(types) == len(seq):
                new = next(j for j in range(len(types)) if j not in taken and types[j] == types[pos])
            taken.add(new)
            if new != old:
                setattr(mod, attr, new)
                path = f"{container}.{pos}" + (f".{rel}" if rel else "")
                result.layer_attrs.setdefault(path, {})[attr] = (old, new)
        if entries and 0 not in taken:
            result.notes.append(
                f"every {rel or 'layer'} of type {types[0]!r} (the KV cache's first slot) was removed: "
                "generation with a KV cache reads the sequence length from that slot and is unreliable; "
                "keep one such attention or generate without a cache")


def _update_layer_config(model: torch.nn.Module, result: DepthRewrite) -> None:
    """Config fields that count or list layers follow the deleted layers.

    Ints named like a layer count that equal a container's old length shrink; per-layer lists
    of that length (``layer_types``) lose the deleted entries; lists of layer indices
    (``mlp_only_layers``) are renumbered.  Whether the config then describes the model is
    checked by the rewrite (a skeleton built from it must have the model's shapes).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not result.deleted:
        return
    for _, (length, gone) in result.deleted.items():
        gone_set = set(gone)
        fields = config.to_dict()
        for key, value in fields.items():
            if "layer" not in key.lower():
                continue
            new: Any = None
            if type(value) is int and value == length:
                new = length - len(gone)
            elif isinstance(value, list) and len(value) == length and length > 1:
                new = [v for i, v in enumerate(value) if i not in gone_set]
            elif isinstance(value, list) and value and all(type(v) is int and 0 <= v < length for v in value):
                new = [v - sum(1 for g in gone if g < v) for v in value if v not in gone_set]
            if new is not None and new != value:
                try:
                    setattr(config, key, new)
                except Exception as exc:  # noqa: BLE001 - a config that validates its fields
                    result.problems.append(f"config.{key} could not be set to {new!r}: {exc}")
                    continue
                result.config[key] = (value, new)


def apply_recorded(model: torch.nn.Module, record: Mapping[str, Any]) -> bool:
    """Redo a saved :meth:`DepthRewrite.to_json` on a freshly built skeleton (``fxprune.load``);
    True when the skeleton needed it (its config alone does not describe the pruned depth).

    Layers are deleted only when the container still has its original length (a config that
    already describes the pruned depth builds the short model by itself).
    """
    changed = False
    for container, (length, gone) in record.get("deleted", {}).items():
        seq = model.get_submodule(container)
        if len(seq) == length:
            for i in sorted(gone, reverse=True):
                del seq[i]
            changed = True
    for path, spec in record.get("zeroed", {}).items():
        try:
            old = model.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(old, ZeroBranch):
            _replace_module(model, path, ZeroBranch(spec, type(old).__name__))
            changed = True
    return changed
