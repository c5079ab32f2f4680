"""The plain data the passes hand to each other: the captured graph, groups, members, layouts.

``PrunableGraph`` is what capture produces.  ``Group``/``Member`` (and ``FrozenClass``,
``Unsupported``) are what the analysis finds; they are frozen, so a later pass cannot change what
an earlier one decided.

A *layout* describes how the indices of one tensor dimension are built from *atoms*, the units of
pruning.  It is a tuple of factors in row-major (product) order; each factor is either

* :class:`~fxprune.types.Atom` ``(cls, size)``: an index space of ``size`` units that belongs to
  coupled class ``cls`` (the id of a group, or of a frozen class), or
* :class:`~fxprune.types.Concat` ``(parts)``: a concatenation of sub-layouts along the same
  dimension (a fused QKV projection, the two halves RoPE rotates, a channel concat).

Removing unit ``u`` of class ``c`` removes every index whose coordinate on any ``c`` factor is
``u``.  This one rule covers heads (``h * head_dim + d``), GQA repeats, RoPE pairs (the same class
appears twice, once per half) and offsets into fused tensors.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping

import numpy as np

from fxprune.types import Atom, Concat, GroupKind, Layout, MemberKind


def layout_size(layout: Layout) -> int:
    """Number of indices a layout spans."""
    n = 1
    for factor in layout:
        if isinstance(factor, Atom):
            n *= factor.size
        else:
            n *= sum(layout_size(part) for part in factor.parts)
    return n


def layout_coords(layout: Layout) -> dict[int, list[np.ndarray]]:
    """For each class in ``layout``, one int array per occurrence giving the unit of every index.

    Entries are -1 where an index does not lie in that occurrence (another segment of a concat).
    """
    size = layout_size(layout)
    result: dict[int, list[np.ndarray]] = {}
    inner = size
    for factor in layout:
        fsize = factor.size if isinstance(factor, Atom) else layout_size((factor,))
        inner //= fsize
        outer = size // (fsize * inner)
        for cls, arrays in _factor_coords(factor).items():
            for arr in arrays:
                # index = o * fsize * inner + f * inner + i  ->  coordinate arr[f]
                full = np.broadcast_to(arr[None, :, None], (outer, fsize, inner)).reshape(-1)
                result.setdefault(cls, []).append(full)
    return result


def _factor_coords(factor: Atom | Concat) -> dict[int, list[np.ndarray]]:
    if isinstance(factor, Atom):
        return {factor.cls: [np.arange(factor.size, dtype=np.int64)]}
    sizes = [layout_size(p) for p in factor.parts]
    total = sum(sizes)
    out: dict[int, list[np.ndarray]] = {}
    offset = 0
    for part, psize in zip(factor.parts, sizes):
        for cls, arrays in layout_coords(part).items():
            for arr in arrays:
                full = np.full(total, -1, dtype=np.int64)
                full[offset : offset + psize] = arr
                out.setdefault(cls, []).append(full)
        offset += psize
    return out


@functools.lru_cache(maxsize=4096)
def cached_coords(layout: Layout) -> dict[int, list[np.ndarray]]:
    """:func:`layout_coords`, cached (layouts are immutable and hashable)."""
    return layout_coords(layout)


def kept_indices(layout: Layout, removed: Mapping[int, Iterable[int]]) -> np.ndarray:
    """Indices of a dimension that survive removing ``removed[class] = units``."""
    size = layout_size(layout)
    keep = np.ones(size, dtype=bool)
    if removed:
        coords = cached_coords(layout)
        for cls, units in removed.items():
            units = np.asarray(sorted(units), dtype=np.int64)
            if len(units) == 0:
                continue
            for arr in coords.get(cls, ()):
                keep &= ~np.isin(arr, units)
    return np.nonzero(keep)[0]


def kept_size(layout: Layout, removed: Mapping[int, Any]) -> int:
    """Size of a dimension after pruning; ``removed[c]`` is a unit list or a unit count."""
    n = 1
    for factor in layout:
        if isinstance(factor, Atom):
            r = removed.get(factor.cls, ())
            n *= factor.size - (r if isinstance(r, (int, np.integer)) else len(set(r)))
        else:
            n *= sum(kept_size(part, removed) for part in factor.parts)
    return n


def layout_classes(layout: Layout) -> list[int]:
    """Classes appearing in a layout, in order of first appearance."""
    seen: list[int] = []
    for factor in layout:
        if isinstance(factor, Atom):
            if factor.cls not in seen:
                seen.append(factor.cls)
        else:
            for part in factor.parts:
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
    kind: MemberKind = "parameter"

    @property
    def dim_size(self) -> int:
        return layout_size(self.layout)

    def indices(self, units: Iterable[int]) -> list[int]:
        """Indices along ``dim`` covered by ``units`` (sorted, unique)."""
        units = np.asarray(sorted(set(int(u) for u in units)), dtype=np.int64)
        if len(units) == 0:
            return []
        mask = np.zeros(self.dim_size, dtype=bool)
        for arr in cached_coords(self.layout).get(self.class_id, ()):
            mask |= np.isin(arr, units)
        return np.nonzero(mask)[0].tolist()

    @property
    def unit_width(self) -> int:
        """How many indices of this dimension one unit covers."""
        return len(self.indices([0]))


@dataclasses.dataclass(frozen=True)
class Group:
    """A set of coupled channels: removing unit ``u`` removes ``m.indices([u])`` from every member.

    ``exact`` is True when removing units gives the same function as zeroing the parameter slices
    they cover (so ``verify`` can check the rewrite bit for bit).
    """

    id: str
    kind: GroupKind
    size: int
    exact: bool
    members: tuple[Member, ...]
    class_id: int
    inexact_reasons: tuple[str, ...] = ()
    block: str | None = None  # the module path of the repeated block it lives in, if any

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "inexact_reasons", tuple(self.inexact_reasons))

    @property
    def params(self) -> list[Member]:
        return [m for m in self.members if m.kind == "parameter"]

    @property
    def param_names(self) -> list[str]:
        return sorted({m.name for m in self.params})

    def params_per_unit(self, numel: Mapping[str, int]) -> int:
        """Parameters removed per unit, in isolation (for planning against a parameter budget)."""
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


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """An op the analysis has no rule for; it froze every dimension the op touches."""

    node: str
    op: str
    source: str
    why: str = "no rule"

    def __str__(self) -> str:
        return f"{self.node} ({self.op}) at {self.source}"


@dataclasses.dataclass(frozen=True)
class FrozenClass:
    """A coupled space that cannot be pruned, with the first reason found."""

    class_id: int
    size: int
    reason: str
    members: tuple[Member, ...]


def source_location(node: Any) -> str:
    """The user's source line that produced a graph node, as 'file:line in fn'.

    The last frame of the node's stack trace outside torch itself is the user's (a model's
    ``forward``), so errors and explanations point at the model code, not at torch internals.
    """
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return "<unknown source>"
    user = [ln for ln in lines if not _is_torch_frame(ln)]
    last = (user or lines)[-1]
    # 'File "/path/x.py", line 12, in forward'
    try:
        path = last.split('"')[1]
        rest = last.split('"', 2)[2]
        line = rest.split("line")[1].split(",")[0].strip()
        fn = rest.split(" in ")[-1].strip()
        if "site-packages/" in path:  # installed libraries: the package-relative path is enough
            path = path.split("site-packages/", 1)[1]
        return f"{path}:{line} in {fn}"
    except IndexError:
        return last


@functools.lru_cache(maxsize=1)
def _torch_dir() -> str:
    import os

    import torch

    return os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _is_torch_frame(line: str) -> bool:
    """A frame inside torch itself (export, fx, nn.Module.__call__), not the model's code."""
    return _torch_dir() in line


