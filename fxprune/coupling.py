"""The coupling graph: why two parameters are coupled, and why a space is frozen.

The analysis runs a union-find over *atoms* (index spaces, see ``passes/atoms.py``) because that
is fast on 70B graphs.  It also records every step it takes, with the op that took it:

* a **tie** edge: two index spaces became one (a rule said so: ``linear`` ties its input's
  feature dim to the weight's in-dim, ``add`` ties both operands' dims...);
* a **split** edge: a space is a factor or a segment of a larger one (``view [b,s,4096] ->
  [b,s,32,128]`` splits 4096 into heads and head_dim; a ``slice`` carves a segment);
* a **freeze**: a space must not be pruned, with the op (or graph output, or ``ignore=``) that
  said so.

:func:`coupling_graph` turns that record into a ``networkx.MultiGraph`` whose nodes are atoms
(with the tensor, dim and size they were made for) and whose edges carry the FX node, the ATen
op and the user's source line.  It is built on first use, from the same union-find run.

Two parameters are coupled when their dims share a *leaf class* (the unit of pruning).  The
explanation is a shortest path between their atoms through atoms that all carry that class, so
it never wanders into a sibling space (heads vs head_dim of the same projection).
"""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING, Any, Iterable

from fxprune.graph import layout_classes
from fxprune.types import TensorRef
from fxprune.util.publish import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from fxprune.passes.analysis import Analysis

MAX_STEPS = 40


def _prov(analysis: "Analysis"):
    prov = analysis.provenance
    if prov is None:
        raise ValueError("this Analysis carries no provenance (it was not produced by fxprune.analyze)")
    return prov


def _parts(analysis: "Analysis") -> dict[int, tuple[int, int]]:
    """Sub-space -> (the space it was split from, its position among the parts)."""
    cached = analysis.__dict__.get("_coupling_parts")
    if cached is None:
        cached, count = {}, collections.Counter()
        for e in _prov(analysis).store.edges:
            if e.how == "split":
                if e.b not in cached:
                    cached[e.b] = (e.a, count[e.a])
                count[e.a] += 1
        analysis.__dict__["_coupling_parts"] = cached
    return cached


def _label(analysis: "Analysis", atom: int, depth: int = 0) -> str:
    """``tensor[dim]`` for an atom made for a tensor dim; ``tensor[dim]#k`` for its k-th part."""
    prov = _prov(analysis)
    origin = prov.origin.get(atom)
    if origin is not None:
        ref, dim = origin
        return f"{prov.tensor_names.get(ref.node, str(ref))}[{dim}]"
    part = _parts(analysis).get(atom)
    if part is None or depth > 8:
        return f"space a{atom}"
    size = prov.store.size[prov.store.find(atom)]
    return f"{_label(analysis, part[0], depth + 1)}#{part[1]}({size})"


def coupling_graph(analysis: "Analysis") -> Any:
    """A ``networkx.MultiGraph`` of index spaces; cached on the analysis.

    Node attributes: ``tensor`` (parameter FQN or graph node), ``dim``, ``size``, ``cls`` (the
    union-find class), ``group`` (id of the group whose units it carries, for a leaf class) and
    ``frozen`` (reason, for a frozen leaf class).  Edge attributes: ``how`` ("tie" or "split"),
    ``parent`` (for a split, the atom that was split), ``node``, ``op``, ``source``.
    """
    cached = analysis.__dict__.get("_coupling_graph")
    if cached is not None:
        return cached
    import networkx as nx

    prov = _prov(analysis)
    store = prov.store
    frozen_by_class = {f.class_id: f.reason for f in analysis.frozen}
    g = nx.MultiGraph()
    for atom in range(len(store.parent)):
        origin = prov.origin.get(atom)
        root = store.find(atom)
        tensor, dim = ("", -1)
        if origin is not None:
            tensor = prov.tensor_names.get(origin[0].node, str(origin[0]))
            dim = origin[1]
        size = store.size[root]
        leaf = root not in store.split
        g.add_node(
            atom, tensor=tensor, dim=dim, size=size if isinstance(size, int) else -1, cls=root,
            group=analysis.class_to_group.get(root) if leaf else None,
            frozen=frozen_by_class.get(root) if leaf else None,
        )
    for e in store.edges:
        site = e.site
        g.add_edge(e.a, e.b, how=e.how, parent=e.a if e.how == "split" else -1, node=site.node if site else "",
                   op=site.op if site else "", source=site.source if site else "")
    analysis.__dict__["_coupling_graph"] = g
    return g


