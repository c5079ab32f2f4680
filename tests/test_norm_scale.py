"""Pruning the width an RMS norm averages over: the rewrite rescales the norm's weight and eps, so
the pruned model equals the original with the removed units zeroed, as a module, as a graph and
after a reload."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import transformers

import fxprune

ONLY_HIDDEN = {"hidden": True, "channels": False, "heads": False, "kv_heads": False, "head_repeat": False}


def _tiny(config_cls, model_cls, **extra):
    cfg = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, **extra)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # norm weights away from their init, so a wrong rescale shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma_untied"])
def test_hidden_width_of_rms_norm_models_is_exact_and_reloads(family, tmp_path):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
           "gemma_untied": (transformers.GemmaConfig, transformers.GemmaForCausalLM)}[family]
    model = _tiny(*cls, **({"tie_word_embeddings": False} if family == "gemma_untied" else {}))
    ex = {"input_ids": torch.randint(0, 64, (2, 8))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxprune.prune(model, 0.2, example_inputs=ex, kinds=ONLY_HIDDEN, progress=False)
    (hidden,) = [g for g in res.analysis.groups if g.kind == "hidden"]
    removed = set(res.plan.get(hidden.id, ()))
    assert hidden.exact and removed
    v = res.rewrite.verification
    assert v.exact_checked, v  # equal to the zeroed original, not just finite
    assert res.report.returned == "module"
    keep = [i for i in range(model.config.hidden_size) if i not in removed]
    kept = len(keep)
    w0 = model.model.norm.weight.detach()[keep]
    offset = 1.0 if family.startswith("gemma") else 0.0  # Gemma's norm multiplies by (1 + weight)
    scale = (model.config.hidden_size / kept) ** 0.5
    if family == "gemma2":  # tied lm_head: the embedding scale's factor sqrt(d'/d) is in the final norm
        scale *= (kept / model.config.hidden_size) ** 0.5
    torch.testing.assert_close(res.model.model.norm.weight.detach(), (w0 + offset) * scale - offset)
    if family != "qwen3":  # every norm holds the same new eps (the config says so), and Gemma's
        # embedding scale, rebuilt from the pruned hidden_size, is folded into the weights
        res.model.save_pretrained(tmp_path)
        again = cls[1].from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(**ex).logits, res.model(**ex).logits, rtol=1e-5, atol=1e-5)


class WeightlessRms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 4)

    def forward(self, x):
        h = self.up(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # no weight to absorb the rescale
        return self.down(h)


def test_rms_norm_without_a_weight_stays_inexact():
    a = fxprune.analyze(fxprune.trace(WeightlessRms(), args=(torch.randn(2, 16),)))
    (g,) = [g for g in a.groups if any(m.name == "up.weight" for m in g.members)]
    assert not g.exact and any("mean" in r for r in g.inexact_reasons)
    assert a.norm_scales == ()
