"""MoE experts: the routing facts of each experts group, the masked-router oracle, expert criteria.

The analysis finds experts as an ordinary group (kind ``experts``) because the routing rules
in :mod:`fxprune.passes.op_rules` follow the *values* of the router's top-k indices: the
expert weights indexed by them (``gate_up_proj[ids]``), the offsets of a grouped matmul
(``histc`` of the sorted ids), ``one_hot``, ``gather``, ``scatter``.  Removing expert ``e`` then
removes its weights, its router row, and its share of the routing: the router computes ``E-1``
logits, so its softmax, top-k and top-k renormalisation run over the remaining experts exactly
as the model does them.

That is not the same function as zeroing the expert (the tokens that chose it are re-routed),
so the group is inexact.  Its oracle is the **masked-router original**: the original graph with
the removed experts' router logits (and the top-k inputs) set to ``-inf``.  ``verify`` compares
against it whenever every path from the router logits to the top-k is one whose result a
``-inf`` logit leaves unchanged for the other experts (softmax, sigmoid, casts, scaling, a
selection bias).

Criteria (:data:`EXPERT_IMPORTANCE`, higher = keep):

* ``reap``: router-weighted expert activation (REAP, Lasby et al. 2025): the mean over the
  tokens routed to an expert of ``gate * ||expert output||``;
* ``frequency``: how often the router picks the expert on the calibration tokens;
* ``random``: a seeded baseline.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import zlib
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from fxprune.errors import BadInputError, DataError, ScoringError
from fxprune.graph import kept_indices, kept_size, layout_classes, layout_size
from fxprune.passes.base import check, class_registrar, fxpass
from fxprune.types import ArgPath, TensorRef
from fxprune.util.modules import get_tensor

aten = torch.ops.aten

__all__ = ["ExpertRouting", "detect_experts", "masked_router_program", "EXPERT_IMPORTANCE",
           "register_expert_importance", "score_experts", "min_kept_experts"]

# Ops a -inf logit passes through without changing what the other experts get
_MASK_SAFE = {
    aten._to_copy, aten.to, aten.alias, aten.clone, aten.contiguous, aten.view, aten.reshape, aten._unsafe_view,
    aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.sigmoid, aten.mul, aten.div,
    aten.add, aten.sub, aten.detach, aten.lift_fresh_copy,
}
_ROUTER_OPS = {aten.linear, aten.mm, aten.matmul, aten.addmm, aten.bmm}


@dataclasses.dataclass(frozen=True)
class ExpertRouting:
    """The routing facts of one experts group.

    ``topk`` lists ``(node, dim, k)`` of the router's top-k; ``masks`` the ``(node, dim)``
    tensors the masked-router oracle sets to ``-inf`` on removed experts (the router logits and
    the top-k inputs); ``rows`` pairs each weighted expert output (``gate * expert(x)``, one row
    per routed token) with the tensor holding the expert id of each row (for REAP);
    ``value_args``: node -> arg path -> (layout, delta), constants that are the number of
    experts plus ``delta`` (``histc(..., max=E-1)``).  ``oracle`` says whether the masked
    router is an exact oracle; ``why`` says why not.
    """

    group: str
    class_id: int
    topk: tuple[tuple[str, int, int], ...]
    masks: tuple[tuple[str, int], ...]
    rows: tuple[tuple[str, TensorRef], ...]
    value_args: Mapping[str, Mapping[ArgPath, tuple[Any, int]]]
    oracle: bool
    why: str = ""

    @property
    def top_k(self) -> int:
        return max((k for _, _, k in self.topk), default=1)


def _dims_with(layouts: Mapping[TensorRef, Any], ref: TensorRef, cls: int) -> list[int]:
    return [d for d, lay in enumerate(layouts.get(ref, ())) if lay and cls in layout_classes(lay)]


def detect_experts(ctx: Any, result: Any) -> tuple[ExpertRouting, ...]:
    """Routing records for the experts groups of an analysis (called by ``analyze``)."""
    by_class = {g.class_id: g for g in result.groups if g.kind == "experts"}
    if not by_class:
        return ()
    layouts = result.layouts
    nodes = {n.name: n for n in ctx.graph.nodes}
    facts: dict[int, dict[str, list]] = {}
    for kind, info in ctx.routing:
        if kind != "topk":
            continue
        name, dim, k = info
        node = nodes[name]
        src = ctx.ref(node.args[0])
        lay = layouts.get(src, ())[dim] if dim < len(layouts.get(src, ())) else None
        for c in layout_classes(lay) if lay else ():
            if c in by_class:
                facts.setdefault(c, {"topk": [], "masks": [], "why": []})
                f = facts[c]
                f["topk"].append((name, dim, k))
                f["masks"].append((src.node if src.index is None else None, dim))
                masks, why = _router_masks(ctx, layouts, node, c)
                f["masks"].extend(masks)
                f["why"].extend(why)
    rows = _weighted_rows(ctx, layouts, nodes)
    value_args = {}
    for name, entries in ctx.value_args.items():
        for path, (ref, dim, delta) in entries.items():
            value_args.setdefault(name, {})[path] = (layouts[ref][dim], delta)
    out = []
    for c, f in facts.items():
        g = by_class[c]
        masks = tuple(dict.fromkeys(m for m in f["masks"] if m[0] is not None))
        mine = {n: {p: v for p, v in e.items() if c in layout_classes(v[0])} for n, e in value_args.items()}
        mine = {n: e for n, e in mine.items() if e}
        my_rows = tuple(r for r in rows if _row_class(ctx, layouts, r, c))
        why = "; ".join(dict.fromkeys(f["why"]))
        out.append(ExpertRouting(g.id, c, tuple(f["topk"]), masks, my_rows, mine, not why, why))
    return tuple(out)


def _router_masks(ctx: Any, layouts: Mapping, topk: fx.Node, cls: int) -> tuple[list, list[str]]:
    """Walk back from a top-k's input along tensors carrying the expert space to the router."""
    masks, why = [], []
    stack, seen = [topk.args[0]], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        ref = ctx.ref(node)
        dims = _dims_with(layouts, ref, cls) if ref is not None else []
        if not dims:
            continue
        packet = getattr(node.target, "overloadpacket", None)
        if packet in _ROUTER_OPS:
            masks.append((node.name, dims[-1]))
            continue
        if packet not in _MASK_SAFE:
            why.append(f"{node.target} at {node.name} lies between the router logits and its top-k")
        for a in node.all_input_nodes:
            stack.append(a)
    if not masks:
        why.append(f"no router projection found before {topk.name}")
    return masks, why


