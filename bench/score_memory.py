"""Peak memory of the scoring pass vs. a plain ``loss.backward()``, on a ~125M-parameter Llama.

Why: gradient-based importance (Taylor) needs gradients, but a plain backward keeps one gradient
per parameter, doubling memory.  The scoring pass folds each gradient into per-channel sums the
moment it is accumulated and frees it, and freezes parameters that no group scores, so its peak
should stay close to the weights alone.  Target: scoring peak / weight bytes <= 1.3.

Each measurement runs in a fresh subprocess so the peaks cannot mix.  Peak is measured as

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the pass;
* CPU:  the peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` right
  before the pass; ``ru_maxrss`` when that is not allowed) minus the RSS before the pass.
  glibc's malloc is pinned to mmap large blocks (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go
  back to the OS and RSS tracks live tensors.

The reported ratio is ``(weight bytes + peak increase) / weight bytes``, i.e. the whole footprint
of the pass relative to the model; ``delta / weights`` is printed too.

Groups come from the real passes by default (``--groups analyze``: ``fxprune.trace`` +
``fxprune.analyze``, restricted to the kinds the planner prunes by default, ``DEFAULT_KINDS``);
``--groups manual`` uses the hand-built Llama groups of :func:`_groups_for` instead, and
``--groups analyze-all`` scores every analysed group.

Usage:  python bench/score_memory.py [--batches 4] [--seq-len 128] [--groups analyze|manual|analyze-all]
Writes: bench/results/score_memory.json
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "score_memory.json"
MODES = ("scoring", "backward")


# --------------------------------------------------------------------------------------------
# model and groups
# --------------------------------------------------------------------------------------------


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def _groups_for(model) -> list:
    """Per-layer MLP-channel, kv-head and head-repeat groups, built by hand (``--groups manual``).

    Not the default any more (that is ``--groups analyze``, the real analysis pass); kept as a
    cross-check that hard-codes the Llama structure independently of ``fxprune.analyze``.
    Layouts follow fxprune.graph: q_proj rows are (kv_head, repeat, head_dim) in row-major order,
    k/v rows are (kv_head, head_dim); head_dim is a frozen class (not a group) here.
    """
    from fxprune.graph import Group, Member
    from fxprune.types import Atom

    cfg = model.config
    n_kv = cfg.num_key_value_heads
    rep = cfg.num_attention_heads // n_kv
    hd = cfg.hidden_size // cfg.num_attention_heads
    groups = []
    for i in range(cfg.num_hidden_layers):
        block = f"model.layers.{i}"
        mlp, att = f"{block}.mlp.", f"{block}.self_attn."
        c_mlp, c_kv, c_rep, c_hd = 10 * i, 10 * i + 1, 10 * i + 2, 10 * i + 3
        lay = (Atom(c_mlp, cfg.intermediate_size),)
        groups.append(Group(
            f"{mlp}gate_proj:channels", "channels", cfg.intermediate_size, True,
            [Member(mlp + "gate_proj.weight", 0, "gate", lay, c_mlp),
             Member(mlp + "up_proj.weight", 0, "up", lay, c_mlp),
             Member(mlp + "down_proj.weight", 1, "down", lay, c_mlp)],
            c_mlp, block=block,
        ))
        q_lay = (Atom(c_kv, n_kv), Atom(c_rep, rep), Atom(c_hd, hd))
        kv_lay = (Atom(c_kv, n_kv), Atom(c_hd, hd))
        groups.append(Group(
            f"{att}k_proj:kv_heads", "kv_heads", n_kv, True,
            [Member(att + "q_proj.weight", 0, "q", q_lay, c_kv),
             Member(att + "k_proj.weight", 0, "k", kv_lay, c_kv),
             Member(att + "v_proj.weight", 0, "v", kv_lay, c_kv),
             Member(att + "o_proj.weight", 1, "o", q_lay, c_kv)],
            c_kv, block=block,
        ))
        groups.append(Group(
            f"{att}q_proj:head_repeat", "head_repeat", rep, True,
            [Member(att + "q_proj.weight", 0, "q", q_lay, c_rep),
             Member(att + "o_proj.weight", 1, "o", q_lay, c_rep)],
            c_rep, block=block,
        ))
    return groups


# --------------------------------------------------------------------------------------------
# memory probes
# --------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Probe:
    """Peak memory increase over a region, on CUDA (allocator) or CPU (RSS)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> "_Probe":
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
        else:
            self.base = _rss_bytes()
            if _reset_peak_rss():
                self.method = "VmHWM after clear_refs"
            else:  # ru_maxrss is monotonic: only meaningful if the pass sets a new maximum
                self.base = max(self.base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                self.method = "ru_maxrss"
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _peak_rss_bytes() if self.method != "ru_maxrss" else (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self.delta = max(self.peak - self.base, 0)


# --------------------------------------------------------------------------------------------
# the two passes (child process)
# --------------------------------------------------------------------------------------------


def _analyzed_groups(model, batch, all_kinds: bool) -> list:
    """The real thing: ``fxprune.trace`` + ``fxprune.analyze``.

    By default only the kinds the planner prunes by default are scored (score what you will
    prune); ``all_kinds`` also scores ``hidden``/``head_dim``/``head_repeat``, which puts the
    embedding and LM head (a weight-sized transient gradient each) into the pass.
    """
    import fxprune
    from fxprune.passes.plan import DEFAULT_KINDS

    graph = fxprune.trace(model, kwargs=dict(batch))
    groups = fxprune.analyze(graph)
    del graph
    return groups if all_kinds else [g for g in groups if DEFAULT_KINDS.get(g.kind, False)]


def _scoring_pass(model, batches, groups) -> None:
    from fxprune.passes.scoring import score

    score(model, groups, batches, importance="taylor", progress=False, device="auto")


def random_batches(n: int, seq_len: int, vocab: int, device: str) -> list[dict]:
    """``n`` seeded batches of one window of random token ids (memory does not depend on them)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})
    return out


def _backward_pass(model, batches, groups) -> None:
    """What a naive implementation does: backprop every batch and keep all gradients."""
    for b in batches:
        out = model(**b, labels=b["input_ids"], use_cache=False)
        out.loss.backward()
        del out


def _child(mode: str, n_batches: int, seq_len: int, groups_from: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(_config()).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = random_batches(n_batches, seq_len, 32000, device)
    with torch.no_grad():  # warm-up: one-time allocations (thread pools, kernels) not counted
        model(**batches[0], use_cache=False)
    groups = []
    if mode == "scoring":  # built outside the probe: only the pass itself is measured
        from fxprune.passes import scoring  # noqa: F401

        if groups_from == "manual":
            groups = _groups_for(model)
        else:
            groups = _analyzed_groups(model, batches[0], all_kinds=groups_from == "analyze-all")
    fn = {"scoring": _scoring_pass, "backward": _backward_pass}[mode]
    t0 = time.perf_counter()
    with _Probe(device) as probe:
        fn(model, batches, groups)
    seconds = time.perf_counter() - t0
    return {
        "mode": mode,
        "groups": groups_from if mode == "scoring" else None,
        "n_groups": len(groups),
        "group_kinds": dict(sorted(collections.Counter(g.kind for g in groups).items())),
        "device": device,
        "method": probe.method,
        "params": n_params,
        "weight_bytes": weight_bytes,
        "baseline_bytes": probe.base,
        "peak_bytes": probe.peak,
        "delta_bytes": probe.delta,
        "delta_over_weights": probe.delta / weight_bytes,
        "peak_over_weights": (weight_bytes + probe.delta) / weight_bytes,
        "seconds": seconds,
        "batches": n_batches,
        "seq_len": seq_len,
    }


# --------------------------------------------------------------------------------------------
# driver (parent process)
# --------------------------------------------------------------------------------------------


def _run_child(mode: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # big blocks via mmap: freed => returned
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", mode, "--batches", str(args.batches),
           "--seq-len", str(args.seq_len), "--groups", args.groups]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    mib = 2**20
    head = f"{'pass':<10} {'weights MiB':>12} {'peak+ MiB':>10} {'peak/weights':>13} {'+/weights':>10} {'sec':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:<10} {r['weight_bytes'] / mib:>12.1f} {r['delta_bytes'] / mib:>10.1f} "
            f"{r['peak_over_weights']:>13.3f} {r['delta_over_weights']:>10.3f} {r['seconds']:>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--groups", choices=("analyze", "manual", "analyze-all"), default="analyze",
        help="analyze (default): fxprune.trace+analyze, default-pruned kinds only; "
             "manual: the hand-built Llama groups (_groups_for); analyze-all: every analyzed group",
    )
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.batches, args.seq_len, args.groups)))
        return 0
    rows = [_run_child(mode, args) for mode in MODES]
    print(_table(rows))
    scoring = rows[0]
    ok = scoring["peak_over_weights"] <= 1.3
    print(f"\nparams {scoring['params'] / 1e6:.1f}M on {scoring['device']} ({scoring['method']}), "
          f"{scoring['n_groups']} groups ({args.groups}: "
          f"{', '.join(f'{v} {k}' for k, v in scoring['group_kinds'].items())}); "
          f"target scoring peak/weights <= 1.3: {'met' if ok else 'NOT met'}")
    result = {
        "benchmark": "score_memory",
        "target_peak_over_weights": 1.3,
        "target_met": ok,
        "groups": args.groups,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