class _Carriers:
    """Which atoms carry a leaf class (their layout contains it), cached."""

    def __init__(self, analysis: "Analysis") -> None:
        self.store = _prov(analysis).store
        self.cache: dict[int, frozenset[int]] = {}

    def classes(self, atom: int) -> frozenset[int]:
        root = self.store.find(atom)
        if root not in self.cache:
            self.cache[root] = frozenset(layout_classes(self.store.layout([root])))
        return self.cache[root]


def _resolve(analysis: "Analysis", target: str) -> list[tuple[str, int, int]]:
    """``(label, atom, class)`` triples for a group id, ``param`` or ``param:dim``."""
    prov = _prov(analysis)
    carriers = _Carriers(analysis)
    if target in analysis.by_id:
        group = analysis.by_id[target]
        out = []
        for m in group.params:
            for atom in prov.dims.get(TensorRef(m.node), [[]] * (m.dim + 1))[m.dim]:
                if group.class_id in carriers.classes(atom):
                    out.append((f"{m.name}[{m.dim}]", atom, group.class_id))
        return out
    name, dim = target, None
    if ":" in target and target.rsplit(":", 1)[1].isdigit():
        name, d = target.rsplit(":", 1)
        dim = int(d)
    names = analysis.graph.aliases.get(name, [name])
    nodes = [n for n, fqn in prov.tensor_names.items() if fqn in names]
    if not nodes:
        raise KeyError(_unknown(analysis, target))
    out = []
    for node in nodes:
        dims = prov.dims.get(TensorRef(node), [])
        for d, atoms in enumerate(dims):
            if dim is not None and d != dim:
                continue
            for atom in atoms:
                for c in sorted(carriers.classes(atom)):
                    out.append((f"{name}[{d}]", atom, c))
        if out:
            break
    if dim is not None and not out:
        raise KeyError(f"{name} has no dim {dim} with an index space (size-1 dims carry none)")
    return out


def _unknown(analysis: "Analysis", target: str) -> str:
    names = sorted(set(_prov(analysis).tensor_names.values()) | set(analysis.by_id))
    key = target.split(":")[0].rsplit(".", 1)[-1]
    close = [n for n in names if key and key in n][:6]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{target!r} is neither a group id nor a parameter/buffer of the traced model{hint}"


def _path(analysis: "Analysis", sources: Iterable[int], targets: set[int], cls: int) -> list[tuple[int, dict, int]] | None:
    """Shortest path of (atom, edge data, next atom) steps through atoms that carry ``cls``."""
    graph = coupling_graph(analysis)
    carriers = _Carriers(analysis)
    prev: dict[int, tuple[int, dict] | None] = {}
    queue: collections.deque[int] = collections.deque()
    for s in sources:
        if s not in prev:
            prev[s] = None
            queue.append(s)
    found = None
    while queue:
        a = queue.popleft()
        if a in targets:
            found = a
            break
        for b, edges in graph[a].items():
            if b in prev or cls not in carriers.classes(b):
                continue
            prev[b] = (a, next(iter(edges.values())))
            queue.append(b)
    if found is None:
        return None
    steps = []
    node = found
    while prev[node] is not None:
        a, data = prev[node]
        steps.append((a, data, node))
        node = a
    return list(reversed(steps))