def _weighted_rows(ctx: Any, layouts: Mapping, nodes: Mapping[str, fx.Node]) -> list[tuple[str, TensorRef]]:
    """``(mul node, ids)``: a routed expert output scaled by its gate, and each row's expert id.

    The expert computation's rows are aligned with the ids that indexed the expert weights
    (``w[ids]``), or with the sorted ids whose histogram gave a grouped matmul its offsets.
    """
    consumers: dict[str, TensorRef] = {}  # node -> ids aligned with its rows
    hist_src = {}
    for node in ctx.graph.nodes:
        if node.op == "call_function" and node.target is aten.histc.default:
            hist_src[node.name] = ctx.ref(node.args[0])
    for kind, info in ctx.routing:
        if kind == "indexed":
            name, _, dim, idx = info
            node = nodes[name]
            if node.target is aten.index.Tensor and dim == 0:
                consumers[name] = idx
        elif kind == "grouped_mm":
            name, offs = info
            ids = _histogram_ids(nodes, nodes[offs], hist_src)
            if ids is not None:
                consumers[name] = ids
    gates = _gate_nodes(ctx, nodes)
    out = []
    for node in ctx.graph.nodes:
        if node.op != "call_function" or node.target is not aten.mul.Tensor or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for expert_side, gate_side in ((a, b), (b, a)):
            if gate_side in gates and expert_side not in gates:
                ids = _rows_of(expert_side, consumers)
                if ids is not None:
                    out.append((node.name, ids))
                break
    return out


def _histogram_ids(nodes: Mapping[str, fx.Node], offs: fx.Node, hist_src: Mapping[str, TensorRef]):
    cur = offs
    for _ in range(4):
        if cur.name in hist_src:
            return hist_src[cur.name]
        ins = [i for i in cur.all_input_nodes]
        if len(ins) != 1:
            return None
        cur = ins[0]
    return None