class PrunableGraph:
    """What capture produces and every later pass reads: an ExportedProgram plus bookkeeping.

    It is a plain record: the analysis does not write into it (it returns an
    :class:`~fxprune.passes.analysis.Analysis`), and neither does any later pass.

    Attributes:
        exported_program: the ATen-level ``torch.export.ExportedProgram`` (HOPs inlined).
        module: the user's module the graph was traced from (never modified by fxprune).
        example_args / example_kwargs: the tensors used for tracing (their real values, kept so
            ``rewrite`` can verify on them).
        constant_kwargs: non-tensor keyword arguments frozen into the trace (e.g. use_cache=False).
        dynamic_shapes: the spec passed to torch.export.
        aliases: parameter FQN -> every FQN that shares the same tensor (tied weights).
        on_meta: traced on the meta device (no weights).
        timings: seconds per capture step.
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
        self.example_args = tuple(example_args)
        self.example_kwargs = dict(example_kwargs)
        self.constant_kwargs = dict(constant_kwargs)
        self.dynamic_shapes = dynamic_shapes
        self.aliases = {k: list(v) for k, v in aliases.items()}
        self.on_meta = on_meta
        self.timings = dict(timings or {})

    def graph_module(self):
        """The exported program as a runnable (unlifted) GraphModule."""
        return self.exported_program.module()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = {**kwargs, **self.constant_kwargs}
        return self.graph_module()(*args, **kwargs)

    @property
    def num_nodes(self) -> int:
        return len(self.exported_program.graph.nodes)

    @functools.cached_property
    def param_of(self) -> dict[str, str]:
        """Placeholder node name -> parameter FQN."""
        return dict(self.exported_program.graph_signature.inputs_to_parameters)

    @functools.cached_property
    def buffer_of(self) -> dict[str, str]:
        """Placeholder node name -> buffer FQN."""
        return dict(self.exported_program.graph_signature.inputs_to_buffers)

    def canonical(self, fqn: str) -> str:
        """The first name of a (possibly tied) tensor."""
        return self.aliases.get(fqn, [fqn])[0]

    def __repr__(self) -> str:
        return f"PrunableGraph(nodes={self.num_nodes}, module={type(self.module).__name__}, on_meta={self.on_meta})"
