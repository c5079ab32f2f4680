"""MoE experts: found through the routing ops, removed as the masked-router original, scored."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.passes.experts import masked_reference, score_experts
from fxprune.passes.plan import make_plan
from fxprune.passes.rewrite import compare_outputs
from tests import zoo
from tests.conftest import traced

_COMMON = dict(vocab_size=zoo.VOCAB, hidden_size=zoo.HIDDEN, num_attention_heads=zoo.HEADS, num_hidden_layers=1,
               max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="sdpa",
               experts_implementation="batched_mm", **zoo.SPECIAL)
# Not in the shared zoo: built here, one layer.  Qwen3-MoE and DeepSeek-V2 (a shared expert beside
# 4 routed ones, MLA attention) come from the zoo.
EXTRA = {
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        num_key_value_heads=2, intermediate_size=40, num_experts=5, num_experts_per_tok=2)),
}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _inputs(batch: int = 2, seq: int = 8) -> dict:
    ids = torch.randint(3, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 31 + seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """(model, graph, analysis) for a zoo MoE model or one of EXTRA."""
    if name in zoo.ZOO:
        return traced(name)
    import transformers

    cls, cfg_cls, cfg = EXTRA[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**{**_COMMON, **cfg})).eval()
    graph = _quiet(fxprune.trace, model, kwargs=_inputs())
    return model, graph, fxprune.analyze(graph)


MOE = ["mixtral", "mixtral_grouped_mm", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2"]
SIZES = {"mixtral": 3, "mixtral_grouped_mm": 3, "qwen2_moe": 6, "qwen3_moe": 4, "olmoe": 5, "deepseek_v2": 4}


@pytest.mark.parametrize("name", MOE)
def test_experts_are_found_through_the_router(name):
    model, graph, analysis = _model(name)
    groups = [g for g in analysis if g.kind == "experts"]
    layers = model.config.num_hidden_layers
    assert len(groups) == layers and all(g.size == SIZES[name] for g in groups)
    for g in groups:
        assert not g.exact and any("top-k routing" in r for r in g.inexact_reasons)
        names = g.param_names
        assert any(n.endswith("gate.weight") or n.endswith("router.weight") for n in names), names
        assert any("experts" in n for n in names)
        assert not any("shared" in n for n in names), "the shared expert is not an expert"
    assert len(analysis.experts) == len(groups) and all(r.oracle for r in analysis.experts)


@pytest.mark.parametrize("name", MOE)
def test_expert_removal_equals_the_masked_router_original(name):
    model, graph, analysis = _model(name)
    plan = {r.group: [0, SIZES[name] - 1] if SIZES[name] > 3 else [1] for r in analysis.experts}
    res = _quiet(fxprune.rewrite, model, analysis, plan)
    assert res.returned == "module"
    assert res.verification.exact_checked and res.verification.oracle == "masked-router"
    inputs = {**_inputs(3, 5), **graph.constant_kwargs}
    with torch.no_grad():
        ok, _, why = compare_outputs(masked_reference(model, analysis, res.plan, None, (), inputs),
                                     res.model(**inputs))
        assert ok, why
        # and it is a real change: the unmasked original differs
        assert not compare_outputs(model(**inputs), res.model(**inputs))[0]
    removed = len(next(iter(plan.values())))
    count = getattr(res.model.config, "num_local_experts", None) or getattr(res.model.config, "num_experts", None) \
        or res.model.config.n_routed_experts
    assert res.config_updated and count == SIZES[name] - removed


def test_pruned_moe_generates_and_round_trips(tmp_path):
    model, graph, analysis = _model("qwen2_moe")
    res = _quiet(fxprune.rewrite, model, analysis, {r.group: [2] for r in analysis.experts})
    ids = torch.tensor([[5, 6, 7, 8]])
    out = res.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    fxprune.save(res, str(tmp_path / "m"))
    hf = _quiet(type(model).from_pretrained, str(tmp_path / "m"))
    x = _inputs(2, 6)
    with torch.no_grad():
        assert torch.allclose(hf(**x, use_cache=False).logits, res.model(**x, use_cache=False).logits, atol=1e-6)


def test_planner_keeps_at_least_top_k_experts():
    model, graph, analysis = _model("mixtral")
    numel = {k: v.numel() for k, v in model.named_parameters()}
    scores = {g.id: np.arange(g.size, dtype=float) + 1 for g in analysis if g.kind == "experts"}
    plan = _quiet(make_plan, analysis, scores, 0.6, numel=numel, max_group_ratio=1.0,
                  kinds={"experts": True, "channels": False, "heads": False, "kv_heads": False})
    assert plan and all(3 - len(u) >= 2 for u in plan.values())  # top-2 routing over 3 experts


def test_reap_and_frequency_agree_across_expert_implementations_and_see_a_dead_expert():
    batches = [_inputs(2, 12), _inputs(3, 7)]
    per_impl = {}
    for name in ("mixtral", "mixtral_grouped_mm"):
        model, graph, analysis = _model(name)
        per_impl[name] = {imp: score_experts(model, analysis, batches, importance=imp, normalize=None, progress=False)
                          for imp in ("reap", "frequency")}
    for imp in ("reap", "frequency"):
        a, b = per_impl["mixtral"][imp], per_impl["mixtral_grouped_mm"][imp]
        assert all(np.allclose(a[k], b[k]) for k in a)
    freq = per_impl["mixtral"]["frequency"]
    assert all(abs(v.sum() - 1) < 1e-9 for v in freq.values())
    model, graph, analysis = _model("mixtral")
    dead = {n: p.detach().clone() for n, p in model.named_parameters()}
    dead["model.layers.0.mlp.experts.down_proj"][1].zero_()  # expert 1 of layer 0 outputs nothing
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n == "model.layers.0.mlp.experts.down_proj":
                saved = p.detach().clone()
                p.copy_(dead[n])
        try:
            reap = score_experts(model, analysis, batches, importance="reap", normalize=None, progress=False)
        finally:
            for n, p in model.named_parameters():
                if n == "model.layers.0.mlp.experts.down_proj":
                    p.copy_(saved)
    assert reap["model.layers.0.mlp.gate:experts"][1] == 0.0
    assert np.all(reap["model.layers.0.mlp.gate:experts"][[0, 2]] > 0)


class _OddRouter(nn.Module):
    """Top-k indices used in arithmetic fxprune does not follow: the experts must stay frozen."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(16, 4)
        self.w = nn.Parameter(torch.randn(4, 16, 16))

    def forward(self, x):
        _, ids = torch.topk(self.router(x), 1, dim=-1)
        ids = (ids.squeeze(-1) + 1) % 4
        return torch.bmm(self.w[ids], x.unsqueeze(-1)).squeeze(-1)


