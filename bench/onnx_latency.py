"""ONNX Runtime latency of a dense ~100M-parameter Llama vs. fxprune-pruned variants (20% / 50% removed).

Why: structured pruning is only worth it if fewer FLOPs turn into less time in the runtime that
serves the model.  For each model we export a KV-cache decoder with
``fxprune.passes.export.export_onnx(kv_cache=True)`` (checked against PyTorch at unseen shapes),
then measure in ONNX Runtime, at ORT's default intra-op threads (``--threads 0``) and at 1 thread:

* prefill latency: batch 1, 128 prompt tokens, empty cache;
* decode latency per token: 16 greedy steps after that prefill, cache fed back each step;

each at ORT's default thread count, with spin-waiting off (``0:nospin``: idle pool threads
sleep instead of spinning, which ORT recommends when the CPU is shared), and at 1 thread; then
the cross-check with nothing shared: each model alone in a fresh process with ORT's session
options untouched (``--isolated-rounds``).  In the interleaved rounds every session is opened
with ``session.force_spinning_stop=1``: its pool spins during a run as usual and stops when the
run returns.  Without it the idle sessions of the other models spin into each run and take its
cores -- a cost of measuring several models in one process that a server running one model per
process never pays (it made the 50% model look 1.63x faster instead of 2.0x on 2 cores).

Protocol (the machine is shared, so timings are noisy): warm-up runs first, then ``--repeats``
interleaved rounds; a round runs every model once, in an order rotated each round, so load from
elsewhere hits all models alike.  Speedups are *paired*: dense/pruned within one round, then
the median over rounds (the ratio of medians is reported too).  The load average and this
process' CPU share (CPU time / (wall time x threads)) are recorded for every block.

Reference ratios, each pruned model against the dense one:

* ``linear ratio``: weights of all Linear layers (incl. the LM head), dense / pruned, read from
  the modules -- the GEMM work per token at any length;
* ``FLOP ratio``: analytic FLOPs (multiply-add = 2): every linear layer plus the attention score
  and value products (``4 * seq * ctx * heads * head_dim`` per layer); embeddings, norms and
  softmax are ignored.  At 128 tokens the two are within a few percent.

Target: prefill speedup at ORT's default threads >= 0.9 x linear ratio at 20% and 50% removed.

The pruned variants come from the real pipeline, ``fxprune.prune(dense, ratio, importance="l2")``
with the default kinds (MLP channels, heads, KV heads), the default ``allocation="uniform"`` and
the default ``round_to="auto"`` (kept widths a multiple of 8 elements on CPU, 64 on CUDA), on two
random-token calibration batches.  ``--round-to-sweep 1 8 64`` adds variants of the largest
ratio with other ``round_to`` values (what padding-unfriendly widths cost); ``--profile`` writes
an ORT per-op-type breakdown of one prefill per model (where the time that does not shrink goes).
The dense weights are random: latency does not depend on their values.

Model shape: ``--hidden/--layers/--heads/--kv-heads/--intermediate/--vocab`` (default the 102M
shape below), so the comparison can be repeated on other shapes.

Usage:  python bench/onnx_latency.py [--quick] [--repeats 15] [--threads 0 0:nospin 1] [--ratios 0.2 0.5]
                                     [--round-to auto|N] [--round-to-sweep N ...] [--profile]
                                     [--hidden 768 --layers 12 --heads 12 --kv-heads 4 --intermediate 2560]
Writes: bench/results/onnx_latency.json (``--out``)
"""

from __future__ import annotations

import argparse
import collections
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

