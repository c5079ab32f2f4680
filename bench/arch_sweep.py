"""Supported-architecture table: trace, analyse and prune every zoo model; compare with zeroing.

    python bench/arch_sweep.py [NAME ...]     # rows merge into bench/results/arch_sweep.json

For each exportable model of tests/zoo.py (ZOO and HEAVY): trace + analyse, then remove a seeded
random third of the units of every exact group at once and check the pruned model against the
original with those units zeroed. Prints a markdown table, writes bench/results/arch_sweep.json and regenerates
the supported-architecture table in README.md.
"""

from __future__ import annotations

import collections
import json
import os
import random
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fxprune  # noqa: E402
from tests import zoo  # noqa: E402


def sweep_one(name: str) -> dict:
    zm = zoo.get(name)
    t0 = time.perf_counter()
    model = zm.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = fxprune.trace(model, kwargs=zm.make_inputs(2, 8))
        groups = fxprune.analyze(graph)
        rng = random.Random(0)
        plan = {g.id: sorted(rng.sample(range(g.size), max(1, g.size // 3))) for g in groups if g.exact}
        row = {
            "model": name, "family": zm.family, "class": type(model).__name__,
            "groups": len(groups), "exact": sum(g.exact for g in groups),
            "kinds": dict(collections.Counter(g.kind for g in groups)),
            "unsupported": sorted({u.op for u in groups.unsupported}),
        }
        try:
            res = fxprune.rewrite(model, groups, plan)
            pruned = res.model
            before = sum(p.numel() for p in model.parameters())
            after = sum(p.numel() for p in pruned.parameters()) if isinstance(pruned, torch.nn.Module) else None
            row.update(
                verified=True, max_abs_diff=res.verification.max_abs_diff,
                returned="graph" if isinstance(pruned, torch.fx.GraphModule) else "module",
                params_kept=(after / before) if after else None,
            )
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row.update(verified=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


RESULTS = "bench/results/arch_sweep.json"
HEADER = ("| model | class | family | groups (exact) | kinds | exact groups pruned = zeroed | returned |\n"
          "|---|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(r["kinds"].items()))
    ok = f"yes (max diff {r['max_abs_diff']:.0e})" if r.get("verified") else f"NO: {r.get('error')}"
    return f"| {r['model']} | {r['class']} | {r['family']} | {r['groups']} ({r['exact']}) | {kinds} | {ok} | {r.get('returned', '-')} |"


def replace_readme_section(name: str, text: str, path: str = "README.md") -> None:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in the README."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = open(path).read()
    if start not in doc or end not in doc:
        return
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{head}{start}\n{text}\n{end}{tail}")
    os.replace(tmp, path)


def update_readme(rows: list[dict], path: str = "README.md") -> None:
    """Replace the table between the arch-table markers in the README."""
    replace_readme_section("arch-table", "\n".join([HEADER, *(table_row(r) for r in rows)]), path)


def main(names: list[str]) -> None:
    """Sweep the named models (default: all exportable ones); rows merge into the results file."""
    torch.set_num_threads(1)
    names = names or [k for k, v in zoo.ZOO.items() if getattr(v, "exportable", True)] + list(zoo.HEAVY)
    previous = {}
    if os.path.exists(RESULTS):
        previous = {r["model"]: r for r in json.load(open(RESULTS))}
    print(HEADER)
    for name in names:
        r = sweep_one(name)
        previous[name] = r
        print(table_row(r), flush=True)
    order = list(zoo.ZOO) + list(zoo.HEAVY)
    rows = sorted(previous.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else 999)
    os.makedirs("bench/results", exist_ok=True)
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)
    update_readme(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