def test_indices_used_in_arithmetic_freeze_the_experts_with_the_op_named():
    analysis = _quiet(fxprune.analyze, _quiet(fxprune.trace, _OddRouter().eval(), (torch.randn(5, 16),)))
    assert not any(g.kind == "experts" for g in analysis)
    why = analysis.explain("router.weight:0")
    assert "fxprune does not follow" in why and "add" in why


def test_prune_removes_experts_by_reap():
    model, graph, analysis = _model("qwen2_moe")
    res = _quiet(fxprune.prune, analysis, 0.15, calib=[_inputs(2, 12)], progress=False, expert_importance="reap",
                 kinds={"experts": True, "channels": False, "heads": False, "kv_heads": False})
    assert res.plan and all("experts" in gid for gid in res.plan)
    assert "masked in the router" in res.report.verification


def test_a_mixture_of_experts_loses_whole_experts_by_default_and_keeps_them_when_asked():
    """With no kinds given, a graph with routed experts has them pruned next to the width kinds
    (one shot, uniform: measured better than width alone on the trained MoE benchmark LM); the
    report says so, and kinds={"experts": False} keeps every expert."""
    zm = zoo.ZOO["qwen2_moe"]
    calib = [zm.make_inputs(2, 16) for _ in range(2)]
    res = _quiet(fxprune.prune, zm.build(), 0.3, calib=calib, example_inputs=zm.make_inputs(2, 8), progress=False)
    assert res.report.by_kind["experts"]["units"] > 0 and res.report.by_kind["channels"]["units"] > 0
    assert "mixture of experts" in res.report.notes[0]
    assert res.report.timings["capture"] > 0  # the up-front trace is accounted for
    kept = _quiet(fxprune.prune, zm.build(), 0.3, calib=calib, example_inputs=zm.make_inputs(2, 8), progress=False,
                  kinds={"experts": False})
    assert kept.report.by_kind["experts"]["units"] == 0 and not any("mixture" in n for n in kept.report.notes)


def test_flops_count_the_fused_experts_grouped_matmuls():
    """torch's FlopCounterMode has no formula for aten._grouped_mm (transformers 5.x fused experts):
    without one the report's FLOPs would leave the experts out and show no gain from cutting them."""
    from torch.utils.flop_counter import FlopCounterMode

    from fxprune.api import count_flops

    a, b = torch.randn(10, 8), torch.randn(2, 8, 4)
    offs = torch.tensor([4, 10], dtype=torch.int32)
    assert count_flops(lambda: torch._grouped_mm(a, b, offs=offs), {}) == 2 * 10 * 8 * 4
    zm = zoo.ZOO["mixtral_grouped_mm"]
    model, inputs = zm.build(), zm.make_inputs(2, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        model(**inputs)
    assert count_flops(model, inputs) > plain.get_total_flops()
