"""Cost of ``fxprune.trace`` + ``fxprune.analyze`` on 7B/70B-shaped Llamas, vs. a bare torch.export.

Why: analysis must scale to real LLM sizes without weights.  Each model is built on the
``meta`` device (``fxprune.meta_model``), so no weight is ever materialised, and traced with
``input_ids`` of shape (2, 16) on meta.  Targets:

* the time fxprune adds on top of a bare export -- lowering (``run_decompositions({})``) plus
  analysis -- is at most 2x the bare ``torch.export.export`` time:
  ``(lower + analyze) / bare_export <= 2``  (the stricter reading ``analyze / bare <= 2`` and
  the looser ``(trace + analyze) / bare <= 3`` are reported too);
* peak RSS (``ru_maxrss``) < 2 GB, and every parameter is still on ``meta`` afterwards.

Each model runs in a fresh subprocess (``--one NAME``) so RSS peaks cannot mix.  In that
process, in this order:

1. warm-up on a tiny 1-layer meta Llama: one bare export, and one ``fxprune.trace`` +
   ``fxprune.analyze`` (imports, first-call caches and rule registration are not timed);
2. bare ``torch.export.export(model, (), {"input_ids": ids, "use_cache": False},
   dynamic_shapes={"input_ids": {0: Dim("batch", 1, 65536), 1: Dim("seq", 1, 131072)},
   "use_cache": None}, strict=False)`` -- the same spec fxprune builds;
3. ``fxprune.trace`` on the same meta model (``g.timings`` splits export / lower);
4. ``fxprune.analyze``.

With ``--profile`` (or automatically when the target is missed), a further subprocess per
profiled model runs cProfile around ``run_decompositions`` and around ``fxprune.analyze``
separately and keeps the top functions by cumulative time.

Usage:  python bench/analyze_scale.py [--models 7b,70b] [--layers N] [--timeout 900] [--profile]
Writes: bench/results/analyze_scale.json (atomically)
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "analyze_scale.json"

TARGET_OVERHEAD = 2.0  # (lower + analyze) / bare export
TARGET_RSS_BYTES = 2 * 10**9  # 2 GB
SHAPE = (2, 16)

MODELS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


# --------------------------------------------------------------------------------------------
# child process: one model
# --------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _build(cfg_kwargs: dict):
    import fxprune
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kwargs)
    model = fxprune.meta_model(LlamaForCausalLM, cfg)
    ids = torch.zeros(SHAPE, dtype=torch.long, device="meta")
    return model, ids


def _bare_export(model, ids):
    import warnings

    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("seq", min=1, max=1 << 17)
    with warnings.catch_warnings():  # fxprune.trace silences warnings too: same work
        warnings.simplefilter("ignore")
        return torch.export.export(
            model, (), {"input_ids": ids, "use_cache": False},
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "use_cache": None},
            strict=False,
        )


def _config_for(name: str, layers: int | None) -> dict:
    cfg = dict(MODELS[name])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def _warm_up() -> float:
    import fxprune

    t0 = time.perf_counter()
    tiny, tiny_ids = _build(TINY)
    _bare_export(tiny, tiny_ids)
    fxprune.analyze(fxprune.trace(tiny, kwargs={"input_ids": tiny_ids}))
    del tiny
    gc.collect()
    return time.perf_counter() - t0


def _one(name: str, layers: int | None) -> dict:
    import fxprune
    import torch

    sys.path.insert(0, str(ROOT))
    rss_start = _rss_bytes()
    load_start = os.getloadavg()
    warm_s = _warm_up()

    cfg = _config_for(name, layers)
    t0 = time.perf_counter()
    model, ids = _build(cfg)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    gc.collect()
    t0 = time.perf_counter()
    ep = _bare_export(model, ids)
    bare_s = time.perf_counter() - t0
    bare_nodes = len(ep.graph.nodes)
    del ep
    gc.collect()

    from torch.export import ExportedProgram

    decomp_calls = []
    original = ExportedProgram.run_decompositions

    def counted(self, *a, **k):  # a counter only: no measurable cost
        decomp_calls.append(1)
        return original(self, *a, **k)

    ExportedProgram.run_decompositions = counted
    t0 = time.perf_counter()
    try:
        g = fxprune.trace(model, kwargs={"input_ids": ids})
    finally:
        ExportedProgram.run_decompositions = original
    trace_s = time.perf_counter() - t0
    gc.collect()

    t0 = time.perf_counter()
    groups = fxprune.analyze(g)
    analyze_s = time.perf_counter() - t0

    # the coupling graph is built on first use from the same union-find run (provenance edges)
    t0 = time.perf_counter()
    cg = groups.coupling_graph()
    coupling_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    last = cfg["num_hidden_layers"] - 1
    why = groups.why(f"model.layers.{last}.self_attn.q_proj.weight:0", f"model.layers.{last}.self_attn.o_proj.weight:1")
    frozen = groups.explain("model.embed_tokens.weight:0")
    explain_s = time.perf_counter() - t0

    params = list(model.parameters())
    buffers = list(model.buffers())
    non_meta = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    non_meta += [n for n, b in model.named_buffers() if b.device.type != "meta"]
    ep_non_meta = [k for k, v in g.exported_program.state_dict.items()
                   if isinstance(v, torch.Tensor) and v.device.type != "meta"]
    # tensors that really hold memory (non-meta), e.g. rotary inv_freq built on CPU
    real_bytes = sum(t.numel() * t.element_size() for t in params + buffers if t.device.type != "meta")

    export_s = g.timings.get("export", float("nan"))
    lower_s = g.timings.get("lower", float("nan"))
    fx_total = export_s + lower_s + analyze_s
    return {
        "model": name,
        "config": cfg,
        "params": n_params,
        "input_shape": list(SHAPE),
        "warmup_s": warm_s,
        "build_s": build_s,
        "bare_export_s": bare_s,
        "bare_export_nodes": bare_nodes,
        "trace_s": trace_s,
        "trace_export_s": export_s,
        "trace_lower_s": lower_s,
        "analyze_s": analyze_s,
        "coupling_graph_s": coupling_s,
        "coupling_graph_nodes": cg.number_of_nodes(),
        "coupling_graph_edges": cg.number_of_edges(),
        "why_and_explain_s": explain_s,
        "why_steps": sum(1 for ln in why.splitlines() if ln.startswith("    ")),
        "explain_frozen_ok": "frozen" in frozen,
        "fxprune_total_s": fx_total,
        # fxprune's "lower" step: run_decompositions({}) or its own cheaper HOP inlining
        "lower_used_run_decompositions": bool(decomp_calls),
        "ratio_total_over_bare": fx_total / bare_s,
        "ratio_analyze_over_bare": analyze_s / bare_s,
        "ratio_lower_analyze_over_bare": (lower_s + analyze_s) / bare_s,
        "ratio_trace_export_over_bare": export_s / bare_s,
        "nodes": g.num_nodes,
        "groups": len(groups),
        "frozen": len(groups.frozen),
        "unsupported": len(groups.unsupported),
        "unsupported_ops": sorted({str(getattr(u, "op", u)) for u in groups.unsupported})[:20],
        "all_params_meta": not non_meta,
        "non_meta_tensors": non_meta[:20],
        "non_meta_state_dict_entries": ep_non_meta[:20],
        "real_tensor_bytes": real_bytes,
        "rss_start_bytes": rss_start,
        "rss_end_bytes": _rss_bytes(),
        "peak_rss_bytes": _peak_rss_bytes(),
        # other work on the machine inflates the absolute seconds (ratios less so)
        "loadavg_1m_start_end": [load_start[0], os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
    }


def _top(prof, n: int, key: str = "cumulative") -> str:
    import pstats

    buf = io.StringIO()
    try:
        stats = pstats.Stats(prof, stream=buf)
    except TypeError:  # nothing was recorded
        return "(not called)"
    stats.strip_dirs().sort_stats(key).print_stats(n)
    text = buf.getvalue()
    # drop pstats' preamble up to the column header
    i = text.find("   ncalls")
    return text[i:].rstrip() if i >= 0 else text.rstrip()


def _profile(name: str, layers: int | None, n: int) -> dict:
    """cProfile around run_decompositions (inside fxprune.trace) and around fxprune.analyze."""
    import cProfile

    import fxprune
    from torch.export import ExportedProgram

    sys.path.insert(0, str(ROOT))
    _warm_up()
    model, ids = _build(_config_for(name, layers))

    lower_prof = cProfile.Profile()
    original = ExportedProgram.run_decompositions

    def profiled(self, *a, **k):
        lower_prof.enable()
        try:
            return original(self, *a, **k)
        finally:
            lower_prof.disable()

    ExportedProgram.run_decompositions = profiled
    try:
        g = fxprune.trace(model, kwargs={"input_ids": ids})
    finally:
        ExportedProgram.run_decompositions = original

    analyze_prof = cProfile.Profile()
    analyze_prof.enable()
    fxprune.analyze(g)
    analyze_prof.disable()
    return {
        "model": name,
        "layers": _config_for(name, layers)["num_hidden_layers"],
        "note": "timings under cProfile are inflated; see the unprofiled run for real numbers",
        "run_decompositions_top": _top(lower_prof, n),
        "analyze_top": _top(analyze_prof, n),
        # the cumulative view of run_decompositions is all wrapper frames; self time shows
        # which leaf functions the time really goes to
        "run_decompositions_top_self": _top(lower_prof, n, "tottime"),
        "analyze_top_self": _top(analyze_prof, n, "tottime"),
    }


# --------------------------------------------------------------------------------------------
# parent process
# --------------------------------------------------------------------------------------------


def _run_child(flag: str, name: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, name]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": name, "timed_out": True, "timeout_s": args.timeout,
                "error": f"{flag} {name} did not finish within {args.timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"model": name, "error": f"{flag} {name} failed (rc {proc.returncode}):\n"
                + proc.stderr[-4000:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["subprocess_wall_s"] = wall
    return row


def _gb(b: float) -> float:
    return b / 1e9


def _table(rows: list[dict]) -> str:
    head = (f"{'model':<6} {'layers':>6} {'bare exp s':>10} {'fx exp s':>9} {'lower s':>8} "
            f"{'analyze s':>9} {'tot/bare':>8} {'an/bare':>8} {'(lo+an)/bare':>12} "
            f"{'peakRSS GB':>10} {'RSS GB':>7} {'nodes':>6} {'groups':>6} {'unsup':>5} {'meta':>5} "
            f"{'coupling s':>10} {'why s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<6} {r['error'].splitlines()[0]}")
            continue
        lines.append(
            f"{r['model']:<6} {r['config']['num_hidden_layers']:>6} {r['bare_export_s']:>10.2f} "
            f"{r['trace_export_s']:>9.2f} {r['trace_lower_s']:>8.2f} {r['analyze_s']:>9.2f} "
            f"{r['ratio_total_over_bare']:>8.2f} {r['ratio_analyze_over_bare']:>8.2f} "
            f"{r['ratio_lower_analyze_over_bare']:>12.2f} {_gb(r['peak_rss_bytes']):>10.2f} "
            f"{_gb(r['rss_end_bytes']):>7.2f} {r['nodes']:>6} {r['groups']:>6} "
            f"{r['unsupported']:>5} {'yes' if r['all_params_meta'] else 'NO':>5} "
            f"{r.get('coupling_graph_s', float('nan')):>10.2f} {r.get('why_and_explain_s', float('nan')):>6.2f}"
        )
    lowered = {r.get("lower_used_run_decompositions") for r in rows if "error" not in r}
    if lowered:
        lines.append("lower = " + " / ".join(
            "run_decompositions({})" if x else "fxprune's grad-mode HOP inlining (no run_decompositions)"
            for x in sorted(lowered)))
    return "\n".join(lines)


def _verdict(r: dict) -> dict:
    if "error" in r:
        return {"time_ok": False, "rss_ok": False, "meta_ok": False, "ok": False}
    time_ok = r["ratio_lower_analyze_over_bare"] <= TARGET_OVERHEAD
    rss_ok = r["peak_rss_bytes"] < TARGET_RSS_BYTES and r["rss_end_bytes"] < TARGET_RSS_BYTES
    meta_ok = r["all_params_meta"]
    return {
        "time_ok": time_ok,
        "time_ok_strict_analyze_only": r["ratio_analyze_over_bare"] <= TARGET_OVERHEAD,
        "time_ok_total_le_3x": r["ratio_total_over_bare"] <= 1 + TARGET_OVERHEAD,
        "rss_ok": rss_ok,
        "meta_ok": meta_ok,
        "ok": time_ok and rss_ok and meta_ok,
    }


def _git_state() -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "fxprune_dirty": bool(git("status", "--porcelain", "--", "fxprune"))}


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="7b,70b", help="comma-separated subset of: 7b,70b")
    parser.add_argument("--layers", type=int, default=None,
                        help="override num_hidden_layers (quick runs, scaling)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per model subprocess (default 900 = 15 min)")
    parser.add_argument("--profile", action="store_true",
                        help="always cProfile (by default only when the time target is missed)")
    parser.add_argument("--profile-model", default="7b", help="model to profile (default 7b)")
    parser.add_argument("--top", type=int, default=15, help="profile rows to keep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--profile-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(_one(args.one, args.layers)))
        return 0
    if args.profile_one:
        print(json.dumps(_profile(args.profile_one, args.layers, args.top)))
        return 0

    names = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")

    print(f"target: (lower + analyze) / bare export <= {TARGET_OVERHEAD:g} "
          f"(fxprune adds at most {TARGET_OVERHEAD:g}x the bare export time); "
          f"peak RSS < {_gb(TARGET_RSS_BYTES):g} GB; all parameters stay on meta", flush=True)
    rows = []
    for name in names:
        print(f"running {name}" + (f" (layers={args.layers})" if args.layers else "") + " ...",
              flush=True)
        row = _run_child("--one", name, args)
        row["verdict"] = _verdict(row)
        rows.append(row)
        if "error" in row:
            print(f"  {row['error']}", flush=True)
            if row.get("timed_out"):
                print("  -> re-run with --layers N to show how the cost scales with depth",
                      flush=True)
        else:
            print(f"  done in {row['subprocess_wall_s']:.1f} s", flush=True)

    print()
    print(_table(rows))
    ok = bool(rows) and all(r["verdict"]["ok"] for r in rows)
    print()
    for r in rows:
        v = r["verdict"]
        if "error" in r:
            print(f"{r['model']}: no result ({r['error'].splitlines()[0]})")
            continue
        print(f"{r['model']}: time target (lower+analyze)/bare = "
              f"{r['ratio_lower_analyze_over_bare']:.2f} <= {TARGET_OVERHEAD:g}: "
              f"{'met' if v['time_ok'] else 'NOT met'}  "
              f"[analyze-only {r['ratio_analyze_over_bare']:.2f}, total/bare "
              f"{r['ratio_total_over_bare']:.2f}]; peak RSS {_gb(r['peak_rss_bytes']):.2f} GB "
              f"(end {_gb(r['rss_end_bytes']):.2f} GB) < 2 GB: "
              f"{'met' if v['rss_ok'] else 'NOT met'}; params on meta: "
              f"{'yes' if v['meta_ok'] else 'NO ' + str(r['non_meta_tensors'])}; "
              f"unsupported ops: {r['unsupported']}")
    print(f"overall: {'all targets met' if ok else 'target(s) NOT met'}")

    profiles = []
    time_missed = any(not r["verdict"]["time_ok"] for r in rows if "error" not in r)
    if args.profile or time_missed:
        pname = args.profile_model.lower()
        print(f"\nprofiling {pname} (cProfile, top {args.top} by cumulative time) ...", flush=True)
        prof = _run_child("--profile-one", pname, args)
        profiles.append(prof)
        if "error" in prof:
            print(f"  {prof['error']}")
        else:
            print(f"\n== run_decompositions ({pname}, {prof['layers']} layers) ==")
            print(prof["run_decompositions_top"])
            print(f"\n== run_decompositions ({pname}), by self time ==")
            print(prof["run_decompositions_top_self"])
            print(f"\n== fxprune.analyze ({pname}, {prof['layers']} layers) ==")
            print(prof["analyze_top"])
            print(f"\n== fxprune.analyze ({pname}), by self time ==")
            print(prof["analyze_top_self"])

    import torch
    import transformers

    result = {
        "benchmark": "analyze_scale",
        "targets": {
            "lower_plus_analyze_over_bare_export_max": TARGET_OVERHEAD,
            "peak_rss_bytes_max": TARGET_RSS_BYTES,
            "params_on_meta": True,
        },
        "targets_met": ok,
        "models": names,
        "layers_override": args.layers,
        "input_shape": list(SHAPE),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git": _git_state(),
        "runs": rows,
        "profiles": profiles,
    }
    _write_atomic(args.out, result)
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
