"""ONNX Runtime latency of a dense ~100M-parameter Llama vs. pruned variants (20% / 50% removed).

Why: structured pruning is only worth it if fewer FLOPs turn into less time in the runtime that
serves the model.  For each model we export a KV-cache decoder with
``fxprune.passes.export.export_onnx(kv_cache=True)`` (checked against PyTorch at unseen shapes),
then measure in ONNX Runtime

* prefill latency: batch 1, 128 prompt tokens, empty cache;
* decode latency per token: 32 greedy steps after that prefill, cache fed back each step;

with warm-up runs first and the median of >= 10 repeats (``benchmark_latency``); the repeats
are interleaved across models so that load from elsewhere affects all of them alike.  CUDA EP with
IOBinding is used when onnxruntime-gpu and a GPU are present, else the CPU EP.

FLOPs are counted analytically (multiply-add = 2 FLOPs): every linear layer including the LM
head, plus attention score/value products (``QK^T`` and ``AV``: 4 * seq * ctx * heads * head_dim
per layer).  Embedding lookups, norms and softmax are ignored.  Target: measured speedup >= 0.9 x
FLOP ratio (dense FLOPs / pruned FLOPs), reported for prefill and decode separately.

Weights are random: latency does not depend on their values.

Usage:  python bench/onnx_latency.py [--quick] [--repeats 10] [--threads N] [--device auto]
Writes: bench/results/onnx_latency.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxprune.passes.export import (  # noqa: E402
    benchmark_latency,
    export_onnx,
    kv_cache_layout,
    ort_providers,
)

RESULTS = ROOT / "bench" / "results" / "onnx_latency.json"


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def dense_config(quick: bool):
    """~102M parameters (hidden 768, 12 layers, 12 query / 4 KV heads, MLP 2560, vocab 8192).

    The vocabulary is kept small on purpose: embeddings and the LM head are not pruned, and with
    a 32k vocabulary they would be half the model, making "50% of parameters removed" impossible
    to reach by pruning heads and MLP channels alone.  ``quick``: a ~6M model for smoke runs.
    """
    from transformers import LlamaConfig

    if quick:
        sizes = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, intermediate_size=1024)
    else:
        sizes = dict(vocab_size=8192, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=4, intermediate_size=2560)
    return LlamaConfig(max_position_embeddings=1024, tie_word_embeddings=False, **sizes)


def build(config) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _layer_params(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> int:
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    return attn + 3 * hidden * inter


def _kv_heads_for(heads: int, dense_heads: int, dense_kv: int) -> int:
    """A KV-head count that divides ``heads`` (GQA) and keeps the dense query/KV ratio roughly."""
    want = dense_kv * heads / dense_heads
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    return min(divisors, key=lambda d: (abs(d - want), -d))


def _pruned_config(dense, ratio: float):
    """Uniform smaller widths that remove ~``ratio`` of *all* parameters (embeddings included)."""
    hd = dense.hidden_size // dense.num_attention_heads
    h, L = dense.hidden_size, dense.num_hidden_layers
    emb = 2 * dense.vocab_size * h  # untied embeddings + LM head: never pruned
    dense_layer = _layer_params(h, dense.num_attention_heads, dense.num_key_value_heads, hd, dense.intermediate_size)
    total = emb + L * dense_layer + (2 * L + 1) * h
    budget = ((1 - ratio) * total - emb - (2 * L + 1) * h) / L
    keep = budget / dense_layer
    heads = max(1, round(dense.num_attention_heads * keep))
    kv = _kv_heads_for(heads, dense.num_attention_heads, dense.num_key_value_heads)
    attn = _layer_params(h, heads, kv, hd, 0)
    step = 64 if h >= 512 else 32
    inter = max(step, int(round((budget - attn) / (3 * h) / step)) * step)
    cfg = dense.__class__(**dense.to_dict())
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = heads, kv, inter
    cfg.head_dim = hd  # keep the head size; only the number of heads shrinks
    return cfg


def _pruned_variants(dense: torch.nn.Module, ratios: list[float]) -> list[tuple[float, torch.nn.Module]]:
    """STAND-IN for ``fxprune.prune``: replace with the real pruning pass once it exists.

    Builds the *same architecture* with smaller uniform sizes via the config (fewer query and KV
    heads, smaller MLP) so that ~``ratio`` of the dense parameter count is removed.  Real pruning
    would keep the dense weights' best units and may choose different widths per layer; for
    latency only the shapes matter, so random weights are equivalent here.
    """
    return [(r, build(_pruned_config(dense.config, r))) for r in ratios]


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def linear_params(model: torch.nn.Module) -> int:
    """Weights of all Linear layers (read from the modules, so uneven pruned layers count right)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_width(model: torch.nn.Module) -> list[int]:
    """Per layer ``query_heads * head_dim`` (the width of the QK^T / AV products)."""
    widths = []
    for layer in model.model.layers:
        attn = layer.self_attn
        widths.append(attn.q_proj.out_features)
    return widths


