"""torch-pruning (the peer) on the benchmark LM: run by ``bench/quality.py`` in its own virtualenv.

Why a separate interpreter: torch-pruning 1.6.x hangs in ``BasePruner.__init__``
(``get_all_groups``) on HF Llama under transformers 5.x, and builds in well under a second under
transformers 4.46.3 (see /work/shared/DESIGN.md).  ``quality.py`` creates
``<cache>/tp-venv`` (``--system-site-packages``, so the system torch is reused) with
``transformers==4.46.3`` and ``torch-pruning`` and runs this file there.

Setup follows torch-pruning's ``examples/LLMs/prune_llm.py`` (BasePruner version):

* ``num_heads = {q_proj: n_heads, k_proj: n_kv_heads, v_proj: n_kv_heads}`` per layer,
  ``prune_num_heads=True``, ``prune_head_dims=False`` (RoPE stays intact),
  ``head_pruning_ratio = pruning_ratio`` (hidden size, MLP channels and heads all get the same
  ratio), ``global_pruning=False``, ``ignored_layers=[lm_head]``, ``round_to=4``,
  ``output_transform=lambda x: x.logits``, example input ``tokenizer.encode("Hello world.")``;
* after ``g.prune()`` for every group, the same attribute fix-ups as the example
  (``config.hidden_size``, per-attention ``hidden_size``/``num_heads``/``num_key_value_groups``,
  ``config.intermediate_size``);
* importance: ``tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")`` (the
  example's) or ``tp.importance.GroupTaylorImportance()`` with gradients of the mean LM loss
  over the calibration windows (accumulated with one backward per window, LLM-Pruner style).

The example prunes at a given ``pruning_ratio``; here it is bisected so that the pruned model has
(as nearly as the rounding allows) the same number of parameters as fxprune's result.  With
``round_to=4`` one hidden-size step moves ~1.5% of this model's parameters, so when no ratio lands
within ``--tol`` of the target, the search is repeated with ``round_to=1`` and the closer of the
two is kept (``round_to`` is reported per result).

Input: the checkpoint dir (config.json from transformers 5.x is loaded with a patched copy when
needed; the tokenizer with ``PreTrainedTokenizerFast(tokenizer_file=...)``), eval/calibration
windows as ``.npy`` files.  Output: one JSON object on stdout (and in ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _lm  # noqa: E402  (numpy/torch only at import time)


def load_model(model_dir: Path):
    import transformers

    raw = json.loads((model_dir / "config.json").read_text())
    family = raw.get("model_type", "llama")
    if family == "qwen3":  # Qwen3 needs transformers >= 4.51 (quality.py puts one on sys.path)
        config_cls, model_cls = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    else:
        config_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    patched = []
    # transformers 5.x moved rope_theta into rope_parameters; 4.x reads config.rope_theta.
    rp = raw.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in raw:
        raw["rope_theta"] = rp["rope_theta"]
        patched.append("rope_theta from rope_parameters")
        if rp.get("rope_type", "default") != "default":
            raise SystemExit(f"unsupported rope_parameters for transformers 4.x: {rp}")
    if "dtype" in raw and "torch_dtype" not in raw:
        raw["torch_dtype"] = raw["dtype"]
        patched.append("torch_dtype from dtype")
    config = config_cls(**{k: v for k, v in raw.items() if k not in ("rope_parameters", "dtype")})
    model = model_cls.from_pretrained(str(model_dir), config=config, torch_dtype=torch.float32)
    model.eval()
    return model, {"transformers": transformers.__version__, "config_patches": patched}


def nparams(model) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_at(base, grads, ratio: float, importance: str, round_to: int, example):
    import torch_pruning as tp

    model = copy.deepcopy(base)
    if grads is not None:
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
    cfg = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    is_gqa = cfg.num_attention_heads != cfg.num_key_value_heads
    if importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    else:
        raise SystemExit(f"unknown importance {importance}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unwrapped parameters detected" (RMSNorm weights: fine)
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs=example,
            importance=imp,
            global_pruning=False,
            output_transform=lambda x: x.logits,
            pruning_ratio=ratio,
            ignored_layers=[model.lm_head],
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
            round_to=round_to,
        )
        for g in pruner.step(interactive=True):
            g.prune()
    # Attribute fix-ups, as in examples/LLMs/prune_llm.py.
    model.config.hidden_size = model.lm_head.in_features
    emb = model.model.embed_tokens
    if model.config.tie_word_embeddings and model.lm_head.weight is not emb.weight:
        # torch-pruning prunes the (shared) embedding's hidden columns but leaves the ignored lm_head
        # as it was, untying them; re-tie: the head reads the same kept hidden columns
        model.lm_head.weight = emb.weight
        model.lm_head.in_features = emb.weight.shape[1]
        model.config.hidden_size = emb.weight.shape[1]
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            m.hidden_size = m.q_proj.out_features
            m.num_heads = m.hidden_size // m.head_dim
            model.config.num_attention_heads = m.num_heads
            if not is_gqa:
                m.num_key_value_heads = m.num_heads
                model.config.num_key_value_heads = m.num_heads
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = m.num_heads // model.config.num_key_value_heads
        elif name.endswith("mlp"):
            m.hidden_size = m.gate_proj.in_features
            model.config.intermediate_size = m.gate_proj.out_features
    for p in model.parameters():
        p.grad = None
    del pruner
    model.eval()
    return model


def shapes(model) -> dict:
    a = model.model.layers[0].self_attn
    return {
        "hidden": model.lm_head.in_features,
        "q_heads_per_layer": [l.self_attn.q_proj.out_features // a.head_dim for l in model.model.layers],
        "kv_heads_per_layer": [l.self_attn.k_proj.out_features // a.head_dim for l in model.model.layers],
        "mlp_per_layer": [l.mlp.gate_proj.out_features for l in model.model.layers],
    }


def search(base, grads, target: int, importance: str, round_to: int, example, tol: float, iters: int = 24):
    """Bisect pruning_ratio so that params(pruned) ~= target; return the closest (ratio, params)."""
    lo, hi = 0.0, 0.8
    best = None
    tried = []
    for _ in range(iters):
        mid = (lo + hi) / 2
        try:
            n = nparams(prune_at(base, grads, mid, importance, round_to, example))
        except Exception as e:  # noqa: BLE001 - e.g. every head of a layer removed: ratio too high
            tried.append((round(mid, 5), f"error: {type(e).__name__}: {e}"[:200]))
            hi = mid
            continue
        tried.append((round(mid, 5), n))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (mid, n)
        if abs(n - target) / target <= tol / 4:
            break
        if n > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    return best, tried


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--eval", required=True, help=".npy [n, seq] held-out windows")
    ap.add_argument("--calib", required=True, help=".npy [n, seq] calibration windows (train split)")
    ap.add_argument("--targets", required=True, help="JSON {label: target parameter count}")
    ap.add_argument("--importance", default="taylor,magnitude")
    ap.add_argument("--round-to", type=int, default=4)
    ap.add_argument("--tol", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_all = time.perf_counter()

    import torch_pruning as tp

    model_dir = Path(args.model_dir)
    base, env = load_model(model_dir)
    env["torch_pruning"] = tp.__version__
    env["torch"] = torch.__version__
    tok = _lm.hf_tokenizer(model_dir)  # PreTrainedTokenizerFast(tokenizer_file=...)
    example = torch.tensor(tok.encode("Hello world.")).unsqueeze(0)
    windows = torch.from_numpy(np.load(args.eval).astype(np.int64))
    calib = torch.from_numpy(np.load(args.calib).astype(np.int64))
    targets = json.loads(args.targets)
    out = {"env": env, "params_dense": nparams(base), "ppl_dense": _lm.perplexity(base, windows),
           "example_input": "tokenizer.encode('Hello world.')", "results": {}}

    grads = None
    for importance in [s.strip() for s in args.importance.split(",") if s.strip()]:
        t0 = time.perf_counter()
        g = None
        if importance == "taylor":
            if grads is None:
                model = copy.deepcopy(base)
                model.zero_grad(set_to_none=True)
                for i in range(len(calib)):
                    ids = calib[i:i + 1]
                    loss = model(input_ids=ids, labels=ids).loss / len(calib)
                    loss.backward()
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                del model
            g = grads
        for label, target in targets.items():
            (ratio, n), tried = search(base, g, int(target), importance, args.round_to, example, args.tol)
            round_to = args.round_to
            if abs(n - target) / target > args.tol and args.round_to != 1:
                (ratio1, n1), tried1 = search(base, g, int(target), importance, 1, example, args.tol)
                tried += [("round_to=1",) + t for t in tried1]
                if abs(n1 - target) < abs(n - target):
                    ratio, n, round_to = ratio1, n1, 1
            t_prune = time.perf_counter()
            pruned = prune_at(base, g, ratio, importance, round_to, example)
            prune_s = time.perf_counter() - t_prune
            ppl = _lm.perplexity(pruned, windows)
            out["results"][f"{importance}@{label}"] = {
                "importance": importance,
                "label": label,
                "target_params": int(target),
                "params_after": nparams(pruned),
                "param_mismatch": nparams(pruned) / target - 1.0,
                "ratio_achieved": 1.0 - nparams(pruned) / out["params_dense"],
                "pruning_ratio": ratio,
                "round_to": round_to,
                "ppl": ppl,
                "prune_s": round(prune_s, 2),
                "shapes": shapes(pruned),
                "bisection": tried,
            }
            print(f"[tp] {importance}@{label}: pruning_ratio={ratio:.4f} round_to={round_to} "
                  f"params {nparams(pruned):,} (target {int(target):,}) ppl {ppl:.3f}", file=sys.stderr)
        out.setdefault("seconds", {})[importance] = round(time.perf_counter() - t0, 1)
    out["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    import resource

    out["worker_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    text = json.dumps(out)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
