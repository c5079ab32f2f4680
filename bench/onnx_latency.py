"""ONNX Runtime latency of a dense ~100M-parameter Llama vs. fxprune-pruned variants (20% / 50% removed).

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

The pruned variants come from the real pipeline, ``fxprune.prune(dense, ratio, importance="l2")``
with the default kinds (MLP channels, heads, KV heads) and the default ``round_to``, on two
random-token calibration batches; the achieved ratio is reported next to the target (and the
prune is retried with ``allocation="global"`` if it falls short).  The pruned model may keep
different widths per layer: the FLOP count and the KV-cache export read each layer's modules.
The dense weights are random: latency does not depend on their values.

Usage:  python bench/onnx_latency.py [--quick] [--repeats 10] [--threads N (default 1; 0 = ORT's)] [--device auto]
                                     [--importance l2] [--allocation uniform] [--round-to N]
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

from fxprune.backends.onnx import ort_providers, ort_session  # noqa: E402
from fxprune.passes.export import export_onnx, kv_cache_layout  # noqa: E402
from fxprune.runtime import benchmark_latency  # noqa: E402

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


def calib_batches(vocab: int, n: int = 2, seq: int = 128, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """A couple of random-token batches: enough for ``l2`` (which ignores them) and ``taylor``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def layer_shapes(model: torch.nn.Module) -> list[dict[str, int]]:
    """Per layer query heads, KV heads and MLP width, read from the modules (not the config:
    a pruned model can differ per layer and its config keeps the dense numbers)."""
    shapes = []
    for (kv, hd, _), layer in zip(kv_cache_layout(model), model.model.layers):
        shapes.append({"q_heads": layer.self_attn.q_proj.out_features // hd, "kv_heads": kv,
                       "head_dim": hd, "mlp": layer.mlp.gate_proj.out_features})
    return shapes


