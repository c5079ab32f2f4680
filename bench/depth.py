"""Depth and experts, with real weights, no fine-tuning: what whole branches and experts cost.

Part A - depth on the quality LM (``bench/_lm.py``: a Llama trained on the Python standard
library, cached; ``--lm-dir`` points at any checkpoint of that kind).  25% of all parameters
removed by

* depth only (``kinds={"blocks": True}``, width kinds off), with fxprune's ShortGPT, SLEB,
  one-shot loss (``ppl``) and Taylor+ block criteria;
* width only (fxprune's defaults: MLP channels, heads, kv heads, Taylor);
* both under one budget (``kinds={"blocks": True}``, blocks by SLEB or ShortGPT, width by Taylor,
  ``allocation="global"`` and ``"uniform"``);
* independent layer-level baselines written here without fxprune (whole decoder layers deleted
  from the ``ModuleList``): ShortGPT (Men et al. 2024: block influence of each layer on the
  calibration set, lowest first) and SLEB (Song et al. 2024: greedy, re-measured after every
  removal).  A layer is a coarse unit, so they run at the layer counts just below and above
  25% and report the parameters they actually removed.

Metric: perplexity on 64 held-out windows of 128 tokens; calibration: 16 windows of the train
split.  Then ONNX Runtime latency (``fxprune.export_onnx`` with a KV cache +
``fxprune.runtime.benchmark_latency``, 1 thread, warm-up first, interleaved repeats, median)
of the dense model and the depth-pruned ones: prefill of 128 tokens and per-token decode.

Part B - experts.  A small Mixtral-style MoE LM (8 experts, top-2, same corpus and tokenizer)
trained briefly here and cached; 50% of the experts of every layer removed by REAP, by routing
frequency, and at random (3 seeds).  Metric: held-out perplexity.

Usage:  python bench/depth.py [--quick] [--cache DIR] [--lm-dir DIR] [--parts depth,latency,moe] [--readme]
Writes: bench/results/depth.json (atomically); prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _lm  # noqa: E402

import fxprune  # noqa: E402
from fxprune.runtime import benchmark_latency  # noqa: E402
from fxprune.util.publish import atomic_write_text  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "depth.json"
RATIO = 0.25
_MODELS: dict[str, Any] = {}  # pruned models handed from the depth part to the latency part
WIDTH_OFF = {"channels": False, "heads": False, "kv_heads": False}


def log(msg: str) -> None:
    print(msg, flush=True)


def nparams(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write(out: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(RESULTS), json.dumps(out, indent=1, default=str))


# --------------------------------------------------------------------------------------------
# Part A: depth on the LM
# --------------------------------------------------------------------------------------------
def load_lm(args) -> tuple[Path, Any]:
    if args.lm_dir:
        return Path(args.lm_dir), _lm.load_tokenizer(args.lm_dir)
    return _lm.train_or_load_lm(args.cache, quick=args.quick, log=log)


def fx_prune(analysis, calib, **kw) -> tuple[Any, dict]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxprune.prune(analysis, RATIO, calib=calib, progress=False, **kw)
    info = {
        "params_after": res.report.params_after, "ratio_achieved": res.report.ratio_achieved,
        "removed_blocks": res.report.removed_blocks, "returned": res.report.returned,
        "verification": res.report.verification, "seconds": round(time.perf_counter() - t0, 1),
        "plan_groups": len(res.plan),
    }
    return res.model, info


def layer_shortgpt_order(model, calib) -> list[int]:
    """ShortGPT, layer level: block influence 1 - cos(h_in, h_out) per layer, ascending."""
    n = model.config.num_hidden_layers
    bi, count = np.zeros(n), 0
    with torch.no_grad():
        for b in calib:
            hs = model(**b, output_hidden_states=True, use_cache=False).hidden_states
            for i in range(n):
                a, c = hs[i].reshape(-1, hs[i].shape[-1]), hs[i + 1].reshape(-1, hs[i].shape[-1])
                bi[i] += float((1 - torch.nn.functional.cosine_similarity(a, c, dim=-1)).sum())
            count += hs[0].shape[0] * hs[0].shape[1]
    # hidden_states[-1] has the final norm applied in HF Llama: the last layer's input/output
    # comparison is then against the normed state, as in ShortGPT's reference code
    return [int(i) for i in np.argsort(bi / max(count, 1), kind="stable")]


def without_layers(model, drop: list[int]):
    m = copy.deepcopy(model)
    for i in sorted(drop, reverse=True):
        del m.model.layers[i]
    for pos, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = pos
    m.config.num_hidden_layers = len(m.model.layers)
    return m


def calib_nll(model, calib) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in calib:
            logits = model(**b, use_cache=False).logits
            ids = b["input_ids"]
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return total / count


def layer_sleb_order(model, calib, steps: int) -> list[int]:
    """SLEB, layer level: greedily drop the layer whose removal gives the lowest calibration NLL."""
    removed: list[int] = []
    n = model.config.num_hidden_layers
    for _ in range(steps):
        trial = {i: calib_nll(without_layers(model, removed + [i]), calib) for i in range(n) if i not in removed}
        removed.append(min(trial, key=trial.get))
    return removed


def analysed(model, calib) -> Any:
    """The model traced on two calibration rows and analysed."""
    example = {"input_ids": calib[0]["input_ids"][:2], "attention_mask": calib[0]["attention_mask"][:2]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.analyze(fxprune.trace(model, kwargs=example))


def part_depth(args, out: dict) -> None:
    from transformers import LlamaForCausalLM

    model_dir, tok = load_lm(args)
    n_eval, n_calib = (16, 4) if args.quick else (64, 16)
    windows = _lm.heldout_windows(model_dir, n=n_eval, seq_len=128)
    calib = _lm.calib_batches(model_dir, n=n_calib, seq_len=128, batch_size=4)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    dense = nparams(model)
    part: dict[str, Any] = {"model_dir": str(model_dir), "params_dense": dense, "target_ratio": RATIO,
                            "eval_windows": n_eval, "calib_windows": n_calib, "rows": {}}
    out["depth"] = part
    t0 = time.perf_counter()
    part["ppl_dense"] = _lm.perplexity(model, windows)
    log(f"== Part A: {model_dir.name}: {dense:,} params, {model.config.num_hidden_layers} layers, "
        f"held-out ppl {part['ppl_dense']:.3f}")
    analysis = analysed(model, calib)
    part["branches"] = [b.id for b in analysis.blocks[0].branches]
    part["analyze_s"] = round(time.perf_counter() - t0, 1)

    configs = [
        ("depth / shortgpt", dict(kinds={"blocks": True, **WIDTH_OFF}, block_importance="shortgpt")),
        ("depth / sleb", dict(kinds={"blocks": True, **WIDTH_OFF}, block_importance="sleb")),
        ("depth / sleb per-param", dict(kinds={"blocks": True, **WIDTH_OFF}, block_importance="sleb",
                                        block_options={"per_param": True})),
        ("depth / ppl", dict(kinds={"blocks": True, **WIDTH_OFF}, block_importance="ppl")),
        ("depth / taylor+", dict(kinds={"blocks": True, **WIDTH_OFF}, block_importance="taylor+")),
        ("width / taylor", dict(importance="taylor")),
        ("width+depth / taylor+sleb global", dict(kinds={"blocks": True}, importance="taylor", block_importance="sleb",
                                                   allocation="global")),
        ("width+depth / taylor+sleb uniform", dict(kinds={"blocks": True}, importance="taylor", block_importance="sleb",
                                                    allocation="uniform")),
        ("width+depth / taylor+shortgpt global", dict(kinds={"blocks": True}, importance="taylor", block_importance="shortgpt",
                                                       allocation="global")),
    ]
    models = {}
    for name, kw in configs:
        pruned, info = fx_prune(analysis, calib, **kw)
        info["ppl"] = _lm.perplexity(pruned, windows)
        part["rows"][name] = info
        models[name] = pruned
        log(f"  {name:<38} -{info['ratio_achieved']:.1%}  ppl {info['ppl']:8.3f}  "
            f"blocks {info['removed_blocks']}  [{info['seconds']}s]")
        write(out)

    per_layer = (dense - nparams(without_layers(model, [0]))) / dense
    k_lo = max(int(math.floor(RATIO / per_layer)), 1)
    short_order = layer_shortgpt_order(model, calib)
    sleb_order = layer_sleb_order(model, calib, k_lo + 1)
    for k in (k_lo, k_lo + 1):
        for name, order in (("baseline / ShortGPT layers", short_order), ("baseline / SLEB layers", sleb_order)):
            m = without_layers(model, order[:k])
            row = {"layers_removed": sorted(order[:k]), "params_after": nparams(m),
                   "ratio_achieved": 1 - nparams(m) / dense, "ppl": _lm.perplexity(m, windows)}
            part["rows"][f"{name} x{k}"] = row
            log(f"  {name + f' x{k}':<38} -{row['ratio_achieved']:.1%}  ppl {row['ppl']:8.3f}  "
                f"layers {row['layers_removed']}")
    write(out)
    _MODELS.update({"dense": model, **{k: v for k, v in models.items() if k.startswith("depth")}})


# --------------------------------------------------------------------------------------------
# ORT latency
# --------------------------------------------------------------------------------------------
def part_latency(args, out: dict) -> None:
    import onnxruntime as ort

    models = dict(_MODELS)
    if not models:
        log("latency needs the depth part (run --parts depth,latency)")
        return
    rows = {}
    repeats = 3 if args.quick else 10
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, m in models.items():
            path = os.path.join(tmp, f"{abs(hash(name))}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exp = fxprune.export_onnx(m, path, example_inputs={"input_ids": torch.randint(0, 100, (2, 16))},
                                          kv_cache=True)
            so = ort.SessionOptions()
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            sessions[name] = ort.InferenceSession(exp.path, so, providers=["CPUExecutionProvider"])
            rows[name] = {"params": nparams(m), "layers": m.config.num_hidden_layers,
                          "export_max_abs_diff": exp.max_abs_diff, "prefill": [], "decode": []}
        kw = dict(batch_size=1, prompt_len=128, decode_tokens=32)
        for s in sessions.values():
            benchmark_latency(s, warmup=2, repeats=1, **kw)
        names = list(sessions)
        for r in range(repeats):  # interleaved rounds: machine noise hits every model alike
            for name in names[r % len(names):] + names[: r % len(names)]:
                lat = benchmark_latency(sessions[name], warmup=0, repeats=1, **kw)
                rows[name]["prefill"].append(lat.prefill_ms)
                rows[name]["decode"].append(lat.decode_ms_per_token)
    dense = rows["dense"]
    d_pre, d_dec = statistics.median(dense["prefill"]), statistics.median(dense["decode"])
    log("== ORT latency (1 thread, prompt 128, 32 decode tokens, median of interleaved repeats)")
    for name, r in rows.items():
        r["prefill_ms"], r["decode_ms_per_token"] = statistics.median(r["prefill"]), statistics.median(r["decode"])
        r["speedup_prefill"], r["speedup_decode"] = d_pre / r["prefill_ms"], d_dec / r["decode_ms_per_token"]
        r["params_removed"] = 1 - r["params"] / dense["params"]
        log(f"  {name:<20} params -{r['params_removed']:.1%}  prefill {r['prefill_ms']:7.2f} ms "
            f"({r['speedup_prefill']:.2f}x)  decode {r['decode_ms_per_token']:6.2f} ms/tok ({r['speedup_decode']:.2f}x)")
    out["latency"] = {"threads": 1, "prompt_len": 128, "decode_tokens": 32, "repeats": repeats, "rows": rows}
    write(out)


# --------------------------------------------------------------------------------------------
# Part B: experts
# --------------------------------------------------------------------------------------------
MOE_SETTINGS = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "steps": 300,
                "batch_size": 16, "seq_len": 128, "lr": 3e-3, "seed": 0}


def train_or_load_moe(args, model_dir: Path, tok: Any) -> Path:
    """A Mixtral-style LM trained on the same token stream, cached by settings and tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    settings = dict(MOE_SETTINGS, steps=40 if args.quick else MOE_SETTINGS["steps"])
    key = hashlib.sha256(json.dumps([settings, (model_dir / "tokenizer.json").read_bytes().hex()[:4096]],
                                    sort_keys=True).encode()).hexdigest()[:12]
    out_dir = Path(os.path.expanduser(args.cache)) / f"moe-{key}"
    if (out_dir / "train_info.json").exists():
        return out_dir
    train = _lm.token_stream(tok, "train", model_dir)
    eos = tok.token_to_id(_lm.EOS)
    cfg = MixtralConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=512, sliding_window=None,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
                        experts_implementation="eager",
                        **{k: settings[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads",
                                                    "num_local_experts", "num_experts_per_tok")})
    torch.manual_seed(settings["seed"])
    model = MixtralForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(settings["seed"])
    t0 = time.perf_counter()
    steps, seq, bs = settings["steps"], settings["seq_len"], settings["batch_size"]
    losses = []
    for step in range(steps):
        lr = settings["lr"] * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train) - seq, size=bs)
        ids = torch.from_numpy(np.stack([train[s:s + seq] for s in starts]).astype(np.int64))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 6) == 0:
            log(f"  [moe] step {step + 1}/{steps} loss {np.mean(losses[-20:]):.3f} ({time.perf_counter() - t0:.0f}s)")
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(tmp)
    (tmp / "train_info.json").write_text(json.dumps(
        {"settings": settings, "final_loss": float(np.mean(losses[-20:])), "train_s": round(time.perf_counter() - t0, 1),
         "lm_tokenizer": str(model_dir / "tokenizer.json")}, indent=1))
    os.replace(tmp, out_dir)
    return out_dir