def flops_prefill(model: torch.nn.Module, seq: int, batch: int = 1) -> float:
    lin = 2 * linear_params(model) * seq
    attn = sum(4 * seq * seq * w for w in attention_width(model))
    return float(batch * (lin + attn))


def flops_decode(model: torch.nn.Module, ctx: float, batch: int = 1) -> float:
    """One new token attending to ``ctx`` cached positions."""
    lin = 2 * linear_params(model)
    attn = sum(4 * ctx * w for w in attention_width(model))
    return float(batch * (lin + attn))


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def make_session(path: Path, providers: list[str], threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def export_variant(
    name: str, model: torch.nn.Module, workdir: Path, providers: list[str], reuse: bool
) -> dict[str, Any]:
    """Export one KV-cache decoder (parity-checked at unseen shapes) and describe it.

    With ``reuse`` an existing file from an earlier run (same seed, same shapes) is measured
    again without re-exporting, which is what makes repeated runs cheap.
    """
    path = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    if reuse and path.is_file():
        exp = None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = export_onnx(
                model, path, example_inputs={"input_ids": torch.randint(0, model.config.vocab_size, (2, 16))},
                kv_cache=True, providers=providers, overwrite=True,
            )
    return {
        "name": name,
        "path": path,
        "params": n_params(model),
        "kv_heads_head_dim_layer0": list(kv_cache_layout(model)[0][:2]),
        "query_heads": model.model.layers[0].self_attn.q_proj.out_features // kv_cache_layout(model)[0][1],
        "intermediate_size": model.config.intermediate_size,
        "onnx_bytes": sum(f.stat().st_size for f in workdir.glob(f"{name}.onnx*")),
        "export_s": round(time.perf_counter() - t0, 1) if exp else None,
        "export_max_abs_diff": exp.max_abs_diff if exp else "reused",
    }


def measure_interleaved(rows: list[dict[str, Any]], args, providers: list[str]) -> None:
    """Warm up every model, then run repeat rounds that visit every model once each.

    Interleaving means a burst of load from elsewhere on the machine hits all models alike
    instead of biasing whichever one happened to be running; the median per model is reported.
    """
    sessions = [make_session(r["path"], providers, args.threads) for r in rows]
    kw = dict(batch_size=1, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens)
    for sess in sessions:
        benchmark_latency(sess, warmup=args.warmup, repeats=1, **kw)
    samples: list[dict[str, list[float]]] = [{"prefill": [], "decode": []} for _ in rows]
    for k in range(args.repeats):
        for i in [(k + j) % len(rows) for j in range(len(rows))]:  # rotate the order each round
            lat = benchmark_latency(sessions[i], warmup=0, repeats=1, **kw)
            samples[i]["prefill"].append(lat.prefill_ms)
            samples[i]["decode"].append(lat.decode_ms_per_token)
            rows[i]["provider"], rows[i]["io_binding"] = lat.provider, lat.io_binding
    ctx = args.prompt_len + args.decode_tokens / 2
    for row, s, model in zip(rows, samples, [r.pop("_model") for r in rows]):
        row["prefill_ms"] = statistics.median(s["prefill"])
        row["decode_ms_per_token"] = statistics.median(s["decode"])
        row["prefill_samples_ms"], row["decode_samples_ms"] = s["prefill"], s["decode"]
        row["flops_prefill"] = flops_prefill(model, args.prompt_len)
        row["flops_decode_per_token"] = flops_decode(model, ctx)
        row["path"] = None


def compare(dense: dict[str, Any], row: dict[str, Any], target: float) -> None:
    """Add FLOP ratios, measured speedups and the target verdict to a pruned row."""
    row["params_removed"] = 1 - row["params"] / dense["params"]
    for phase, lat_key, flop_key in (
        ("prefill", "prefill_ms", "flops_prefill"),
        ("decode", "decode_ms_per_token", "flops_decode_per_token"),
    ):
        ratio = dense[flop_key] / row[flop_key]
        speedup = dense[lat_key] / row[lat_key]
        row[f"flop_ratio_{phase}"] = ratio
        row[f"speedup_{phase}"] = speedup
        row[f"speedup_over_flop_ratio_{phase}"] = speedup / ratio
        row[f"target_met_{phase}"] = bool(speedup >= target * ratio)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'model':<12}{'params':>10}{'removed':>9}{'prefill ms':>12}{'decode ms/tok':>15}"
            f"{'FLOPx pre':>11}{'speedup pre':>13}{'FLOPx dec':>11}{'speedup dec':>13}{'target':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "flop_ratio_prefill" in r:
            ok = "ok" if r["target_met_prefill"] and r["target_met_decode"] else (
                "pre" if r["target_met_prefill"] else "dec" if r["target_met_decode"] else "miss")
            extra = (f"{r['params_removed']:>8.1%}{r['prefill_ms']:>12.2f}{r['decode_ms_per_token']:>15.2f}"
                     f"{r['flop_ratio_prefill']:>11.2f}{r['speedup_prefill']:>13.2f}"
                     f"{r['flop_ratio_decode']:>11.2f}{r['speedup_decode']:>13.2f}{ok:>9}")
        else:
            extra = (f"{'-':>9}{r['prefill_ms']:>12.2f}{r['decode_ms_per_token']:>15.2f}"
                     f"{'1.00':>11}{'1.00':>13}{'1.00':>11}{'1.00':>13}{'':>9}")
        print(f"{r['name']:<12}{r['params'] / 1e6:>9.1f}M{extra}")