def _gate_nodes(ctx: Any, nodes: Mapping[str, fx.Node]) -> set[fx.Node]:
    """Values derived from the router's top-k *values* (the routing weights), through layout ops,
    renormalisation and scaling."""
    gates: set[fx.Node] = set()
    for kind, info in ctx.routing:
        if kind == "topk":
            for u in nodes[info[0]].users:
                if u.target.__name__ == "getitem" and u.args[1] == 0:
                    gates.add(u)
        elif kind == "indexed" and nodes[info[0]].target is aten.gather.default:
            gates.add(nodes[info[0]])  # scores.gather(1, topk_indices): the routing weights
    frontier = list(gates)
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in gates or u.op != "call_function":
                continue
            packet = getattr(u.target, "overloadpacket", None)
            ok = packet in (aten.reshape, aten.view, aten.unsqueeze, aten.squeeze, aten.div, aten.div_,
                            aten.mul, aten._to_copy, aten.to, aten.index, aten.clone, aten.sum, aten.add,
                            aten.flatten, aten.expand, aten.masked_fill)
            if packet is aten.mul and any(isinstance(x, fx.Node) and x not in gates and
                                          x.meta.get("val") is not None and x.meta["val"].dim() > 1
                                          for x in u.args[:2]):
                ok = False  # gate * expert output: the weighted rows themselves
            if ok:
                gates.add(u)
                frontier.append(u)
    return gates


def _rows_of(node: fx.Node, consumers: Mapping[str, TensorRef]) -> TensorRef | None:
    """The ids aligned with ``node``'s rows: walk back to the expert computation that made them."""
    stack, seen = collections.deque([node]), set()  # breadth first: the nearest expert matmul
    while stack:
        cur = stack.popleft()
        if cur in seen or not isinstance(cur, fx.Node) or cur.op != "call_function":
            continue
        seen.add(cur)
        if cur.name in consumers:
            return consumers[cur.name]
        if len(seen) > 64:
            return None
        stack.extend(cur.all_input_nodes)
    return None


def _row_class(ctx: Any, layouts: Mapping, row: tuple[str, TensorRef], cls: int) -> bool:
    ids = row[1]
    atoms = ctx.values_of(ids)
    if not atoms:
        return False
    return cls in layout_classes(ctx.store.layout(atoms))


def min_kept_experts(analysis: Any) -> dict[str, int]:
    """Group id -> the fewest experts the router needs (its top-k)."""
    return {r.group: r.top_k for r in getattr(analysis, "experts", ())}


# ------------------------------------------------------------------------------------------
# Rewrite: constants that are the number of experts plus a delta
# ------------------------------------------------------------------------------------------
def set_value_args(nodes: Mapping[str, fx.Node], analysis: Any, removed: Mapping[int, Any],
                   set_path: Callable[[fx.Node, ArgPath, int], None]) -> dict[str, dict[ArgPath, tuple[int, int]]]:
    """``histc(ids, bins=E, min=0, max=E-1)``: ``max`` follows the kept number of experts."""
    changed: dict[str, dict[ArgPath, tuple[int, int]]] = {}
    for r in getattr(analysis, "experts", ()):
        for name, entries in r.value_args.items():
            node = nodes.get(name)
            if node is None:
                continue
            for path, (lay, delta) in entries.items():
                old, new = layout_size(lay) + delta, kept_size(lay, removed) + delta
                if new != old:
                    set_path(node, path, new)
                    changed.setdefault(name, {})[path] = (old, new)
    return changed


# ------------------------------------------------------------------------------------------
# The masked-router oracle
# ------------------------------------------------------------------------------------------
def expert_plan(analysis: Any, plan: Mapping[str, Sequence[int]]) -> list[tuple[ExpertRouting, tuple[int, ...]]]:
    """The experts groups a plan prunes, with their removed units."""
    return [(r, tuple(plan[r.group])) for r in getattr(analysis, "experts", ()) if plan.get(r.group)]


def oracle_applies(analysis: Any, plan: Mapping[str, Sequence[int]]) -> bool:
    """Every pruned experts group has an exact masked-router oracle."""
    pruned = expert_plan(analysis, plan)
    return bool(pruned) and all(r.oracle for r, _ in pruned)


