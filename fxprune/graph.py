"""The shared graph object and the plain data that the passes hand to each other.

Every pass reads and writes these types only: ``PrunableGraph`` (what capture produces and the
analysis annotates), ``Group``/``Member`` (what the analysis finds), and a plan, which is a plain
``{group_id: [units to remove]}`` dict.

A *layout* describes how the indices of one tensor dimension are built from *atoms*, the units of
pruning.  It is a tuple of factors in row-major (product) order; each factor is either

* ``("atom", class_id, size)``: an index space of ``size`` units that belongs to coupled class
  ``class_id`` (the id of a group, or of a frozen class), or
* ``("sum", (layout, layout, ...))``: a concatenation of sub-layouts along the same dimension
  (a fused QKV projection, the two halves RoPE rotates, a channel concat).

Removing unit ``u`` of class ``c`` removes every index whose coordinate on any ``c`` factor is
``u``.  This one rule covers heads (``h * head_dim + d``), GQA repeats, RoPE pairs (the same class
appears twice, once per half) and offsets into fused tensors.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Sequence

import numpy as np

Layout = tuple  # tuple of factors, see the module docstring


def layout_size(layout: Layout) -> int:
    """Number of indices a layout spans."""
    n = 1
    for factor in layout:
        if factor[0] == "atom":
            n *= factor[2]
        else:
            n *= sum(layout_size(part) for part in factor[1])
    return n


def layout_coords(layout: Layout) -> dict[int, list[np.ndarray]]:
    """For each class in ``layout``, one int array per occurrence giving the unit of every index.

    Entries are -1 where an index does not lie in that occurrence (another segment of a sum).
    """
    size = layout_size(layout)
    result: dict[int, list[np.ndarray]] = {}
    inner = size
    for factor in layout:
        fsize = factor[2] if factor[0] == "atom" else layout_size((factor,))
        inner //= fsize
        outer = size // (fsize * inner)
        for cls, arrays in _factor_coords(factor).items():
            for arr in arrays:
                # index = o * fsize * inner + f * inner + i  ->  coordinate arr[f]
                full = np.broadcast_to(arr[None, :, None], (outer, fsize, inner)).reshape(-1)
                result.setdefault(cls, []).append(full)
    return result


def _factor_coords(factor) -> dict[int, list[np.ndarray]]:
    if factor[0] == "atom":
        return {factor[1]: [np.arange(factor[2], dtype=np.int64)]}
    parts = factor[1]
    sizes = [layout_size(p) for p in parts]
    total = sum(sizes)
    out: dict[int, list[np.ndarray]] = {}
    offset = 0
    for part, psize in zip(parts, sizes):
        for cls, arrays in layout_coords(part).items():
            for arr in arrays:
                full = np.full(total, -1, dtype=np.int64)
                full[offset : offset + psize] = arr
                out.setdefault(cls, []).append(full)
        offset += psize
    return out


def kept_indices(layout: Layout, removed: dict[int, Iterable[int]]) -> np.ndarray:
    """Indices of a dimension that survive removing ``removed[class] = units``."""
    size = layout_size(layout)
    keep = np.ones(size, dtype=bool)
    if removed:
        coords = _cached_coords(layout)
        for cls, units in removed.items():
            units = np.asarray(sorted(units), dtype=np.int64)
            if len(units) == 0:
                continue
            for arr in coords.get(cls, ()):
                keep &= ~np.isin(arr, units)
    return np.nonzero(keep)[0]


def kept_size(layout: Layout, removed: dict[int, Iterable[int]]) -> int:
    """Size of a dimension after pruning, without materialising its indices."""
    n = 1
    for factor in layout:
        if factor[0] == "atom":
            n *= factor[2] - len(set(removed.get(factor[1], ())))
        else:
            n *= sum(kept_size(part, removed) for part in factor[1])
    return n


@functools.lru_cache(maxsize=4096)
def _cached_coords(layout: Layout) -> dict[int, list[np.ndarray]]:
    return layout_coords(layout)


def layout_classes(layout: Layout) -> list[int]:
    """Classes appearing in a layout, in order of first appearance."""
    seen: list[int] = []
    for factor in layout:
        if factor[0] == "atom":
            if factor[1] not in seen:
                seen.append(factor[1])
        else:
            for part in factor[1]:
                for c in layout_classes(part):
                    if c not in seen:
                        seen.append(c)
    return seen


@dataclasses.dataclass(frozen=True)
class Member:
    """One tensor dimension that shrinks when units of its group are removed.

    ``name`` is a parameter or buffer FQN, or None for a pure activation space (then ``node``
    names the graph node).  ``indices(units)`` maps group units to indices along ``dim``.
    """

    name: str | None
    dim: int
    node: str
    layout: Layout
    class_id: int
    kind: str = "parameter"  # "parameter" | "buffer" | "activation"

    @property
    def dim_size(self) -> int:
        return layout_size(self.layout)

    def indices(self, units: Iterable[int]) -> list[int]:
        """Indices along ``dim`` covered by ``units`` (sorted, unique)."""
        units = np.asarray(sorted(set(int(u) for u in units)), dtype=np.int64)
        if len(units) == 0:
            return []
        mask = np.zeros(self.dim_size, dtype=bool)
        for arr in _cached_coords(self.layout).get(self.class_id, ()):
            mask |= np.isin(arr, units)
        return np.nonzero(mask)[0].tolist()

    @property
    def unit_width(self) -> int:
        """How many indices of this dimension one unit covers."""
        return len(self.indices([0]))


@dataclasses.dataclass
class Group:
    """A set of coupled channels: removing unit ``u`` removes ``m.indices([u])`` from every member.

    ``exact`` is True when removing units gives the same function as zeroing the parameter slices
    they cover (so ``verify`` can check the rewrite bit for bit).
    """

    id: str
    kind: str
    size: int
    exact: bool
    members: list[Member]
    class_id: int
    inexact_reasons: list[str] = dataclasses.field(default_factory=list)
    block: str | None = None  # the module path of the repeated block it lives in, if any

    @property
    def params(self) -> list[Member]:
        return [m for m in self.members if m.kind == "parameter"]

    @property
    def param_names(self) -> list[str]:
        return sorted({m.name for m in self.params})

    def params_per_unit(self, numel: dict[str, int]) -> int:
        """Parameters removed per unit (for planning against a parameter budget)."""
        total = 0
        for m in self.params:
            other = numel[m.name] // m.dim_size
            total += other * m.unit_width
        return total

    def __repr__(self) -> str:
        return (
            f"Group(id={self.id!r}, kind={self.kind}, size={self.size}, exact={self.exact}, "
            f"members={len(self.members)})"
        )


@dataclasses.dataclass
class Unsupported:
    """An op the analysis has no rule for; it froze every dimension the op touches."""

    node: str
    op: str
    source: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}) at {self.source}"


@dataclasses.dataclass
class FrozenClass:
    """A coupled space that cannot be pruned, with the first reason found."""

    class_id: int
    size: int
    reason: str
    members: list[Member]


def source_location(node: Any) -> str:
    """The user's source line that produced a graph node, as 'file:line in fn'."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return "<unknown source>"
    last = lines[-1]
    # 'File "/path/x.py", line 12, in forward'
    try:
        path = last.split('"')[1]
        rest = last.split('"', 2)[2]
        line = rest.split("line")[1].split(",")[0].strip()
        fn = rest.split(" in ")[-1].strip()
        return f"{path}:{line} in {fn}"
    except IndexError:
        return last


