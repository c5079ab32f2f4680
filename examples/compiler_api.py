"""The compiler API step by step: trace -> analyze -> score -> plan -> rewrite -> save.

Run: python examples/compiler_api.py [--model DIR]   (default: a tiny random Llama with GQA)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxprune  # noqa: E402


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16)
    return LlamaForCausalLM(cfg).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local HF causal LM directory (default: tiny random Llama)")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    else:
        model = tiny_llama()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, vocab, (2, 64), generator=gen)} for _ in range(4)]

    # 1. capture: torch.export with dynamic batch/seq
    graph = fxprune.trace(model, kwargs={"input_ids": calib[0]["input_ids"]})
    # 2. analyse: coupled groups, no per-model hints
    analysis = fxprune.analyze(graph)
    print(analysis.summary(max_rows=12))
    # 3. score: Taylor importance with gradient hooks (bounded memory)
    scores = fxprune.score(model, analysis, calib, importance="taylor", progress=False)
    # 4. plan: 25% of all parameters, the same fraction per group kind, sizes multiple of 8
    plan = fxprune.make_plan(analysis, scores, args.ratio, allocation="uniform", round_to=8)
    print(f"plan removes {plan.info['achieved_ratio']:.1%} of the parameters from {len(plan)} groups")
    # 5. rewrite: the user's own class, smaller, verified against the zeroed original
    res = fxprune.rewrite(model, analysis, plan)
    pruned = res.model
    print(type(pruned).__name__, res.verification)
    # 6. save without pickles, reload
    out = args.out or os.path.join(tempfile.mkdtemp(), "pruned")
    fxprune.save(res, out)
    again = fxprune.load(out)
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, again(ids).logits)
    print(f"saved and reloaded from {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
