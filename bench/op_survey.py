"""Survey the ATen ops that appear in exported zoo models.

For every exportable model in ``tests.zoo`` this exports (non-strict, dynamic
batch/seq dims, traced at batch=2 seq=8), runs ``run_decompositions({})`` and
records the sorted set of ``str(node.target)`` of the ``call_function`` nodes of
the top-level graph (ops inside nested subgraphs of higher-order ops, if any,
are reported separately under ``nested_ops``).

Writes ``bench/results/op_survey.json`` and prints a table.

    python3 bench/op_survey.py                 # all exportable zoo models
    python3 bench/op_survey.py llama_gqa gpt2  # a subset
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402

from tests import zoo  # noqa: E402


def _graph_ops(gm: torch.fx.GraphModule) -> tuple[collections.Counter, collections.Counter]:
    """(top-level call_function target counts, nested-subgraph call_function target counts)."""
    top = collections.Counter()
    nested = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            top[str(node.target)] += 1
    for name, sub in gm.named_modules():
        if name and isinstance(sub, torch.fx.GraphModule):
            for node in sub.graph.nodes:
                if node.op == "call_function":
                    nested[str(node.target)] += 1
    return top, nested


def survey(names: list[str]) -> dict:
    models: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name in names:
        zm = zoo.get(name)
        t0 = time.perf_counter()
        try:
            ep = zoo.export_model(zm, batch=2, seq=8)  # includes run_decompositions({})
        except Exception as e:  # pragma: no cover - reported, not fatal
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            traceback.print_exc(limit=2)
            continue
        dt = time.perf_counter() - t0
        top, nested = _graph_ops(ep.graph_module)
        models[name] = {
            "family": zm.family,
            "export_s": round(dt, 2),
            "num_nodes": len(ep.graph.nodes),
            "num_call_function": sum(top.values()),
            "ops": sorted(top),
            "op_counts": dict(sorted(top.items())),
            "nested_ops": dict(sorted(nested.items())),
        }
        print(f"[{len(models) + len(failed):2d}/{len(names)}] {name:24s} {dt:5.1f}s  {len(top):3d} ops", flush=True)

    union_models = collections.Counter()
    union_nodes = collections.Counter()
    for rec in models.values():
        for op, c in rec["op_counts"].items():
            union_models[op] += 1
            union_nodes[op] += c
    union = {
        op: {"models": union_models[op], "nodes": union_nodes[op], "used_by": sorted(n for n in models if op in models[n]["op_counts"])}
        for op in sorted(union_models, key=lambda o: (-union_models[o], o))
    }
    return {
        "meta": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "trace_batch": 2,
            "trace_seq": 8,
            "decompositions": "run_decompositions({})",
        },
        "models": models,
        "failed": failed,
        "not_exportable": sorted(n for n, z in zoo.ZOO.items() if not z.exportable),
        "union": union,
    }


def print_table(res: dict) -> None:
    models = res["models"]
    print()
    print("=" * 100)
    print("Per-model ops (sorted set of call_function targets after run_decompositions({}))")
    print("=" * 100)
    for name, rec in models.items():
        print(f"\n{name}  [{rec['family']}]  nodes={rec['num_nodes']}  call_function={rec['num_call_function']}  export={rec['export_s']}s")
        for op in rec["ops"]:
            print(f"    {rec['op_counts'][op]:4d}  {op}")
        if rec["nested_ops"]:
            print("  nested subgraph ops:", ", ".join(rec["nested_ops"]))
    print()
    print("=" * 100)
    print(f"Union over {len(models)} models: {len(res['union'])} distinct targets")
    print("=" * 100)
    print(f"{'op':58s} {'#models':>8s} {'#nodes':>8s}")
    for op, u in res["union"].items():
        print(f"{op:58s} {u['models']:8d} {u['nodes']:8d}")
    if res["failed"]:
        print("\nFAILED:")
        for n, err in res["failed"].items():
            print(f"  {n}: {err}")
    if res["not_exportable"]:
        print("\nskipped (exportable=False):", ", ".join(res["not_exportable"]))


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)  # tiny models: threading only adds overhead
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="zoo model names (default: all exportable)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "op_survey.json"))
    args = ap.parse_args(argv)
    names = args.models or zoo.names(exportable=True)
    t0 = time.perf_counter()
    res = survey(names)
    res["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, args.out)
    print_table(res)
    print(f"\nwrote {os.path.relpath(args.out, os.getcwd())} in {res['meta']['total_s']}s")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