from bench.arch_sweep import replace_readme_section  # noqa: E402
from fxprune.backends.onnx import import_ort, ort_providers  # noqa: E402
from fxprune.passes.export import export_onnx, kv_cache_layout  # noqa: E402
from fxprune.runtime import benchmark_latency  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "onnx_latency.json"
SHAPE_100M = dict(vocab_size=8192, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, intermediate_size=2560)
SHAPE_QUICK = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, intermediate_size=1024)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def dense_config(args: argparse.Namespace):
    """~102M parameters by default (hidden 768, 12 layers, 12 query / 4 KV heads, MLP 2560,
    vocab 8192).  The vocabulary is small on purpose: embeddings and the LM head are not pruned,
    and with a 32k vocabulary they would be half the model, making "50% of parameters removed"
    impossible by pruning heads and MLP channels alone.  ``--quick``: a ~6M model for smoke runs."""
    from transformers import LlamaConfig

    sizes = dict(SHAPE_QUICK if args.quick else SHAPE_100M)
    for key, arg in (("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("num_attention_heads", "heads"),
                     ("num_key_value_heads", "kv_heads"), ("intermediate_size", "intermediate"),
                     ("vocab_size", "vocab")):
        if getattr(args, arg, None):
            sizes[key] = getattr(args, arg)
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
    """Per layer query heads, KV heads and MLP width, read from the modules."""
    shapes = []
    for (kv, hd, _), layer in zip(kv_cache_layout(model), model.model.layers, strict=True):
        shapes.append({"q_heads": layer.self_attn.q_proj.out_features // hd, "kv_heads": kv,
                       "head_dim": hd, "mlp": layer.mlp.gate_proj.out_features})
    return shapes


def _short(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def prune_variant(dense: torch.nn.Module, ratio: float, importance: str, allocation: str,
                  round_to: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``fxprune.prune`` at ``ratio``; ``dense`` is left untouched (checked)."""
    import fxprune

    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense_params = n_params(dense)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxprune.prune(dense, ratio, example_inputs=example, calib=calib_batches(vocab),
                            importance=importance, allocation=allocation, round_to=round_to, progress=False)
    rep = res.report
    if n_params(dense) != dense_params:
        raise RuntimeError("fxprune.prune modified the dense model in place")
    if isinstance(res.model, torch.fx.GraphModule):
        raise RuntimeError("fxprune.prune returned a GraphModule, not the LlamaForCausalLM: the KV-cache export "
                           f"needs the HF module ({rep.notes})")
    print(f"  prune {ratio:.0%} round_to={round_to}: achieved {rep.ratio_achieved:.2%} in "
          f"{time.perf_counter() - t0:.0f}s, checkpoint loads with {rep.loads_with}", flush=True)
    info = {
        "ratio_target": ratio, "ratio_achieved": rep.ratio_achieved, "importance": importance,
        "allocation": allocation, "round_to": rep.round_to, "loads_with": rep.loads_with,
        "config": {k: getattr(res.model.config, k, None) for k in (
            "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")},
        "seconds": time.perf_counter() - t0, "table": rep.table(),
        "warnings": sorted({str(w.message) for w in caught if "fxprune" in str(w.message)}),
    }
    return res.model.eval(), info


# --------------------------------------------------------------------------------------------
# Reference ratios
# --------------------------------------------------------------------------------------------


def linear_params(model: torch.nn.Module) -> int:
    """Weights of all Linear layers (read from the modules, so uneven pruned layers count right)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_width(model: torch.nn.Module) -> list[int]:
    """Per layer ``query_heads * head_dim`` (the width of the QK^T / AV products)."""
    return [layer.self_attn.q_proj.out_features for layer in model.model.layers]


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
# Export and sessions
# --------------------------------------------------------------------------------------------


def parse_threads(spec: str) -> tuple[int, bool]:
    """``"0"`` (ORT's default thread count), ``"1"``..., with ``":nospin"`` to turn off the
    thread pool's spin-waiting (``session.intra_op.allow_spinning=0``)."""
    count, _, flag = spec.partition(":")
    if flag not in ("", "nospin"):
        raise SystemExit(f"--threads {spec!r}: expected N or N:nospin")
    return int(count), flag != "nospin"


def make_session(path: Path, providers: list[str], threads: int, opt_level: str, profile: bool = False,
                 spinning: bool = True):
    """An ORT session: ``threads`` intra-op threads (0 = ORT's default), graph optimisation level,
    spin-waiting of idle pool threads (ORT's default: on).

    ``session.force_spinning_stop``: the pool spins as usual *during* a run and stops when the run
    returns.  Without it, the sessions of the other models in a round keep spinning into the next
    model's run and take its cores (measured here on 2 cores: dense/50% 1.63x interleaved against
    2.0x with one model per process); a server running one model per process never sees that.
    """
    ort = import_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def export_variant(name: str, model: torch.nn.Module, workdir: Path, providers: list[str], reuse: bool) -> dict[str, Any]:
    """Export one KV-cache decoder (parity-checked at unseen shapes) and describe it."""
    path = workdir / f"{name}.onnx"
    stamp = path.with_suffix(".json")
    fingerprint = json.dumps({"params": n_params(model), "layers": layer_shapes(model),
                              "checksum": float(sum(p.detach().double().sum() for p in model.parameters()))})
    t0 = time.perf_counter()
    exp = None
    if not (reuse and path.is_file() and stamp.is_file() and stamp.read_text() == fingerprint):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = export_onnx(model, path, example_inputs={"input_ids": torch.randint(0, model.config.vocab_size, (2, 16))},
                              kv_cache=True, providers=providers, overwrite=True)
        stamp.write_text(fingerprint)
    return {
        "name": name, "path": path, "params": n_params(model), "linear_params": linear_params(model),
        "layers": layer_shapes(model),
        "export_s": round(time.perf_counter() - t0, 1) if exp else None,
        "export_max_abs_diff": exp.max_abs_diff if exp else "reused",
    }


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def measure(rows: list[dict[str, Any]], args, providers: list[str], spec: str) -> dict[str, Any]:
    """Warm up, then ``args.repeats`` rounds visiting every model once (rotated order)."""
    threads, spinning = parse_threads(spec)
    sessions = [make_session(r["path"], providers, threads, args.opt_level, spinning=spinning) for r in rows]
    kw = dict(batch_size=1, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens)
    for sess in sessions:
        benchmark_latency(sess, warmup=args.warmup, repeats=1, **kw)
    pre = [[] for _ in rows]
    dec = [[] for _ in rows]
    load_before = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for k in range(args.repeats):
        order = [(k + j) % len(rows) for j in range(len(rows))]
        for i in order:
            lat = benchmark_latency(sessions[i], warmup=0, repeats=1, **kw)
            pre[i].append(lat.prefill_ms)
            dec[i].append(lat.decode_ms_per_token)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n_threads = threads or (os.cpu_count() or 1)
    block = {
        "spec": spec, "threads": threads or f"ORT default ({n_threads} on this machine)", "spinning": spinning,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "cpu_share": cpu / (wall * n_threads), "seconds": wall, "models": {},
    }
    block["models"] = _summaries(rows, pre, dec)
    return block


def _summaries(rows: list[dict[str, Any]], pre: list[list[float]], dec: list[list[float]]) -> dict[str, Any]:
    """Per model: median latencies, and against the dense model (row 0) the paired speedups
    (median of per-round ratios), the ratio of medians and the interquartile range."""
    out = {}
    for i, row in enumerate(rows):
        entry = {"prefill_ms": statistics.median(pre[i]), "decode_ms_per_token": statistics.median(dec[i]),
                 "prefill_samples_ms": pre[i], "decode_samples_ms": dec[i]}
        if i:
            for phase, samples in (("prefill", pre), ("decode", dec)):
                paired = [d / p for d, p in zip(samples[0], samples[i], strict=True)]
                entry[f"speedup_{phase}"] = statistics.median(paired)
                entry[f"speedup_{phase}_ratio_of_medians"] = statistics.median(samples[0]) / statistics.median(samples[i])
                q = statistics.quantiles(paired, n=4) if len(paired) >= 4 else [min(paired), 0, max(paired)]
                entry[f"speedup_{phase}_iqr"] = [q[0], q[-1]]
        out[row["name"]] = entry
    return out


_ISOLATED = """
import json, sys, onnxruntime as ort
from fxprune.runtime import benchmark_latency
opts = ort.SessionOptions(); opts.log_severity_level = 3
sess = ort.InferenceSession(sys.argv[1], sess_options=opts, providers=json.loads(sys.argv[2]))
lat = benchmark_latency(sess, warmup=int(sys.argv[3]), repeats=int(sys.argv[4]), batch_size=1,
                        prompt_len=int(sys.argv[5]), decode_tokens=int(sys.argv[6]))
print(json.dumps([lat.prefill_ms, lat.decode_ms_per_token]))
"""


def measure_isolated(rows: list[dict[str, Any]], args, providers: list[str]) -> dict[str, Any]:
    """The cross-check with nothing shared: each model alone in a fresh process with ORT's session
    options untouched (default threads, spinning), ``--isolated-rounds`` rounds visiting every model
    once (rotated order); a process reports the medians of its ``--repeats`` runs."""
    import subprocess

    pre = [[] for _ in rows]
    dec = [[] for _ in rows]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in range(args.isolated_rounds):
        for i in [(k + j) % len(rows) for j in range(len(rows))]:
            out = subprocess.run([sys.executable, "-c", _ISOLATED, str(rows[i]["path"]), json.dumps(providers),
                                  str(args.warmup), str(args.repeats), str(args.prompt_len), str(args.decode_tokens)],
                                 check=True, capture_output=True, text=True, env=env)
            p_ms, d_ms = json.loads(out.stdout.strip().splitlines()[-1])
            pre[i].append(p_ms)
            dec[i].append(d_ms)
    block = {"spec": "isolated", "threads": f"ORT default ({os.cpu_count()} on this machine), one process per model",
             "spinning": True, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_share": float("nan"),
             "seconds": time.perf_counter() - t0, "models": _summaries(rows, pre, dec)}
    return block


def profile_prefill(rows: list[dict[str, Any]], args, providers: list[str], threads: int) -> dict[str, Any]:
    """ORT profiler: milliseconds per op type in one prefill (median of 5), per model."""
    out: dict[str, Any] = {}
    for row in rows:
        sess = make_session(row["path"], providers, threads, args.opt_level, profile=True)
        benchmark_latency(sess, warmup=2, repeats=5, batch_size=1, prompt_len=args.prompt_len, decode_tokens=0)
        trace_path = Path(sess.end_profiling())
        trace = json.loads(trace_path.read_text())
        runs: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        run = -1
        for ev in trace:
            if ev.get("cat") == "Session" and ev.get("name") == "model_run":
                run += 1
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                runs[run][ev.get("args", {}).get("op_name", "?")] += ev["dur"] / 1e3
        per_op = {op: statistics.median(r.get(op, 0.0) for r in runs.values()) for op in set().union(*runs.values())}
        out[row["name"]] = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
        with contextlib.suppress(OSError):
            trace_path.unlink()
    return out


def compare(dense: dict[str, Any], row: dict[str, Any], args) -> dict[str, float]:
    """FLOP and linear-parameter ratios of a pruned row against the dense one."""
    ctx = args.prompt_len + args.decode_tokens / 2
    return {
        "params_removed": 1 - row["params"] / dense["params"],
        "linear_ratio": dense["linear_params"] / row["linear_params"],
        "flop_ratio_prefill": flops_prefill(dense["_model"], args.prompt_len) / flops_prefill(row["_model"], args.prompt_len),
        "flop_ratio_decode": flops_decode(dense["_model"], ctx) / flops_decode(row["_model"], ctx),
    }


_COLUMNS = [("model", 14), ("params", 8), ("removed", 8), ("q/kv", 7), ("mlp", 6), ("linear x", 9), ("FLOP x", 8),
            ("threads", 20), ("prefill ms", 11), ("speedup", 8), ("eff(lin)", 9), ("eff(FLOP)", 10),
            ("decode ms", 10), ("speedup", 8), ("eff(lin)", 9)]


def _threads_label(block: dict[str, Any]) -> str:
    if block["spec"] == "isolated":
        return "default, 1 proc/model"
    return (str(block["threads"]) if isinstance(block["threads"], int) else "ORT default") + (
        "" if block["spinning"] else ", no spin")


def _cells(r: dict[str, Any], m: dict[str, Any], threads: str) -> list[str]:
    """One table row (the columns of :data:`_COLUMNS`) of model ``r`` measured as ``m``."""
    lay = r["layers"]
    shape = f"{_short([x['q_heads'] for x in lay])}/{_short([x['kv_heads'] for x in lay])}"
    head = [r["name"], f"{r['params'] / 1e6:.1f}M"]
    if "speedup_prefill" not in m:
        return head + ["-", shape, _short([x["mlp"] for x in lay]), "1.00", "1.00", threads,
                       f"{m['prefill_ms']:.1f}", "", "", "", f"{m['decode_ms_per_token']:.2f}", "", ""]
    c = r["ratios"]
    return head + [f"{c['params_removed']:.1%}", shape, _short([x["mlp"] for x in lay]),
                   f"{c['linear_ratio']:.2f}", f"{c['flop_ratio_prefill']:.2f}", threads, f"{m['prefill_ms']:.1f}",
                   f"{m['speedup_prefill']:.2f}", f"{m['speedup_prefill'] / c['linear_ratio']:.2f}",
                   f"{m['speedup_prefill'] / c['flop_ratio_prefill']:.2f}", f"{m['decode_ms_per_token']:.2f}",
                   f"{m['speedup_decode']:.2f}", f"{m['speedup_decode'] / c['linear_ratio']:.2f}"]


def _load_line(block: dict[str, Any]) -> str:
    line = f"{_threads_label(block)}: load avg {block['loadavg_before'][0]:.1f} -> {block['loadavg_after'][0]:.1f}"
    if block["cpu_share"] == block["cpu_share"]:  # not NaN (the isolated block runs in child processes)
        line += f", this process got {block['cpu_share']:.0%} of the CPU time its threads could use"
    return line


def print_table(rows: list[dict[str, Any]], blocks: list[dict[str, Any]], target: float) -> None:
    head = "".join(name.ljust(w) if i == 0 else name.rjust(w) for i, (name, w) in enumerate(_COLUMNS))
    print(head)
    print("-" * len(head))
    for block in blocks:
        for r in rows:
            cells = _cells(r, block["models"][r["name"]], _threads_label(block))
            print("".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, _COLUMNS, strict=True))))
        print(f"  [{_load_line(block)}]")
    print(f"target: prefill speedup at ORT's default threads >= {target} x linear ratio")