def part_moe(args, out: dict) -> None:
    from transformers import MixtralForCausalLM

    model_dir, tok = load_lm(args)
    moe_dir = train_or_load_moe(args, model_dir, tok)
    n_eval, n_calib = (16, 4) if args.quick else (64, 16)
    windows = _lm.heldout_windows(model_dir, n=n_eval, seq_len=128)
    calib = _lm.calib_batches(model_dir, n=n_calib, seq_len=128, batch_size=4)
    model = MixtralForCausalLM.from_pretrained(moe_dir, experts_implementation="grouped_mm").eval()
    dense = nparams(model)
    part: dict[str, Any] = {"model_dir": str(moe_dir), "train_info": json.loads((moe_dir / "train_info.json").read_text()),
                            "params_dense": dense, "experts_removed": "50% of every layer", "rows": {}}
    out["moe"] = part
    part["ppl_dense"] = _lm.perplexity(model, windows)
    log(f"== Part B: MoE {moe_dir.name}: {dense:,} params, {model.config.num_local_experts} experts top-"
        f"{model.config.num_experts_per_tok}; held-out ppl {part['ppl_dense']:.3f}")
    analysis = analysed(model, calib)
    groups = [g for g in analysis if g.kind == "experts"]
    half = model.config.num_local_experts // 2
    from fxprune.passes.experts import score_experts

    def run(name: str, plan: dict) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fxprune.rewrite(model, analysis, plan)
        row = {"params_after": nparams(res.model), "ratio_achieved": 1 - nparams(res.model) / dense,
               "ppl": _lm.perplexity(res.model, windows), "verification": str(res.verification),
               "experts_left": res.model.config.num_local_experts, "removed": {k: list(v) for k, v in plan.items()}}
        part["rows"][name] = row
        log(f"  {name:<16} -{row['ratio_achieved']:.1%} params  ppl {row['ppl']:8.3f}  [{row['verification'][:70]}]")

    for imp in ("reap", "frequency"):
        s = score_experts(model, analysis, calib, importance=imp, progress=False)
        run(imp, {g.id: sorted(int(u) for u in np.argsort(s[g.id], kind="stable")[:half]) for g in groups})
    for seed in range(3):
        rng = np.random.default_rng(seed)
        run(f"random (seed {seed})", {g.id: sorted(int(u) for u in rng.choice(g.size, half, replace=False))
                                      for g in groups})
    rnd = [part["rows"][f"random (seed {s})"]["ppl"] for s in range(3)]
    part["random_mean_ppl"] = float(np.mean(rnd))
    write(out)