def masked_router_program(analysis: Any, plan: Mapping[str, Sequence[int]]) -> fx.GraphModule:
    """The original program with the removed experts' router logits and top-k inputs at ``-inf``."""
    gm = analysis.graph.exported_program.module()
    nodes = {n.name: n for n in gm.graph.nodes}
    for r, units in expert_plan(analysis, plan):
        removed = {r.class_id: list(units)}
        for k, (name, dim) in enumerate(r.masks):
            node = nodes.get(name)
            if node is None:
                continue
            lay = analysis.layouts[TensorRef(name)][dim]
            kept = set(kept_indices(lay, removed).tolist())
            gone = [i for i in range(layout_size(lay)) if i not in kept]
            buf = f"_fxprune_masked_{r.class_id}_{k}"
            gm.register_buffer(buf, torch.as_tensor(gone, dtype=torch.long), persistent=False)
            users = list(node.users)
            with gm.graph.inserting_after(node):
                idx = gm.graph.get_attr(buf)
            with gm.graph.inserting_after(idx):
                masked = gm.graph.call_function(aten.index_fill.int_Scalar, (node, dim, idx, -math.inf))
            for u in users:
                u.replace_input_with(node, masked)
    gm.graph.lint()
    gm.recompile()
    return gm


def masked_reference(original: torch.nn.Module, analysis: Any, plan: Any, weights: Any,
                     args: tuple, kwargs: dict) -> Any:
    """Outputs of the masked-router original, with the plan's other units zeroed (``zeroed_copy``)."""
    from fxprune.passes.rewrite import zeroed_copy

    z = zeroed_copy(original, analysis, plan, weights)
    gm = masked_router_program(analysis, plan)
    state = {**dict(z.named_parameters(remove_duplicate=False)), **dict(z.named_buffers(remove_duplicate=False))}
    state = {k: v for k, v in state.items() if get_tensor(gm, k) is not None}
    with torch.no_grad():
        return torch.func.functional_call(gm, state, args, kwargs, strict=False)


# ------------------------------------------------------------------------------------------
# Criteria
# ------------------------------------------------------------------------------------------
EXPERT_IMPORTANCE: dict[str, type["ExpertImportance"]] = {}
"""Expert criteria by name.  Add one with :func:`register_expert_importance`."""


register_expert_importance = class_registrar(EXPERT_IMPORTANCE, lambda: ExpertImportance,
                                             "register_expert_importance")
"""Class decorator: make an :class:`ExpertImportance` available as ``score_experts(importance=name)``."""


class ExpertImportance:
    """Accumulates per-expert statistics from the routing tensors of calibration runs."""

    name: ClassVar[str] = "?"
    needs_data: ClassVar[bool] = True

    def __init__(self, routing: ExpertRouting, size: int, seed: int = 0) -> None:
        self.routing, self.size, self.seed = routing, size, seed
        self.total = np.zeros(size)
        self.count = np.zeros(size)

    def observe(self, values: Mapping[str, torch.Tensor]) -> None:
        """``values``: the captured tensors (top-k indices, weighted rows, row ids) of one batch."""

    def scores(self) -> np.ndarray:
        raise NotImplementedError


@register_expert_importance("frequency")
class RoutingFrequency(ExpertImportance):
    """Fraction of (token, slot) routing decisions that pick each expert."""

    def observe(self, values):
        for name, _, _ in self.routing.topk:
            ids = values.get(f"{name}:1")
            if ids is not None:
                self.total += np.bincount(ids.reshape(-1).cpu().numpy(), minlength=self.size)[: self.size]

    def scores(self):
        return self.total / max(self.total.sum(), 1.0)


