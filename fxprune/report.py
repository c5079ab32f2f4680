"""Human-facing views of an analysis: the group table and a GraphML export."""

from __future__ import annotations

import os
import tempfile
from typing import Any


def group_table(graph: Any, max_rows: int | None = 60) -> str:
    groups = graph.groups or []
    rows = [("id", "kind", "units", "exact", "members", "shrinks")]
    for g in groups[: max_rows or None]:
        params = g.param_names
        shrink = ", ".join(p.rsplit(".", 2)[-2] if p.count(".") >= 1 else p for p in params[:4])
        if len(params) > 4:
            shrink += f", +{len(params) - 4}"
        rows.append((g.id, g.kind, str(g.size), "yes" if g.exact else "no", str(len(g.members)), shrink))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if max_rows and len(groups) > max_rows:
        lines.append(f"... {len(groups) - max_rows} more groups")
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    lines.append(
        f"{len(groups)} groups ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
        f"{sum(g.exact for g in groups)} exact; {len(graph.frozen)} frozen spaces; "
        f"{len(graph.unsupported)} ops without a rule"
    )
    for u in graph.unsupported[:10]:
        lines.append(f"  unsupported: {u}")
    return "\n".join(lines)


def write_graphml(graph: Any, path: str) -> str:
    """Bipartite graph: group nodes linked to the parameters they shrink (string attributes)."""
    import networkx as nx

    g = nx.Graph()
    for grp in graph.groups or []:
        g.add_node(grp.id, type="group", kind=grp.kind, units=str(grp.size), exact=str(grp.exact))
        for m in grp.members:
            pid = f"{m.name}"
            if not g.has_node(pid):
                g.add_node(pid, type=m.kind, kind="tensor", units="", exact="")
            g.add_edge(grp.id, pid, dim=str(m.dim), unit_width=str(m.unit_width))
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".graphml.tmp")
    os.close(fd)
    try:
        nx.write_graphml(g, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