def markdown_table(payload: dict[str, Any], command: str) -> str:
    """The README table of a results payload: per thread setting, each model's prefill/decode
    speedup against its linear and FLOP ratios (eff = speedup / ratio)."""
    out = [f"ONNX Runtime {payload['machine']['onnxruntime']}, {', '.join(payload['providers'])}, "
           f"batch 1, {payload['protocol']['prompt_len']}-token prefill, {payload['protocol']['decode_tokens']} decode "
           f"tokens, median of {payload['protocol']['repeats']} paired interleaved rounds "
           f"(`{command}`, {payload['machine']['cpus']} shared cores; results in `bench/results/onnx_latency.json`):",
           "",
           "| " + " | ".join(name for name, _ in _COLUMNS) + " |",
           "|" + "---|" * len(_COLUMNS)]
    for block in payload["blocks"]:
        for r in payload["models"]:
            out.append("| " + " | ".join(_cells(r, block["models"][r["name"]], _threads_label(block))) + " |")
    out.append("")
    out.append("Load while measuring (the machine is shared): " + "; ".join(_load_line(b) for b in payload["blocks"]) + ".")
    out.append(f"Target (prefill speedup at ORT's default session options >= {payload['target'].split('>= ')[-1]}): "
               f"{'met' if payload['target_met'] else 'not met'}; per setting: {payload['verdicts']}.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~6M-parameter model (smoke run)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", nargs="+", default=["0", "0:nospin", "1"],
                   help="ORT intra-op thread settings to measure: N (0 = ORT's default count), N:nospin "
                        "(idle threads sleep instead of spin-waiting); default: 0 0:nospin 1")
    p.add_argument("--opt-level", default="all", choices=["disabled", "basic", "extended", "all"],
                   help="ORT graph optimisation level (default all, ORT's default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--importance", default="l2", help="fxprune.prune criterion (l2: no gradients, fast)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    p.add_argument("--round-to", default="auto", help="fxprune.prune round_to (default auto)")
    p.add_argument("--round-to-sweep", type=int, nargs="*", default=[],
                   help="extra variants of the largest ratio with these round_to values")
    p.add_argument("--profile", action="store_true", help="ORT per-op-type breakdown of one prefill per model")
    p.add_argument("--isolated-rounds", type=int, default=5,
                   help="rounds of the cross-check with one fresh process per model and ORT's session options "
                        "untouched (0: skip)")
    p.add_argument("--target", type=float, default=0.9, help="required prefill speedup / linear ratio")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--onnx-dir", type=Path, default=None,
                   help="keep the ONNX files here and reuse them when the same model comes again")
    p.add_argument("--readme", action="store_true",
                   help="write the table between the onnx-latency markers of README.md")
    p.add_argument("--render", type=Path, default=None,
                   help="print (and with --readme write) the table of this results JSON without measuring")
    args = p.parse_args(argv)
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        table = markdown_table(payload, payload.get("command", "python bench/onnx_latency.py"))
        print(table)
        if args.readme:
            replace_readme_section("onnx-latency", table, str(ROOT / "README.md"))
        return 0
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)

    providers = ort_providers(args.device)
    dense = build(dense_config(args))
    print(f"dense: {n_params(dense) / 1e6:.1f}M params; pruning with fxprune.prune(importance={args.importance}, "
          f"allocation={args.allocation}, round_to={round_to}) ...", flush=True)
    variants: list[tuple[str, torch.nn.Module, dict | None]] = [("dense", dense, None)]
    for r in args.ratios:
        model, info = prune_variant(dense, r, args.importance, args.allocation, round_to)
        variants.append((f"pruned{round(r * 100)}", model, info))
    for rt in args.round_to_sweep:
        model, info = prune_variant(dense, max(args.ratios), args.importance, args.allocation, rt)
        variants.append((f"pruned{round(max(args.ratios) * 100)}_rt{rt}", model, info))
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.onnx_dir is not None:
            workdir = args.onnx_dir / ("quick" if args.quick else "full")
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fxprune-onnx-bench-")))
        for name, model, info in variants:
            print(f"[{name}] exporting ...", flush=True)
            row = export_variant(name, model, workdir, providers, reuse=args.onnx_dir is not None)
            rows.append({**row, **({"prune": info} if info else {}), "_model": model})
        for row in rows[1:]:
            row["ratios"] = compare(rows[0], row, args)
        blocks = []
        for spec in args.threads:
            print(f"measuring at threads={spec} (0 = ORT default): {args.warmup} warm-up + {args.repeats} "
                  "interleaved rounds ...", flush=True)
            blocks.append(measure(rows, args, providers, spec))
        if args.isolated_rounds and all(p == "CPUExecutionProvider" for p in providers):
            print(f"measuring one process per model, ORT defaults: {args.isolated_rounds} rounds ...", flush=True)
            blocks.append(measure_isolated(rows, args, providers))
        profile = profile_prefill(rows, args, providers, 0) if args.profile else None
    verdicts: dict[str, dict[str, bool]] = {}
    for block in blocks:
        if isinstance(block["threads"], int):
            continue
        for row in rows[1:]:
            if "_rt" in row["name"]:
                continue
            m = block["models"][row["name"]]
            verdicts.setdefault(block["spec"], {})[row["name"]] = bool(
                m["speedup_prefill"] >= args.target * row["ratios"]["linear_ratio"])
    print()
    print_table(rows, blocks, args.target)
    if profile:
        print_profile(profile)
    ort_default = {**{f"{k}": v for k, v in verdicts.get("0", {}).items()},
                   **{f"{k} (isolated)": v for k, v in verdicts.get("isolated", {}).items()}}
    met = bool(ort_default) and all(ort_default.values())
    print(f"target met at ORT's default session options: {'YES' if met else 'NO'}; per setting: {verdicts}")
    for row in rows:
        row.pop("_model")
        row["path"] = None
    payload = {
        "bench": "onnx_latency",
        "command": "python bench/onnx_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "protocol": {
            "batch": 1, "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens, "warmup": args.warmup,
            "repeats": args.repeats, "statistic": "median of per-round paired ratios (and of latencies)",
            "interleaved": "every round runs every model once, order rotated each round; sessions stop spinning "
                           "when a run returns (session.force_spinning_stop=1) so idle ones do not take the cores "
                           "of the next model's run",
            "isolated": f"{args.isolated_rounds} rounds, each model in a fresh process with ORT's session options "
                        "untouched, medians of --repeats runs per process",
            "flops": "2*linear params per token (incl. LM head) + 4*seq*ctx*heads*head_dim per layer",
            "ort_opt_level": args.opt_level,
            "pruned_variants": f"fxprune.prune(importance={args.importance!r}, allocation={args.allocation!r}, "
                               f"round_to={round_to!r}, default kinds, 2 random-token calibration batches)",
        },
        "target": f"prefill speedup at ORT default threads >= {args.target} x linear ratio",
        "target_met": met,
        "verdicts": verdicts,
        "providers": providers,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "onnxruntime": import_ort().__version__,
                    "note": "shared with other engineers' jobs: see loadavg/cpu_share per block"},
        "dense_config": {k: getattr(dense.config, k) for k in SHAPE_100M},
        "models": rows,
        "blocks": blocks,
        "profile_ms_per_op_type": profile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    if args.readme:
        replace_readme_section("onnx-latency", markdown_table(payload, payload["command"]), str(ROOT / "README.md"))
    return 0


def print_profile(profile: dict[str, dict[str, float]]) -> None:
    """Per op type: ms per prefill in each model and the dense/model ratio (1.0 = does not shrink)."""
    names = list(profile)
    ops = sorted(set().union(*profile.values()), key=lambda op: -profile[names[0]].get(op, 0.0))
    print("\nORT profile, one prefill at default threads (ms per op type; x = dense / model):")
    print(f"{'op':<28}" + "".join(f"{n:>22}" for n in names))
    for op in ops[:14]:
        cells = []
        for n in names:
            v = profile[n].get(op, 0.0)
            ratio = profile[names[0]].get(op, 0.0) / v if v else float("nan")
            cells.append(f"{v:>12.2f} ({ratio:>4.2f}x)")
        print(f"{op:<28}" + "".join(f"{c:>22}" for c in cells))
    totals = [sum(profile[n].values()) for n in names]
    print(f"{'total kernel time':<28}" + "".join(f"{t:>12.2f} ({totals[0] / t:>4.2f}x)" for t in totals))


if __name__ == "__main__":
    raise SystemExit(main())