def write_json(payload: dict[str, Any], path: Path) -> None:
    """Atomic write: a half-written results file is worse than none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~6M-parameter model (smoke run)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--target", type=float, default=0.9, help="required speedup / FLOP ratio")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--onnx-dir", type=Path, default=None,
                   help="keep the ONNX files here and reuse them on later runs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.repeats < 10:
        print(f"note: --repeats {args.repeats} < 10, below the protocol", file=sys.stderr)

    providers = ort_providers(args.device)
    dense = build(dense_config(args.quick))
    variants = [("dense", dense)] + [(f"pruned{int(r * 100)}", m) for r, m in _pruned_variants(dense, args.ratios)]
    rows = []
    with contextlib.ExitStack() as stack:
        if args.onnx_dir is not None:
            workdir = args.onnx_dir / ("quick" if args.quick else "full")
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fxprune-onnx-bench-")))
        for name, model in variants:
            print(f"[{name}] {n_params(model) / 1e6:.1f}M params: exporting ...", flush=True)
            row = export_variant(name, model, workdir, providers, reuse=args.onnx_dir is not None)
            rows.append({**row, "_model": model})
        print(f"measuring: {args.warmup} warm-up + {args.repeats} interleaved rounds ...", flush=True)
        measure_interleaved(rows, args, providers)
    for row, ratio in zip(rows[1:], args.ratios):
        row["ratio_target"] = ratio
        compare(rows[0], row, args.target)

    print()
    print_table(rows)
    met = all(r["target_met_prefill"] and r["target_met_decode"] for r in rows[1:])
    print(f"\ntarget (speedup >= {args.target} x FLOP ratio, prefill and decode): {'MET' if met else 'NOT MET'}")
    payload = {
        "bench": "onnx_latency",
        "quick": args.quick,
        "protocol": {
            "batch": 1, "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
            "warmup": args.warmup, "repeats": args.repeats, "statistic": "median",
            "flops": "2*linear params per token (incl. LM head) + 4*seq*ctx*heads*head_dim per layer",
            "pruned_variants": "stand-in: uniform smaller config (fxprune.prune not used yet)",
        },
        "target": args.target,
        "target_met": met,
        "providers": providers,
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "dense_config": {k: getattr(dense.config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size")},
        "results": rows,
    }
    write_json(payload, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
