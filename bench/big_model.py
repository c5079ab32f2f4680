"""Prune a model bigger than the machine: a Llama-2-7B-shaped checkpoint on a 2-core, 24 GiB CPU box.

What it does, each heavy step in its own subprocess (so peak RSS is that step's own):

1. ``generate``: a Llama-2-7B-shaped checkpoint (hidden 4096, MLP 11008, 32 layers, 32 heads,
   vocab 32000) with random bf16 weights (normal * 0.02, norms 1), about 13.5 GB, written tensor
   by tensor with :class:`fxprune.io.ShardedWriter` (never more than one tensor in memory) under
   ``.cache/big_model/`` (gitignored), after checking the disk has room.  Cached: a ``COMPLETE``
   marker makes later runs skip it.
2. ``prune``: ``prune_sequential(ckpt, 0.2, importance="activation")`` (block-local: exact in
   sequential mode) on 8 calibration windows of 128 random tokens (2 batches of 4), computing in
   float32 on the CPU (the output keeps bf16), then ``save_sequential`` shard by shard.  Reports
   peak RSS (target <= 6 GB), wall time per block, the output's size, and that the output loads on
   meta (``fxprune.load(out, device="meta")``) with the shapes the plan gives.
3. ``plan70b``: a Llama-2-70B shape (hidden 8192, MLP 28672, 80 layers, 64 heads / 8 kv heads) on
   meta: trace, analyse, cut, and the device memory sequential mode needs on one GPU
   (:func:`fxprune.passes.sequential.estimate_memory`: largest block + outside weights + one
   batch's activations), with the CPU/disk the saved activations take.
4. ``fidelity``: how close sequential scores are to in-memory -- the block-local criteria
   (``activation``, ``obs``: exact), the gradient criteria through the streamed backward
   (``taylor*``, and ``surgeon``, whose K-FAC ``G`` comes that way) -- on small random Llama
   (untied) and GPT-2 (tied embeddings) models: max relative score error, rank correlation, and
   whether the 20% plans agree.
5. ``curvature`` (not in the default steps): ``obs`` (or ``--curvature-importance surgeon``) in
   sequential mode, with its update and the save, on a view of the first ``--curvature-layers``
   blocks of the 7B checkpoint: peak RSS and seconds per block pass at 7B widths, where one
   block's statistics dominate.
6. ``--device cuda`` (when a GPU is lent): step 2 on one GPU in bf16, with time and peak GPU
   memory (``torch.cuda.max_memory_allocated``) against the weight bytes.

The machine is shared: children run niced, and a watchdog kills a child whose RSS passes
``--max-rss-gb`` (default 8) or when the machine's available memory drops under 2.5 GiB.

Usage:  python bench/big_model.py [--steps generate,prune,plan70b,fidelity,curvature] [--device cpu|cuda]
Writes: bench/results/big_model.json (atomically)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "big_model"
RESULTS = ROOT / "bench" / "results" / "big_model.json"
CKPT = CACHE / "llama2-7b-random-bf16"

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
RATIO = 0.2
N_SAMPLES, SEQ_LEN, BATCH = 8, 128, 4
TARGET_RSS = 6e9
GB = 1e9


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, architectures=["LlamaForCausalLM"], dtype="bfloat16", tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------
# children
# ------------------------------------------------------------------------------------------
def step_generate() -> dict:
    import torch

    import fxprune
    from fxprune.io import ShardedWriter
    from transformers import LlamaForCausalLM

    if (CKPT / "COMPLETE").exists():
        return {"cached": True, "bytes": _dir_bytes(CKPT), "path": str(CKPT)}
    if CKPT.exists():
        shutil.rmtree(CKPT)
    CKPT.mkdir(parents=True)
    config = _config(LLAMA_7B)
    meta = fxprune.meta_model(LlamaForCausalLM, config)
    entries = [(n, tuple(t.shape), torch.bfloat16) for n, t in meta.state_dict().items()]
    need = sum(torch.Size(s).numel() * 2 for _, s, _ in entries)
    t0 = time.perf_counter()
    writer = ShardedWriter(str(CKPT), entries, max_shard_bytes=5 * 10**9)
    g = torch.Generator().manual_seed(0)
    for name, shape, dtype in entries:
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.randn(shape, dtype=dtype, generator=g).mul_(0.02)
        writer.write(name, t)
        del t
    files = writer.close()
    config.save_pretrained(CKPT)
    (CKPT / "COMPLETE").write_text("ok\n")
    return {"cached": False, "bytes": _dir_bytes(CKPT), "expected_weight_bytes": need, "files": files,
            "seconds": time.perf_counter() - t0, "peak_rss_bytes": _rss_peak(), "path": str(CKPT)}


def step_prune(device: str, out: str) -> dict:
    import torch

    import fxprune
    from fxprune.passes.sequential import prune_sequential, save_sequential

    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, LLAMA_7B["vocab_size"], (BATCH, SEQ_LEN), generator=g)}
               for _ in range(N_SAMPLES // BATCH)]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = prune_sequential(str(CKPT), RATIO, calib=batches, importance="activation", device=device,
                           dtype=None if cuda else torch.float32, example_inputs=batches[0], progress=False)
    t_prune = time.perf_counter() - t0
    if os.path.exists(out):
        shutil.rmtree(out)
    t1 = time.perf_counter()
    save_sequential(res, out, progress=False)
    t_save = time.perf_counter() - t1
    # the output loads on meta (headers only) with the shapes the plan gives
    meta = fxprune.load(out, device="meta")
    got = {n: list(t.shape) for n, t in meta.state_dict().items()}
    want = dict(res.rewrite.shapes)
    layer0 = {k: v for k, v in got.items() if k.startswith("model.layers.0.")}
    blocks = [t for t in res.run.timings if t.block.startswith("model.layers.")]
    row = {
        "device": device,
        "compute_dtype": "bfloat16" if cuda else "float32",
        "calibration": {"windows": N_SAMPLES, "seq_len": SEQ_LEN, "batch_size": BATCH},
        "params_before": res.report.params_before,
        "params_after": res.report.params_after,
        "ratio_achieved": res.report.ratio_achieved,
        "plan_groups": len(res.plan),
        "timings": res.report.timings,
        "prune_s": t_prune,
        "save_s": t_save,
        "wall_s": t_prune + t_save,
        "blocks": [{"block": t.block, "load_s": t.load_s, "compute_s": t.compute_s, "total_s": t.total_s,
                    "weight_bytes": t.weight_bytes} for t in res.run.timings],
        "block_s_mean": sum(t.total_s for t in blocks) / len(blocks),
        "block_load_s_mean": sum(t.load_s for t in blocks) / len(blocks),
        "block_compute_s_mean": sum(t.compute_s for t in blocks) / len(blocks),
        "activations": dict(res.run.activation_bytes),
        "input_bytes": _dir_bytes(CKPT),
        "output_bytes": _dir_bytes(Path(out)),
        "output_files": sorted(os.listdir(out)),
        "loads_on_meta": all(t.device.type == "meta" for t in meta.state_dict().values()),
        "shapes_as_planned": got == want,
        "layer0_shapes": layer0,
        "peak_rss_bytes": _rss_peak(),
        "mode": res.run.mode,
        "cut": res.cut.describe(),
    }
    if cuda:
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        row["gpu"] = torch.cuda.get_device_name()
    return row


def step_curvature(layers: int, importance: str) -> dict:
    """``importance`` (obs / surgeon) in sequential mode on the first ``layers`` blocks of the 7B
    checkpoint (a view: its config with fewer layers, the same shards), with the update and the
    save: peak RSS and time per block at 7B widths, where the statistics of one block
    (``H`` of down_proj alone: 11008² fp32 = 485 MB) dominate."""
    import torch

    from fxprune.passes.sequential import prune_sequential, save_sequential

    torch.set_num_threads(os.cpu_count() or 1)
    view = Path(tempfile.mkdtemp(dir=CACHE, prefix="view-"))
    out = CACHE / "curvature-pruned"
    try:
        for f in CKPT.iterdir():
            if f.suffix in (".safetensors", ".json") and f.name != "config.json":
                (view / f.name).symlink_to(f)
        config = json.loads((CKPT / "config.json").read_text())
        config["num_hidden_layers"] = layers
        (view / "config.json").write_text(json.dumps(config))
        g = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, LLAMA_7B["vocab_size"], (BATCH, SEQ_LEN), generator=g)}
                   for _ in range(N_SAMPLES // BATCH)]
        t0 = time.perf_counter()
        res = prune_sequential(str(view), RATIO, calib=batches, importance=importance, device="cpu",
                               dtype=torch.float32, example_inputs=batches[0], progress=False)
        t_prune = time.perf_counter() - t0
        source = res.scores.stats
        shutil.rmtree(out, ignore_errors=True)
        t1 = time.perf_counter()
        save_sequential(res, str(out), progress=False)
        t_save = time.perf_counter() - t1
        sweeps = [t for run in source.runs for t in run.timings if t.block.startswith("model.layers.")]
        return {
            "importance": importance, "layers": layers, "update": res.report.update,
            "params_before": res.report.params_before, "params_after": res.report.params_after,
            "weight_bytes_bf16": res.report.params_before * 2,
            "prune_s": t_prune, "save_s": t_save, "timings": res.report.timings,
            "block_pass_s_mean": sum(t.total_s for t in sweeps) / max(len(sweeps), 1),
            "block_passes": len(sweeps), "gatherings": source.gatherings,
            "stats_peak_bytes_per_block": source.peak_stats_bytes,
            "updated_tensors": len(res.update.changed) if res.update is not None else 0,
            "peak_rss_bytes": _rss_peak(), "notes": res.report.notes,
        }
    finally:
        shutil.rmtree(view, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def step_plan70b() -> dict:
    import torch

    import fxprune
    from fxprune.passes.sequential import MemoryEstimate, cut_blocks, estimate_memory
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    model = fxprune.meta_model(LlamaForCausalLM, _config(LLAMA_70B))
    ids = torch.zeros(2, 16, dtype=torch.long)
    graph = fxprune.trace(model, kwargs={"input_ids": ids})
    analysis = fxprune.analyze(graph)
    cut = cut_blocks(graph)
    trace_s = time.perf_counter() - t0
    nbytes = {n: p.numel() * 2 for n, p in model.named_parameters()}  # bf16
    h, m = LLAMA_70B["hidden_size"], LLAMA_70B["intermediate_size"]
    rows = {}
    for label, batch, seq in (("1 x 2048", 1, 2048), ("4 x 2048", 4, 2048)):
        est: MemoryEstimate = estimate_memory(cut, nbytes, tokens_per_batch=batch * seq, hidden=h, intermediate=m)
        rows[label] = {"largest_block": est.largest_block, "resident": est.resident, "post": est.post,
                       "activations": est.activations, "device_peak": est.device_peak}
    calib_tokens = 128 * 2048
    out_bytes = calib_tokens * h * 2  # one block's outputs for the whole calibration set, bf16
    return {
        "shape": LLAMA_70B,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes_bf16": sum(nbytes.values()),
        "groups": len(analysis.groups),
        "blocks": len(cut.blocks),
        "trace_analyze_cut_s": trace_s,
        "device_memory": rows,
        "saved_activations_128x2048": {
            "per_block_output_bytes": out_bytes,
            "forward_mode_bytes": 2 * out_bytes,  # the live block's input and output (chain-only blocks dropped)
            "recompute_mode_bytes": len(cut.blocks) * out_bytes,  # every block's output kept for the backward
        },
        "peak_rss_bytes": _rss_peak(),
    }


def step_fidelity() -> dict:
    import tempfile as tf
    import warnings

    import numpy as np
    import torch
    import transformers

    import fxprune
    from fxprune.io import Checkpoint
    from fxprune.passes import sequential as seq

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    models = {
        "llama (untied)": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=1000, max_position_embeddings=256)),
        "gpt2 (tied)": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=256, n_layer=4, n_head=8, vocab_size=1000, n_positions=256)),
    }
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 1000, (2, 64), generator=g)} for _ in range(4)]
    out = {}
    for label, model in models.items():
        model.eval()
        path = tf.mkdtemp(dir=CACHE)
        model.save_pretrained(path)
        analysis = fxprune.analyze(fxprune.trace(model, kwargs=batches[0]))
        skeleton = seq.skeleton_from_checkpoint(path)
        numel = {n: p.numel() for n, p in model.named_parameters()}
        for imp in ("activation", "obs", "taylor", "taylor-element", "taylor-2", "surgeon"):
            t0 = time.perf_counter()
            ref = fxprune.score(model, analysis, batches, importance=imp, progress=False)
            t_mem = time.perf_counter() - t0
            t0 = time.perf_counter()
            run = seq.score_sequential(skeleton, Checkpoint.open(path), analysis, batches, importance=imp,
                                       device="cpu", progress=False)
            t_seq = time.perf_counter() - t0
            rel = max(float(np.max(np.abs(ref[k] - run.scores[k]) / (np.abs(ref[k]) + 1e-30))) for k in ref)
            a = np.concatenate([ref[k] for k in sorted(ref)])
            b = np.concatenate([run.scores[k] for k in sorted(ref)])
            rank = float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])
            plan_a = fxprune.make_plan(analysis, ref, 0.2, numel=numel).as_dict()
            plan_b = fxprune.make_plan(analysis, run.scores, 0.2, numel=numel).as_dict()
            out[f"{label} {imp}"] = {"exact": all(np.array_equal(ref[k], run.scores[k]) for k in ref),
                                     "max_rel_error": rel, "rank_correlation": rank, "same_plan": plan_a == plan_b,
                                     "in_memory_s": t_mem, "sequential_s": t_seq, "mode": run.mode}
        shutil.rmtree(path, ignore_errors=True)
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------
# parent: children under a memory watchdog
# ------------------------------------------------------------------------------------------
def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _vm(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_child(step: str, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--child", step,
           "--device", args.device, *(extra or [])]
    out_file = tempfile.NamedTemporaryFile(prefix=f"big_model_{step}_", suffix=".json", delete=False, dir=CACHE)
    out_file.close()
    cmd += ["--child-out", out_file.name]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = {"killed": None, "min_available": _mem_available(), "max_rss": 0}

    def watchdog() -> None:
        while proc.poll() is None:
            rss = _vm(proc.pid, "VmRSS")
            avail = _mem_available()
            watch["max_rss"] = max(watch["max_rss"], rss)
            watch["min_available"] = min(watch["min_available"], avail)
            if rss > args.max_rss_gb * 2**30 or avail < 2.5 * 2**30:
                watch["killed"] = f"RSS {rss / 2**30:.1f} GiB, machine available {avail / 2**30:.1f} GiB"
                proc.kill()
                return
            time.sleep(0.5)

    t = threading.Thread(target=watchdog, daemon=True)
    t.start()
    log = []
    for line in proc.stdout:  # type: ignore[union-attr]
        log.append(line)
        if args.verbose:
            print("   |", line.rstrip(), flush=True)
    proc.wait()
    t.join()
    wall = time.perf_counter() - t0
    row: dict = {"step": step, "subprocess_wall_s": wall, "watch_max_rss_bytes": watch["max_rss"],
                 "watch_min_available_bytes": watch["min_available"]}
    if proc.returncode != 0 or watch["killed"]:
        row["error"] = watch["killed"] or f"exit {proc.returncode}: " + "".join(log[-30:])
    else:
        with open(out_file.name) as f:
            row.update(json.load(f))
    os.unlink(out_file.name)
    return row


def _table(results: dict) -> str:
    lines = []
    p = results.get("prune", {})
    if "error" not in p and p:
        lines += [
            f"{'Llama-2-7B shape, random bf16, ' + p['device']:<48} {'value':>14}  target",
            "-" * 72,
            f"{'checkpoint size (GB)':<48} {p['input_bytes'] / GB:>14.2f}",
            f"{'params before -> after':<48} {p['params_before'] / 1e9:>6.2f}B -> {p['params_after'] / 1e9:.2f}B"
            f"  (-{p['ratio_achieved']:.1%}, target -{RATIO:.0%})",
            f"{'peak RSS, prune + save (GB)':<48} {p['peak_rss_bytes'] / GB:>14.2f}  <= {TARGET_RSS / GB:.0f}"
            f"  {'met' if p['peak_rss_bytes'] <= TARGET_RSS else 'NOT met'}",
            f"{'per block: load / compute / total (s)':<48} {p['block_load_s_mean']:>4.1f} / "
            f"{p['block_compute_s_mean']:.1f} / {p['block_s_mean']:.1f}",
            f"{'prune wall (s): trace+score+plan+meta rewrite':<48} {p['prune_s']:>14.1f}",
            f"{'save wall (s), shard by shard':<48} {p['save_s']:>14.1f}",
            f"{'output size (GB), ratio to input':<48} {p['output_bytes'] / GB:>14.2f}  "
            f"({p['output_bytes'] / p['input_bytes']:.2f}x)",
            f"{'output loads on meta with the planned shapes':<48} "
            f"{'yes' if p['loads_on_meta'] and p['shapes_as_planned'] else 'NO':>14}",
        ]
        if "peak_gpu_bytes" in p:
            lines.append(f"{'peak GPU memory (GB) / weight bytes':<48} {p['peak_gpu_bytes'] / GB:>14.2f}  "
                         f"({p['peak_gpu_bytes'] / p['input_bytes']:.2f}x of {p['input_bytes'] / GB:.1f} GB)")
    elif p:
        lines.append(f"prune: {p['error'].splitlines()[0]}")
    q = results.get("plan70b", {})
    if q and "error" not in q:
        lines += ["", f"Llama-2-70B shape on meta: {q['params'] / 1e9:.1f}B params, {q['weight_bytes_bf16'] / GB:.0f} GB "
                      f"bf16, {q['blocks']} blocks, traced+analysed+cut in {q['trace_analyze_cut_s']:.0f} s",
                  f"{'one GPU, sequential (GB)':<26} {'block':>7} {'resident':>9} {'post':>6} {'acts':>6} {'peak':>7}"]
        for label, r in q["device_memory"].items():
            lines.append(f"{'  batch ' + label:<26} {r['largest_block'] / GB:>7.2f} {r['resident'] / GB:>9.2f} "
                         f"{r['post'] / GB:>6.2f} {r['activations'] / GB:>6.2f} {r['device_peak'] / GB:>7.2f}")
        s = q["saved_activations_128x2048"]
        lines.append(f"  saved block outputs (CPU/disk), 128 x 2048 calibration: {s['forward_mode_bytes'] / GB:.1f} GB "
                     f"block-local, {s['recompute_mode_bytes'] / GB:.0f} GB with gradients (recompute)")
    elif q:
        lines.append(f"plan70b: {q['error'].splitlines()[0]}")
    for key in ("curvature_obs", "curvature_surgeon"):
        c = results.get(key, {})
        if c and "error" not in c:
            lines += ["", f"{c['importance']} in sequential mode (update + save), first {c['layers']} blocks of the 7B "
                          f"shape: peak RSS {c['peak_rss_bytes'] / GB:.2f} GB, {c['block_pass_s_mean']:.1f} s per block "
                          f"pass ({c['block_passes']} passes, {c['gatherings']} sweeps), statistics "
                          f"{c['stats_peak_bytes_per_block'] / 2**20:.0f} MiB per block, score {c['timings']['score']:.0f} s, "
                          f"update {c['timings']['update']:.0f} s"]
    f = results.get("fidelity", {})
    if f and "error" not in f:
        lines += ["", f"{'sequential vs in-memory scores':<34} {'exact':>6} {'max rel err':>12} {'rank corr':>10} {'same plan':>10}"]
        for k, r in f.items():
            if isinstance(r, dict):
                lines.append(f"{k:<34} {'yes' if r['exact'] else 'no':>6} {r['max_rel_error']:>12.1e} "
                             f"{r['rank_correlation']:>10.6f} {'yes' if r['same_plan'] else 'NO':>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="generate,prune,plan70b,fidelity")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-rss-gb", type=float, default=8.0, help="kill a child past this RSS (GiB)")
    parser.add_argument("--keep-output", action="store_true", help="keep the pruned 7B output under .cache/")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--verbose", action="store_true", help="echo the children's output")
    parser.add_argument("--curvature-layers", type=int, default=4,
                        help="curvature step: blocks of the 7B checkpoint to prune (a view of its first N)")
    parser.add_argument("--curvature-importance", default="obs", choices=["obs", "surgeon"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--prune-out", default=str(CACHE / "llama2-7b-pruned"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)

    if args.child:
        fn = {"generate": step_generate, "prune": lambda: step_prune(args.device, args.prune_out),
              "plan70b": step_plan70b, "fidelity": step_fidelity,
              "curvature": lambda: step_curvature(args.curvature_layers, args.curvature_importance)}[args.child]
        with open(args.child_out, "w") as f:
            json.dump(fn(), f, default=str)
        return 0

    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    results: dict = {}
    if args.out.exists():  # keep earlier steps' results when only some are rerun
        try:
            results = json.loads(args.out.read_text()).get("results", {})
        except ValueError:
            results = {}
    free = shutil.disk_usage(CACHE).free
    need = (0 if (CKPT / "COMPLETE").exists() else 13.6 * GB) + (11 * GB if "prune" in steps else 0) + 5 * GB
    if free < need:
        print(f"not enough disk under {CACHE}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed")
        return 1
    for step in steps:
        if step in ("prune", "curvature") and not (CKPT / "COMPLETE").exists():
            print("prune needs the checkpoint: run the generate step first")
            return 1
        print(f"running {step} (niced child, watchdog at {args.max_rss_gb:g} GiB RSS / 2.5 GiB machine free) ...",
              flush=True)
        key = "prune" if step == "prune" and args.device == "cpu" else (f"prune_{args.device}" if step == "prune" else step)
        extra = (["--curvature-layers", str(args.curvature_layers), "--curvature-importance",
                  args.curvature_importance] if step == "curvature" else None)
        if step == "curvature":
            key = f"curvature_{args.curvature_importance}"
        results[key] = _run_child(step, args, extra)
        r = results[key]
        print(f"  {'error: ' + r['error'].splitlines()[0] if 'error' in r else 'done'} in {r['subprocess_wall_s']:.0f} s",
              flush=True)
        if step == "prune" and not args.keep_output:
            shutil.rmtree(args.prune_out, ignore_errors=True)

    import torch
    import transformers

    print()
    print(_table({**results, "prune": results.get("prune_cuda" if args.device == "cuda" else "prune", {})}))
    p = results.get("prune", {})
    data = {
        "benchmark": "big_model",
        "targets": {"peak_rss_bytes_max": TARGET_RSS, "ratio": RATIO},
        "targets_met": bool(p) and "error" not in p and p["peak_rss_bytes"] <= TARGET_RSS
        and p["loads_on_meta"] and p["shapes_as_planned"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_end": os.getloadavg()[0],
        "gpu_run": "prune_cuda" in results,
        "results": results,
    }
    from fxprune.util.publish import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