def _short(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def prune_variant(
    dense: torch.nn.Module, ratio: float, importance: str, allocation: str, round_to: int | None,
    tol: float = 0.005,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``fxprune.prune`` at ``ratio`` (default ``round_to`` unless one is given).

    If the achieved ratio falls short of the target by more than ``tol`` under ``allocation``,
    it is retried once with ``allocation="global"`` and the better result kept; both attempts are
    recorded.  ``dense`` is left untouched (checked).
    """
    import fxprune

    vocab = dense.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 64), generator=gen)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense_params = n_params(dense)
    attempts: list[dict[str, Any]] = []
    best = None
    for alloc in dict.fromkeys([allocation, "global"]):
        kw: dict[str, Any] = {} if round_to is None else {"round_to": round_to}
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = fxprune.prune(dense, ratio, example_inputs=example, calib=calib_batches(vocab),
                                importance=importance, allocation=alloc, progress=False, **kw)
        rep = res.report
        if n_params(dense) != dense_params:
            raise RuntimeError("fxprune.prune modified the dense model in place")
        attempts.append({
            "allocation": alloc, "ratio_achieved": rep.ratio_achieved, "seconds": time.perf_counter() - t0,
            "model_type": f"{type(res.model).__module__}.{type(res.model).__qualname__}",
            "returned": rep.returned, "verification": rep.verification, "timings": rep.timings,
            "fxprune_flop_ratio_example": rep.flop_ratio, "notes": rep.notes, "table": rep.table(),
            "warnings": sorted({str(w.message) for w in caught if "fxprune" in str(w.message)}),
        })
        print(f"  prune {ratio:.0%} importance={importance} allocation={alloc}: "
              f"{type(res.model).__name__}, achieved {rep.ratio_achieved:.2%}", flush=True)
        print("    " + rep.table().replace("\n", "\n    "), flush=True)
        if best is None or rep.ratio_achieved > best[1].ratio_achieved + 1e-9:
            best = (res.model, rep, alloc)
        if rep.ratio_achieved >= ratio - tol:
            break
        print(f"  ratio achieved {rep.ratio_achieved:.2%} < target {ratio:.0%} with allocation={alloc}", flush=True)
    model, rep, alloc = best
    if isinstance(model, torch.fx.GraphModule):
        raise RuntimeError(
            f"fxprune.prune returned a torch.fx.GraphModule ({type(model).__name__}), not the "
            "LlamaForCausalLM: the KV-cache export needs the HF module"
        )
    info = {
        "ratio_target": ratio,
        "ratio_achieved": rep.ratio_achieved,
        "ratio_short": rep.ratio_achieved < ratio - tol,
        "importance": importance,
        "allocation_used": alloc,
        "round_to": "default" if round_to is None else round_to,
        "model_type": f"{type(model).__module__}.{type(model).__qualname__}",
        "pruned_config_stale": {
            k: getattr(model.config, k) for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        },
        "attempts": attempts,
        "report": {k: v for k, v in rep.to_dict().items() if k != "groups"},
    }
    return model.eval(), info


def _pruned_variants(
    dense: torch.nn.Module, ratios: list[float], importance: str = "l2", allocation: str = "uniform",
    round_to: int | None = None,
) -> list[tuple[float, torch.nn.Module, dict[str, Any]]]:
    """The real pipeline: ``fxprune.prune`` (capture, analyse, score, plan, rewrite, verify).

    Default kinds (MLP channels, heads, KV heads) and default ``round_to``; the result may have
    different widths per layer, which the FLOP count and the KV-cache export read per layer.
    """
    out = []
    for r in ratios:
        model, info = prune_variant(dense, r, importance, allocation, round_to)
        out.append((r, model, info))
    return out


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
    """An ORT session with all graph optimizations (ORT's default) and ``threads`` intra-op threads."""
    return ort_session(path, providers, intra_op_threads=threads)


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
        "layers": layer_shapes(model),
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
    head = (f"{'model':<10}{'params':>9}{'removed':>9}{'q heads':>9}{'kv':>5}{'mlp':>11}{'prefill ms':>12}{'decode ms/tok':>15}"
            f"{'FLOPx pre':>11}{'speedup pre':>13}{'FLOPx dec':>11}{'speedup dec':>13}{'target':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "flop_ratio_prefill" in r:
            ok = "ok" if r["target_met_prefill"] and r["target_met_decode"] else (
                "pre" if r["target_met_prefill"] else "dec" if r["target_met_decode"] else "miss")
            extra = (f"{r['prefill_ms']:>12.2f}{r['decode_ms_per_token']:>15.2f}"
                     f"{r['flop_ratio_prefill']:>11.2f}{r['speedup_prefill']:>13.2f}"
                     f"{r['flop_ratio_decode']:>11.2f}{r['speedup_decode']:>13.2f}{ok:>9}")
        else:
            extra = (f"{r['prefill_ms']:>12.2f}{r['decode_ms_per_token']:>15.2f}"
                     f"{'1.00':>11}{'1.00':>13}{'1.00':>11}{'1.00':>13}{'':>9}")
        lay = r["layers"]
        widths = (f"{_short([x['q_heads'] for x in lay]):>9}{_short([x['kv_heads'] for x in lay]):>5}"
                  f"{_short([x['mlp'] for x in lay]):>11}")
        removed = f"{r['params_removed']:>9.1%}" if "params_removed" in r else f"{'-':>9}"
        print(f"{r['name']:<10}{r['params'] / 1e6:>8.1f}M{removed}{widths}{extra}")


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
    p.add_argument("--threads", type=int, default=1,
                   help="ORT intra-op threads (default 1: measures how compute scales with pruning, free of "
                        "thread-pool contention on small shared CPUs; 0 = ORT's default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--importance", default="l2", help="fxprune.prune criterion (l2: no gradients, fast)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "global"],
                   help="fxprune.prune allocation; retried with global if the ratio falls short")
    p.add_argument("--round-to", type=int, default=None,
                   help="fxprune.prune round_to (default: not passed, i.e. fxprune's default)")
    p.add_argument("--target", type=float, default=0.9, help="required speedup / FLOP ratio")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--onnx-dir", type=Path, default=None,
                   help="keep the ONNX files here and reuse them on later runs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.repeats < 10:
        print(f"note: --repeats {args.repeats} < 10, below the protocol", file=sys.stderr)

    providers = ort_providers(args.device)
    dense = build(dense_config(args.quick))
    print(f"pruning with fxprune.prune (importance={args.importance}, allocation={args.allocation}, "
          f"round_to={'default' if args.round_to is None else args.round_to}) ...", flush=True)
    pruned = _pruned_variants(dense, args.ratios, args.importance, args.allocation, args.round_to)
    variants = [("dense", dense, None)] + [(f"pruned{round(r * 100)}", m, info) for r, m, info in pruned]
    rows = []
    with contextlib.ExitStack() as stack:
        if args.onnx_dir is not None:
            workdir = args.onnx_dir / ("quick" if args.quick else "full")
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fxprune-onnx-bench-")))
        for name, model, info in variants:
            print(f"[{name}] {n_params(model) / 1e6:.1f}M params: exporting ...", flush=True)
            row = export_variant(name, model, workdir, providers, reuse=args.onnx_dir is not None)
            print(f"  parity max |diff| vs PyTorch: {row['export_max_abs_diff']}", flush=True)
            rows.append({**row, **({"prune": info} if info else {}), "_model": model})
        print(f"measuring: {args.warmup} warm-up + {args.repeats} interleaved rounds ...", flush=True)
        measure_interleaved(rows, args, providers)
    for row, ratio in zip(rows[1:], args.ratios):
        row["ratio_target"] = ratio
        row["ratio_achieved"] = row["prune"]["ratio_achieved"]
        compare(rows[0], row, args.target)

    print()
    print_table(rows)
    met = all(r["target_met_prefill"] and r["target_met_decode"] for r in rows[1:])
    for r in rows[1:]:
        if r["prune"]["ratio_short"]:
            print(f"note: {r['name']} achieved only {r['ratio_achieved']:.2%} of the {r['ratio_target']:.0%} target")
    print(f"\ntarget (speedup >= {args.target} x FLOP ratio, prefill and decode): {'MET' if met else 'NOT MET'}")
    payload = {
        "bench": "onnx_latency",
        "quick": args.quick,
        "protocol": {
            "batch": 1, "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
            "warmup": args.warmup, "repeats": args.repeats, "statistic": "median",
            "flops": "2*linear params per token (incl. LM head) + 4*seq*ctx*heads*head_dim per layer",
            "pruned_variants": (f"fxprune.prune(importance={args.importance!r}, allocation={args.allocation!r}, "
                                f"round_to={'default' if args.round_to is None else args.round_to}, "
                                "default kinds, 2 random-token calibration batches)"),
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