def normalize_plan(plan: dict[str, Sequence[int]], groups: dict[str, Group]) -> dict[str, list[int]]:
    """Check a plan against its groups and return it with sorted unique unit lists.

    Raises ``PlanError`` for an unknown group, a unit out of range, or removing every unit.
    """
    from fxprune.errors import PlanError

    clean: dict[str, list[int]] = {}
    for gid, units in plan.items():
        if gid not in groups:
            close = [g for g in groups if gid.split(":")[0] in g][:3]
            hint = f" Did you mean one of {close}?" if close else ""
            raise PlanError(f"plan names unknown group {gid!r}.{hint}")
        group = groups[gid]
        us = sorted(set(int(u) for u in units))
        bad = [u for u in us if u < 0 or u >= group.size]
        if bad:
            raise PlanError(
                f"plan for group {gid!r} has units {bad} out of range [0, {group.size})."
            )
        if len(us) >= group.size:
            raise PlanError(
                f"plan removes all {group.size} units of group {gid!r}; keep at least one."
            )
        if us:
            clean[gid] = us
    return clean


class PrunableGraph:
    """What capture produces and every later pass reads: an ExportedProgram plus bookkeeping.

    Attributes:
        exported_program: the ATen-level ``torch.export.ExportedProgram`` (HOPs inlined).
        module: the user's module the graph was traced from (never modified by fxprune).
        example_args / example_kwargs: the tensors used for tracing (their real values, kept so
            ``rewrite`` can verify on them).
        constant_kwargs: non-tensor keyword arguments frozen into the trace (e.g. use_cache=False).
        dynamic_shapes: the spec passed to torch.export.
        aliases: parameter FQN -> every FQN that shares the same tensor (tied weights).
        groups / frozen / unsupported / analysis: filled in by ``fxprune.analyze``.
    """

    def __init__(
        self,
        exported_program: Any,
        module: Any,
        example_args: tuple,
        example_kwargs: dict,
        constant_kwargs: dict,
        dynamic_shapes: Any,
        aliases: dict[str, list[str]],
        on_meta: bool = False,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.exported_program = exported_program
        self.module = module
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self.constant_kwargs = constant_kwargs
        self.dynamic_shapes = dynamic_shapes
        self.aliases = aliases
        self.on_meta = on_meta
        self.timings = dict(timings or {})
        self.groups: list[Group] | None = None
        self.frozen: list[FrozenClass] = []
        self.unsupported: list[Unsupported] = []
        self.analysis: Any = None

    # ------------------------------------------------------------------ running
    def graph_module(self):
        """The exported program as a runnable (unlifted) GraphModule."""
        return self.exported_program.module()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = {**kwargs, **self.constant_kwargs}
        return self.graph_module()(*args, **kwargs)

    @property
    def num_nodes(self) -> int:
        return len(self.exported_program.graph.nodes)

    def group(self, group_id: str) -> Group:
        for g in self.groups or []:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    # ------------------------------------------------------------------ reporting
    def summary(self, max_rows: int | None = 60) -> str:
        """A table of groups: id, kind, units, exact, member count, parameters they shrink."""
        from fxprune.report import group_table

        return group_table(self, max_rows=max_rows)

    def to_graphml(self, path: str) -> str:
        """Write the group/parameter dependency graph as GraphML (for yEd, Gephi, Cytoscape)."""
        from fxprune.report import write_graphml

        return write_graphml(self, path)

    def __repr__(self) -> str:
        n = len(self.groups) if self.groups is not None else "?"
        return f"PrunableGraph(nodes={self.num_nodes}, groups={n}, unsupported={len(self.unsupported)})"