def print_summary(out: dict) -> None:
    if "depth" in out:
        d = out["depth"]
        log(f"\nDepth / width at {RATIO:.0%} of {d['params_dense']:,} parameters (dense ppl {d['ppl_dense']:.3f})")
        log(f"{'method':<40}{'removed':>9}{'ppl':>10}{'ppl / dense':>13}")
        for name, r in d["rows"].items():
            log(f"{name:<40}{r['ratio_achieved']:>9.1%}{r['ppl']:>10.3f}{r['ppl'] / d['ppl_dense']:>13.2f}")
    if "moe" in out:
        m = out["moe"]
        log(f"\nMoE: 50% of the experts removed (dense ppl {m['ppl_dense']:.3f})")
        for name, r in m["rows"].items():
            log(f"{name:<40}{r['ratio_achieved']:>9.1%}{r['ppl']:>10.3f}{r['ppl'] / m['ppl_dense']:>13.2f}")
        log(f"REAP / random (mean of 3): {m['rows']['reap']['ppl'] / m['random_mean_ppl']:.2f}x the perplexity")


def readme_section(out: dict) -> str:
    """The README's depth section: the tables of the stored results and the command that made them."""
    cmds = sorted(set((out.get("commands") or {"all": "python bench/depth.py"}).values()))
    lines = ["**Depth and experts** (`bench/depth.py`): whole residual branches and whole MoE experts removed, "
             "found from the graph.", "",
             "Made by " + " and ".join(f"`PYTHONPATH=. {c}`" for c in cmds) + " (results: "
             "`bench/results/depth.json`; `--parts` reruns some parts and keeps the others, `--readme` "
             "only rewrites this section). No fine-tuning after pruning; CPU, shared machine. Runs started: "
             + ", ".join(f"{k} {v}" for k, v in sorted((out.get("parts_started") or {}).items())) + "."]
    if "depth" in out:
        d = out["depth"]
        lines += ["", f"**Depth / width at {d['target_ratio']:.0%} of the parameters** of the quality LM "
                  f"({d['params_dense']:,} params, {len(d['branches'])} branches, dense held-out ppl "
                  f"{d['ppl_dense']:.2f} on {d['eval_windows']} windows of 128 tokens, calibration "
                  f"{d['calib_windows']} windows). Baselines delete whole decoder layers, written without fxprune.",
                  "", "| method | params removed | ppl | ppl / dense | blocks removed |", "|---|---|---|---|---|"]
        for name, r in d["rows"].items():
            blocks = r.get("removed_blocks", [f"layers {r.get('layers_removed')}"])
            blocks = ", ".join(b.replace("model.layers.", "L") for b in blocks) or "-"
            off = "" if name.startswith("baseline") or abs(r["ratio_achieved"] - d["target_ratio"]) < 0.01 else " (off target)"
            lines.append(f"| {name} | {r['ratio_achieved']:.1%}{off} | {r['ppl']:.2f} | {r['ppl'] / d['ppl_dense']:.2f} "
                         f"| {blocks} |")
    if "latency" in out:
        lat = out["latency"]
        lines += ["", f"**ONNX Runtime latency** ({lat['threads']} thread, prompt {lat['prompt_len']} tokens, "
                  f"{lat['decode_tokens']} decode tokens with a KV cache, median of {lat['repeats']} interleaved "
                  "repeats; a shared machine, so the ratios are noisy)", "",
                  "| model | layers | params removed | prefill ms | speedup | decode ms/token | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in lat["rows"].items():
            lines.append(f"| {name} | {r['layers']} | {r['params_removed']:.1%} | {r['prefill_ms']:.1f} | "
                         f"{r['speedup_prefill']:.2f}x | {r['decode_ms_per_token']:.2f} | {r['speedup_decode']:.2f}x |")
    if "moe" in out:
        m = out["moe"]
        info = m["train_info"]["settings"]
        lines += ["", f"**MoE: 50% of the experts of every layer removed** (Mixtral-style, {m['params_dense']:,} "
                  f"params, {info['num_hidden_layers']} layers, {info['num_local_experts']} experts top-"
                  f"{info['num_experts_per_tok']}, trained {info['steps']} steps here; dense ppl {m['ppl_dense']:.2f})",
                  "", "| criterion | params removed | ppl | ppl / dense |", "|---|---|---|---|"]
        for name, r in m["rows"].items():
            lines.append(f"| {name} | {r['ratio_achieved']:.1%} | {r['ppl']:.2f} | {r['ppl'] / m['ppl_dense']:.2f} |")
        lines += ["", f"REAP / random (mean of 3 seeds): {m['rows']['reap']['ppl'] / m['random_mean_ppl']:.2f}x "
                  "the perplexity."]
    return "\n".join(lines)


def update_readme(out: dict) -> None:
    from arch_sweep import replace_readme_section

    replace_readme_section("depth", readme_section(out), str(ROOT / "README.md"))


def kept_parts(parts: list[str], quick: bool) -> dict[str, Any]:
    """The parts of the stored results that this run does not redo (same ``--quick`` setting),
    each with the time its own run started, so that ``--parts moe`` keeps the depth results."""
    try:
        old = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("quick") != quick:
        return {}
    kept: dict[str, Any] = {k: old[k] for k in ("depth", "latency", "moe") if k in old and k not in parts}
    if kept:
        started, commands = old.get("parts_started") or {}, old.get("commands") or {}
        kept["parts_started"] = {k: started.get(k, old.get("started")) for k in kept}
        kept["commands"] = {k: commands.get(k, "python bench/depth.py") for k in kept}
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few windows and a short MoE training (smoke test)")
    ap.add_argument("--cache", default="~/.cache/fxprune-bench", help="trained LM / MoE cache")
    ap.add_argument("--lm-dir", help="use this trained LM checkpoint (tokenizer.json + *_ids.npy) instead")
    ap.add_argument("--parts", default="depth,latency,moe")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--readme", action="store_true", help="only rewrite the README section from the stored results")
    args = ap.parse_args()
    if args.readme:
        update_readme(json.loads(RESULTS.read_text()))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parts = args.parts.split(",")
    out: dict[str, Any] = {"bench": "depth", "quick": args.quick, "torch": torch.__version__,
                           "threads": args.threads, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.update(kept_parts(parts, args.quick))
    out.setdefault("commands", {}).update({k: "python " + " ".join(sys.argv) for k in parts})
    out.setdefault("parts_started", {}).update({k: out["started"] for k in parts})
    t0 = time.perf_counter()
    if "depth" in parts:
        part_depth(args, out)
    if "latency" in parts:
        part_latency(args, out)
    _MODELS.clear()
    if "moe" in parts:
        part_moe(args, out)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write(out)
    print_summary(out)
    update_readme(out)


if __name__ == "__main__":
    main()
