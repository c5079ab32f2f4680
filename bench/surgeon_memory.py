"""Time and peak memory of ``surgeon`` (K-FAC statistics, costs and the correlated update) on a
~100M-parameter Llama, factors on the CPU in fp32.

Why: K-FAC factors are big (``d_in²`` per input slot and ``d_out²`` per layer whose rows can
go: an MLP's ``G`` alone is ``d_ff²``), about 2-3x the weights for a Llama when held all at once.
fxprune therefore holds at most ``budget`` bytes of statistics (default: half the weights' bytes, at least 128 MiB):
larger models are gathered in chunks of consecutive layers (one forward+backward over the
calibration batches per chunk), each chunk's costs are computed and its factors freed, and the
update re-gathers chunk by chunk.  LM heads never store ``G`` (their rows, the vocabulary, never
go): they keep ``diag(Wᵀ G W)``, ``d_in`` floats.  Target: peak / weight bytes <= 3.

Modes (each in a fresh subprocess, as ``bench/score_memory.py`` measures: VmHWM after
clear_refs, glibc pinned to mmap large blocks so freed tensors leave RSS):

* ``surgeon``: ``score(importance="surgeon")`` + ``make_plan(allocation="cost", ratio 0.5)`` +
  ``update(method="surgeon")``: the curvature passes themselves;
* ``prune``: the whole ``fxprune.prune(..., importance="surgeon")`` (adds the rewrite, which
  builds the smaller copy of the model, and its verification).

The model has random weights (memory and time do not depend on them); calibration is
``--batches`` windows of ``--seq-len`` random tokens.  The ratio reported is
``(weight bytes + peak increase) / weight bytes``; the bytes the full factors would take per
parameter (all layers at once) and what was held at the peak are printed too.

Usage:  python bench/surgeon_memory.py [--batches 4] [--seq-len 128] [--budget-mb N]
Writes: bench/results/surgeon_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "surgeon_memory.json"
MODES = ("surgeon", "prune")
TARGET = 3.0


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=16384, max_position_embeddings=512,
                       tie_word_embeddings=False)


def _child(mode: str, n_batches: int, seq_len: int, budget_mb: int | None) -> dict:
    import torch
    from score_memory import _Probe, random_batches
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    import fxprune
    from fxprune.passes import curvature
    from fxprune.passes.update import update

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(_config()).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = random_batches(n_batches, seq_len, 16384, device)
    with torch.no_grad():
        model(**batches[0], use_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = fxprune.trace(model, kwargs=dict(batches[0]))
        analysis = fxprune.analyze(graph)
    options = {"budget": budget_mb * 2**20} if budget_mb else None
    roles = curvature.roles_of(model, analysis.groups)
    specs = curvature.stat_specs(model, roles, "surgeon")
    full_factor_bytes = sum(curvature.spec_bytes(model, n, s) for n, s in specs.items())
    info: dict = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _Probe(device) as probe:
        warnings.simplefilter("ignore")
        if mode == "surgeon":
            scores = fxprune.score(model, analysis, batches, importance="surgeon", progress=False,
                                   importance_options=options)
            plan = fxprune.make_plan(analysis, scores, 0.5, allocation="cost")
            weights = update(model, analysis, plan, scores, method="surgeon")
            info = {"changed_tensors": len(weights.changed), "gatherings": scores.stats.gatherings,
                    "held_stats_bytes": scores.stats.peak_stats_bytes, "removed": plan.info["achieved_ratio"],
                    "by_kind": {k: v["units"] for k, v in plan.info["by_kind"].items()}}
        else:
            res = fxprune.prune(analysis, 0.5, calib=batches, importance="surgeon", progress=False,
                                importance_options=options)
            info = {"removed": res.report.ratio_achieved, "verification": res.report.verification,
                    "timings": res.report.timings, "gatherings": res.scores.stats.gatherings,
                    "held_stats_bytes": res.scores.stats.peak_stats_bytes}
    seconds = time.perf_counter() - t0
    return {
        "mode": mode, "device": device, "method": probe.method, "params": n_params, "weight_bytes": weight_bytes,
        "baseline_bytes": probe.base, "peak_bytes": probe.peak, "delta_bytes": probe.delta,
        "peak_over_weights": (weight_bytes + probe.delta) / weight_bytes,
        "full_factor_bytes": full_factor_bytes, "full_factor_bytes_per_param": full_factor_bytes / n_params,
        "seconds": seconds, "batches": n_batches, "seq_len": seq_len, "budget_mb": budget_mb, **info,
    }


def _run_child(mode: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", mode, "--batches", str(args.batches), "--seq-len", str(args.seq_len)]
    if args.budget_mb:
        cmd += ["--budget-mb", str(args.budget_mb)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--budget-mb", type=int, default=0, help="statistics held at once (default: half the weights' bytes)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.batches, args.seq_len, args.budget_mb or None)))
        return 0
    rows = [_run_child(m, args) for m in args.modes.split(",")]
    mib = 2**20
    print(f"{'mode':<8} {'params':>8} {'weights MiB':>11} {'peak+ MiB':>10} {'peak/weights':>12} {'sec':>7} "
          f"{'gatherings':>10} {'held stats MiB':>14}")
    for r in rows:
        print(f"{r['mode']:<8} {r['params'] / 1e6:>7.1f}M {r['weight_bytes'] / mib:>11.0f} {r['delta_bytes'] / mib:>10.0f} "
              f"{r['peak_over_weights']:>12.2f} {r['seconds']:>7.0f} {r['gatherings']:>10} "
              f"{r['held_stats_bytes'] / mib:>14.0f}")
    r0 = rows[0]
    print(f"K-FAC factors of every layer at once would take {r0['full_factor_bytes'] / mib:.0f} MiB = "
          f"{r0['full_factor_bytes_per_param']:.2f} bytes/parameter (fp32; weights: 4 bytes/parameter)")
    ok = all(r["peak_over_weights"] <= TARGET for r in rows)
    print(f"target peak/weights <= {TARGET}: {'met' if ok else 'NOT met'} "
          f"({', '.join(m + ' ' + format(r['peak_over_weights'], '.2f') for m, r in zip(args.modes.split(','), rows))})")
    result = {"benchmark": "surgeon_memory", "target_peak_over_weights": TARGET, "target_met": ok,
              "python": platform.python_version(), "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