def _format_steps(analysis: "Analysis", steps: list[tuple[int, dict, int]]) -> list[str]:
    lines = []
    shown = steps if len(steps) <= MAX_STEPS else steps[: MAX_STEPS // 2] + [None] + steps[-MAX_STEPS // 2 :]
    for step in shown:
        if step is None:
            lines.append(f"    ... {len(steps) - MAX_STEPS} more steps ...")
            continue
        a, data, b = step
        if data["how"] == "split":
            verb = "splits into" if data.get("parent") == a else "is a part of"
        else:
            verb = "is tied to"
        where = f"{data['op']} at node {data['node']}" if data["node"] else "the analysis"
        lines.append(f"    {_label(analysis, a)} {verb} {_label(analysis, b)}  [{where}; {data['source']}]")
    return lines


def _describe_class(analysis: "Analysis", cls: int) -> str:
    gid = analysis.class_to_group.get(cls)
    if gid is not None:
        g = analysis.by_id[gid]
        exact = "exact" if g.exact else f"inexact ({'; '.join(g.inexact_reasons[:2])})"
        return f"group {gid} ({g.kind}, {g.size} units, {exact})"
    for f in analysis.frozen:
        if f.class_id == cls:
            return f"a frozen space of {f.size} units ({f.reason})"
    return f"space {cls}"


def why(analysis: "Analysis", a: str, b: str) -> str:
    """Why ``a`` and ``b`` (group ids, ``param`` or ``param:dim``) are coupled: a chain of ops."""
    sa, sb = _resolve(analysis, a), _resolve(analysis, b)
    shared = sorted({c for _, _, c in sa} & {c for _, _, c in sb})
    if not shared:
        ca = sorted({_describe_class(analysis, c) for _, _, c in sa})
        cb = sorted({_describe_class(analysis, c) for _, _, c in sb})
        return (f"{a} and {b} are not coupled: they share no unit of pruning.\n"
                f"  {a}: {'; '.join(ca) or 'no index space'}\n  {b}: {'; '.join(cb) or 'no index space'}")
    lines = []
    for c in shared:
        src = [atom for _, atom, cc in sa if cc == c]
        dst = {atom for _, atom, cc in sb if cc == c}
        steps = _path(analysis, src, dst, c)
        la = next(lbl for lbl, atom, cc in sa if cc == c)
        lb = next(lbl for lbl, atom, cc in sb if cc == c)
        lines.append(f"{la} and {lb} share the units of {_describe_class(analysis, c)}:")
        if steps is None:
            lines.append("    (the same tensor)")
        elif not steps:
            lines.append("    (the same index space)")
        else:
            lines.extend(_format_steps(analysis, steps))
    return "\n".join(lines)


def explain(analysis: "Analysis", target: str) -> str:
    """What ``target`` (a group id, ``param`` or ``param:dim``) is, and why it is frozen if it is."""
    if target in analysis.by_id:
        g = analysis.by_id[target]
        lines = [f"{target}: {_describe_class(analysis, g.class_id)}"]
        if g.block:
            lines.append(f"  block: {g.block}")
        lines.append(f"  members ({len(g.members)}):")
        for m in g.members[:24]:
            lines.append(f"    {m.name or m.node} dim {m.dim}: {m.unit_width} of {m.dim_size} indices per unit ({m.kind})")
        if len(g.members) > 24:
            lines.append(f"    ... {len(g.members) - 24} more")
        return "\n".join(lines)
    spaces = _resolve(analysis, target)
    if not spaces:
        return f"{target}: no dim of size > 1, nothing to prune"
    store = _prov(analysis).store
    frozen_classes = {f.class_id for f in analysis.frozen}
    lines = []
    for label, atom, cls in spaces:
        desc = _describe_class(analysis, cls)
        lines.append(f"{label}: {desc}")
        if cls in frozen_classes or cls not in analysis.class_to_group:
            freeze = store.freeze_of(cls)
            if freeze is None:
                continue
            where = str(freeze.site) if freeze.site else "the analysis"
            lines.append(f"  frozen by {where}: {freeze.reason}")
            steps = _path(analysis, [atom], {freeze.atom}, cls)
            if steps:
                lines.append(f"  how {label} reaches it:")
                lines.extend(_format_steps(analysis, steps))
    return "\n".join(lines)


def write_graphml(analysis: "Analysis", path: str | os.PathLike) -> str:
    """The coupling graph plus one ``type="group"`` node per group, as GraphML (string attributes)."""
    import io

    import networkx as nx

    base = coupling_graph(analysis)
    g = nx.MultiGraph()
    for n, d in base.nodes(data=True):
        g.add_node(f"a{n}", type="space", label=_label(analysis, n),
                   **{k: "" if v is None else str(v) for k, v in d.items()})
    for a, b, d in base.edges(data=True):
        g.add_edge(f"a{a}", f"a{b}", **{k: str(v) for k, v in d.items()})
    prov = _prov(analysis)
    for grp in analysis.groups:
        g.add_node(grp.id, type="group", label=grp.id, kind=grp.kind, units=str(grp.size), exact=str(grp.exact))
        for m in grp.params:
            for atom in prov.dims.get(TensorRef(m.node), [[]] * (m.dim + 1))[m.dim]:
                g.add_edge(grp.id, f"a{atom}", how="member", node="", op="", source=f"{m.name} dim {m.dim}")
    buf = io.BytesIO()
    nx.write_graphml(g, buf)
    atomic_write_text(path, buf.getvalue().decode("utf-8"))
    return os.fspath(path)
