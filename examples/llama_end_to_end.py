"""Prune a local Llama-family checkpoint end to end, LLM-Pruner style.

20% of the parameters by first-order Taylor scores on calibration text, LoRA recovery on
Alpaca-format instruction data (json/jsonl with instruction/input/output), merge, save, and
export to ONNX with a KV cache.

Run: python examples/llama_end_to_end.py --model ./llama-dir --calib text.txt --data alpaca.json
     (without --model: a tiny random Llama and generated data, as the smoke test does)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxprune  # noqa: E402


def _tiny_setup(root: str) -> tuple[str, str, str]:
    """A tiny random Llama with a word-level tokenizer, calibration text and Alpaca data."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = ("fxprune removes coupled channels from neural networks and keeps the function exact. " * 50)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text, "instruction input output response"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    model_dir = os.path.join(root, "llama")
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    calib = os.path.join(root, "calib.txt")
    with open(calib, "w") as f:
        f.write(text)
    data = os.path.join(root, "alpaca.json")
    with open(data, "w") as f:
        json.dump([{"instruction": "explain fxprune", "input": "", "output": "fxprune removes coupled channels"}] * 32, f)
    return model_dir, calib, data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="local Llama-family HF directory (with tokenizer files)")
    ap.add_argument("--calib", help="calibration text file")
    ap.add_argument("--data", help="Alpaca-format json/jsonl for LoRA recovery")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=None, help="LoRA steps (default: one epoch)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp()
    if not args.model:
        args.model, args.calib, args.data = _tiny_setup(root)
        args.steps = args.steps or 10
    from transformers import AutoModelForCausalLM

    from fxprune.cli import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    result = fxprune.prune(model, args.ratio, calib=args.calib, tokenizer=tokenizer, importance="taylor",
                           n_samples=16, seq_len=64, progress=False)
    print(result.report.table())
    from fxprune.passes.recovery import recover

    rec = recover(result.model, args.data, method="lora", tokenizer=tokenizer, seq_len=64, max_steps=args.steps,
                  batch_size=4, progress=False)
    print(f"LoRA recovery: loss {rec.loss_before:.3f} -> {rec.loss_after:.3f} in {rec.steps} steps")
    out = args.out or os.path.join(root, "llama-pruned")
    fxprune.save(rec.model, out)
    tokenizer.save_pretrained(out)
    from fxprune.passes.export import export_onnx

    ids = tokenizer(["fxprune removes coupled channels"], return_tensors="pt")["input_ids"].repeat(2, 1)
    exported = export_onnx(rec.model, os.path.join(out, "onnx", "model.onnx"), example_inputs={"input_ids": ids},
                           kv_cache=True)
    print(f"saved to {out}; ONNX with KV cache: {exported.path} (max |diff| {exported.max_abs_diff:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