@register_expert_importance("reap")
class REAP(ExpertImportance):
    """Mean over the tokens routed to an expert of ``gate * ||expert output||`` (REAP)."""

    def observe(self, values):
        for name, ids_ref in self.routing.rows:
            rows, ids = values.get(name), values.get(str(ids_ref))
            if rows is None or ids is None:
                continue
            norms = rows.float().reshape(rows.shape[0], -1).norm(dim=-1).cpu().numpy().astype(np.float64)
            e = ids.reshape(-1).long().cpu().numpy()
            keep = (e >= 0) & (e < self.size)
            self.total += np.bincount(e[keep], weights=norms[keep], minlength=self.size)[: self.size]
            self.count += np.bincount(e[keep], minlength=self.size)[: self.size]

    def scores(self):
        if not self.routing.rows:
            raise ScoringError(f"REAP found no weighted expert outputs for {self.routing.group}; use 'frequency'")
        return self.total / np.maximum(self.count, 1.0)


@register_expert_importance("random")
class RandomExperts(ExpertImportance):
    needs_data = False

    def scores(self):
        return np.random.default_rng([self.seed, zlib.crc32(self.routing.group.encode())]).random(self.size)


class _Capture(fx.Interpreter):
    """Runs a program and keeps the values of the nodes named in ``wanted``."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        for i in range(2):
            if f"{n.name}:{i}" in self.wanted and isinstance(out, (tuple, list)):
                self.values[f"{n.name}:{i}"] = out[i]
        return out


def _requires(model: Any, analysis: Any, *args: Any, **kwargs: Any) -> None:
    check(isinstance(model, torch.nn.Module), BadInputError, "score_experts() needs the nn.Module")
    check(hasattr(analysis, "experts"), BadInputError, "score_experts() needs the Analysis from fxprune.analyze")


@fxpass("score_experts", requires=_requires)
def score_experts(model: torch.nn.Module, analysis: Any, batches: Sequence[Any] | None = None, *,
                  importance: str = "reap", normalize: str | None = "mean", seed: int = 0,
                  progress: bool = True) -> Any:
    """Score every expert of every experts group (higher = keep): ``{group_id: scores}``.

    ``importance`` is a name in :data:`EXPERT_IMPORTANCE` (``reap``, ``frequency``, ``random``).
    The analysed program is run on ``batches``; the router's top-k indices and the weighted
    expert outputs are read from it.
    """
    from tqdm.auto import tqdm

    from fxprune.passes.block_scoring import _graph_inputs
    from fxprune.passes.scoring import NORMALIZERS, Scores, _lookup
    from fxprune.util.modules import eval_mode

    cls = _lookup(EXPERT_IMPORTANCE, importance, "expert importance criterion")
    norm = _lookup(NORMALIZERS, normalize, "normalize")
    sizes = {g.id: g.size for g in analysis.groups}
    crits = [cls(r, sizes[r.group], seed) for r in analysis.experts]
    batches = list(batches or [])
    if cls.needs_data and not batches:
        raise DataError(f"expert importance {importance!r} needs calibration batches")
    if cls.needs_data and crits:
        gm = analysis.graph.exported_program.module()
        wanted = set()
        for c in crits:
            wanted.update(f"{name}:1" for name, _, _ in c.routing.topk)
            for name, ids in c.routing.rows:
                wanted.update((name, str(ids)))
        with torch.no_grad(), eval_mode(model):
            for b in tqdm(batches, desc=f"scoring experts ({importance})", disable=not progress, leave=False):
                args, kwargs = _graph_inputs(analysis.graph, b)
                cap = _Capture(gm, wanted)
                cap.run(*_flat_inputs(gm, args, kwargs))
                for c in crits:
                    c.observe(cap.values)
    out = {}
    for c in crits:
        s = np.asarray(c.scores(), dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise ScoringError(f"non-finite expert scores for {c.routing.group}")
        out[c.routing.group] = np.asarray(norm(s), dtype=np.float64)
    return Scores(out, importance, "expert", normalize, len(batches), 0)


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The flat placeholder values an unlifted program's graph takes for ``(args, kwargs)``."""
    import torch.utils._pytree as pytree

    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        flat, got = pytree.tree_flatten((args, kwargs))
        if got != spec:  # keyword order differs from the traced one: reorder by the spec
            ordered = {k: kwargs[k] for k in _spec_keys(spec) if k in kwargs}
            flat, _ = pytree.tree_flatten((args, ordered))
        return flat
    return list(args) + list(kwargs.values())


def _spec_keys(spec: Any) -> list[str]:
    try:
        return list(spec.children_specs[1].context)
    except (AttributeError, IndexError):
        return []
