"""Op-coverage report: which ops froze which spaces, and how many parameters that costs.

Freezing is safe but every freeze a rule could lift is a lost capability.  This report lists,
for one :class:`~fxprune.passes.analysis.Analysis`, every place that froze a space holding
parameters (an ATen op without a rule or with a conservative one, a graph input or output, an
unread parameter, a user ``ignore=``), grouped by op and source line, with

* the spaces (leaf classes) it froze, with a parameter dim of each as an example;
* ``params``: the parameter elements those spaces hold (an element with a coordinate on one of
  them; counted once however many of the site's spaces index it);
* ``only_here``: the part of it that no other site froze as well, i.e. what a new rule for this
  op alone would unlock;
* ``unprunable``: the part of ``params`` that no group can shrink either (an element a group
  still removes is not lost).  A frozen factor of a product with prunable factors (the q/k/v
  selector of a fused projection, the real/imaginary pair of complex RoPE) holds many elements
  but makes few unprunable.

Rows are sorted by ``params``, so the next rule to write is the first row.  It reads the
provenance the analysis keeps (every freeze with its :class:`~fxprune.passes.atoms.Site`),
never re-runs anything.

    report = analysis.coverage()    # or fxprune.coverage_report.coverage(analysis)
    print(report.table())
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np

from fxprune.graph import cached_coords, layout_size

__all__ = ["FrozenSpace", "FreezeSite", "CoverageReport", "coverage"]


@dataclasses.dataclass(frozen=True)
class FrozenSpace:
    """A frozen leaf class: its id, units, and the parameter dims (``name[dim]``) it indexes."""

    class_id: int
    size: int
    members: tuple[str, ...]

    def __str__(self) -> str:
        more = f" +{len(self.members) - 1}" if len(self.members) > 1 else ""
        return f"{self.members[0]}{more} ({self.size})" if self.members else f"space {self.class_id} ({self.size})"


@dataclasses.dataclass(frozen=True)
class FreezeSite:
    """One op (at one source line) and everything it froze."""

    op: str
    source: str
    nodes: tuple[str, ...]
    reasons: tuple[str, ...]
    spaces: tuple[FrozenSpace, ...]
    params: int
    only_here: int
    unprunable: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op, "source": self.source, "nodes": list(self.nodes), "reasons": list(self.reasons),
            "params": self.params, "only_here": self.only_here, "unprunable": self.unprunable,
            "spaces": [{"class": s.class_id, "size": s.size, "members": list(s.members)} for s in self.spaces],
        }


@dataclasses.dataclass(frozen=True)
class CoverageReport:
    """Every site that froze a space holding parameters, most costly first."""

    model: str
    total_params: int
    frozen_params: int  # parameter elements held by a frozen space
    unprunable_params: int  # of those, the ones no group can shrink either
    rows: tuple[FreezeSite, ...]
    free_sites: int  # sites that froze only spaces without parameters (positions, batch)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def by_op(self) -> dict[str, int]:
        """Parameter elements frozen per op (over all its source lines)."""
        out: dict[str, int] = collections.Counter()
        for r in self.rows:
            out[r.op] += r.params
        return dict(out)

    def table(self, max_rows: int | None = 30) -> str:
        """A plain-text table: params, % of the model, only-here, op, source, spaces, reason."""
        head = ("params", "%", "only here", "unprunable", "op", "nodes", "source", "spaces frozen", "reason")
        rows = [head]
        for r in self.rows[: max_rows or None]:
            pct = 100.0 * r.params / self.total_params if self.total_params else 0.0
            spaces = ", ".join(str(s) for s in r.spaces[:2]) + (f", +{len(r.spaces) - 2}" if len(r.spaces) > 2 else "")
            reason = r.reasons[0] if r.reasons else ""
            rows.append((f"{r.params:,}", f"{pct:.1f}", f"{r.only_here:,}", f"{r.unprunable:,}", r.op,
                         str(len(r.nodes)), r.source,
                         f"{len(r.spaces)}: {spaces}", reason[:80]))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if max_rows and len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more sites")
        pct = 100.0 * self.frozen_params / self.total_params if self.total_params else 0.0
        lines.append(f"{self.model}: {self.frozen_params:,} of {self.total_params:,} parameters ({pct:.1f}%) lie in "
                     f"frozen spaces ({self.unprunable_params:,} in no group either), frozen at {len(self.rows)} "
                     f"sites (+{self.free_sites} that froze only spaces without parameters)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "total_params": self.total_params, "frozen_params": self.frozen_params,
                "unprunable_params": self.unprunable_params, "free_sites": self.free_sites,
                "rows": [r.as_dict() for r in self.rows]}


def coverage(analysis: Any) -> CoverageReport:
    """The op-coverage report of an analysis (see the module docstring)."""
    prov = analysis.provenance
    if prov is None:
        raise ValueError("this Analysis carries no provenance; run fxprune.analyze again")
    store = prov.store
    frozen = {f.class_id: f for f in analysis.frozen}
    params = _param_layouts(analysis)
    total = sum(int(np.prod([layout_size(lay) for lay in lays])) for lays in params.values())
    groups = {g.class_id for g in analysis.groups}

    # every freeze, by site: the leaf classes it covers
    by_site: dict[tuple[str, str], dict[str, Any]] = {}
    classes_of_site: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    sites_of_class: dict[int, set[tuple[str, str]]] = collections.defaultdict(set)
    for fr in store.freeze_log:
        site = fr.site
        op, source, node = ("analysis", "<unknown>", "") if site is None else (site.op, site.source, site.node)
        key = (op, source)
        entry = by_site.setdefault(key, {"nodes": [], "reasons": []})
        if node and node not in entry["nodes"]:
            entry["nodes"].append(node)
        if fr.reason not in entry["reasons"] and len(entry["reasons"]) < 4:
            entry["reasons"].append(fr.reason)
        for leaf in store.leaves(fr.atom):
            if leaf in frozen:
                classes_of_site[key].add(leaf)
                sites_of_class[leaf].add(key)

    param_dims = _param_dims_by_class(frozen.values(), analysis.graph.canonical)
    all_frozen = {c for c in frozen if param_dims.get(c)}
    rows: list[FreezeSite] = []
    free = 0
    for key, entry in by_site.items():
        classes = {c for c in classes_of_site.get(key, ()) if param_dims.get(c)}
        if not classes:
            free += 1
            continue
        sole = {c for c in classes if sites_of_class[c] == {key}}
        spaces = tuple(
            FrozenSpace(c, frozen[c].size, tuple(f"{n}[{d}]" for n, d, _ in param_dims[c]))
            for c in sorted(classes, key=lambda c: (-frozen[c].size, c))
        )
        rows.append(FreezeSite(key[0], key[1], tuple(entry["nodes"]), tuple(entry["reasons"]), spaces,
                               _held(params, classes, set()), _held(params, sole, all_frozen - sole),
                               _held(params, classes, groups)))
    rows.sort(key=lambda r: (-r.params, -r.only_here, r.op, r.source))
    model = type(analysis.graph.module).__name__
    return CoverageReport(model, total, _held(params, all_frozen, set()), _held(params, all_frozen, groups),
                          tuple(rows), free)


def _param_layouts(analysis: Any) -> dict[str, tuple]:
    """Parameter FQN (canonical name of tied ones) -> layout per dim."""
    graph = analysis.graph
    out: dict[str, tuple] = {}
    for fqn in graph.param_of.values():
        lays = analysis.param_layouts.get(fqn)
        if lays is not None and all(lay is not None for lay in lays):
            out.setdefault(graph.canonical(fqn), lays)
    return out


def _param_dims_by_class(frozen: Iterable[Any], canonical: Any) -> dict[int, list[tuple[str, int, Any]]]:
    """Frozen class -> the (parameter, dim, layout) it indexes (buffers do not count)."""
    out: dict[int, list[tuple[str, int, Any]]] = collections.defaultdict(list)
    for f in frozen:
        seen = set()
        for m in f.members:
            name = canonical(m.name)
            if m.kind == "parameter" and (name, m.dim) not in seen:
                seen.add((name, m.dim))
                out[f.class_id].append((name, m.dim, m.layout))
    return out


def _covered(layout: Any, classes: set[int]) -> np.ndarray:
    """Indices of a dim with a coordinate on any of ``classes``."""
    mask = np.zeros(layout_size(layout), dtype=bool)
    for c, arrays in cached_coords(layout).items():
        if c in classes:
            for arr in arrays:
                mask |= arr >= 0
    return mask


def _held(params: Mapping[str, tuple], classes: set[int], excluded: set[int]) -> int:
    """Parameter elements that have a coordinate on one of ``classes`` and on none of ``excluded``,
    each counted once."""
    if not classes:
        return 0
    total = 0
    for lays in params.values():
        free, hit = 1, 1  # elements with no excluded coordinate; of those, with none on classes
        for lay in lays:
            ex = _covered(lay, excluded)
            on = _covered(lay, classes) & ~ex
            free *= int((~ex).sum())
            hit *= int((~ex).sum() - on.sum())
        total += free - hit
    return total
