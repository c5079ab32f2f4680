"""Curvature planning end to end: statistics that are exact sums, chunked gathering that changes
nothing, the cost allocation across kinds, and multi-shot pruning on a real HF causal LM."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fxprune
from fxprune.passes import curvature
from fxprune.passes.stats import StatSpec, gather_stats
from fxprune.passes.update import update
from tests import zoo
from tests.conftest import traced
from tests.test_stats import TwoHead, _batches


def _lm_batches(n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 100, (2, 16), generator=g) for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def test_grad_input_sq_and_output_taylor_are_exact_sums():
    model = TwoHead().eval()
    batches = _batches(2)
    spec = {"o": StatSpec(grad_input_sq=True, grad_cov=True), "q": StatSpec(input_cov=True)}
    stats = gather_stats(model, batches, spec, loss_fn=lambda out, b: out.pow(2).mean(), progress=False,
                         dtype=torch.float64)
    o = stats["o"]
    w = model.o.weight.detach().double()
    torch.testing.assert_close(o.gx_sq, torch.diagonal(w.t() @ o.ggT @ w))  # diag(Wᵀ G W), without G
    twice = stats.merge(stats)
    torch.testing.assert_close(twice["o"].gx_sq, 2 * o.gx_sq)
    assert stats["q"].ggT is None and stats["q"].xxT is not None


def test_chunked_gathering_gives_the_same_costs_and_updates():
    model, _, analysis = traced("llama_gqa")
    groups = [g for g in analysis.groups if g.kind in ("channels", "kv_heads", "hidden")]
    batches = _lm_batches()
    whole = curvature.CurvatureSource(model, batches, progress=False)
    chunked = curvature.CurvatureSource(model, batches, budget=1, progress=False)  # one layer per gathering
    a = curvature.group_costs(model, groups, whole, "surgeon")
    b = curvature.group_costs(model, groups, chunked, "surgeon")
    assert whole.gatherings == 1 and chunked.gatherings > 5
    assert chunked.peak_stats_bytes < whole.peak_stats_bytes
    for gid in a.costs:
        np.testing.assert_allclose(a.costs[gid], b.costs[gid], rtol=1e-5)
    plan = fxprune.make_plan(analysis, a.costs, 0.3, allocation="cost", kinds={"head_repeat": False})
    ua, _ = curvature.plan_update(model, analysis, plan, whole, "surgeon")
    ub, _ = curvature.plan_update(model, analysis, plan, chunked, "surgeon")
    assert set(ua) == set(ub) and ua
    for k in ua:
        torch.testing.assert_close(ua[k], ub[k], rtol=1e-5, atol=1e-6)


def test_cost_allocation_chooses_across_kinds_and_kinds_still_override():
    model, _, analysis = traced("llama_gqa")
    scores = fxprune.score(model, analysis, _lm_batches(), importance="surgeon", progress=False)
    assert scores.is_cost and scores.update_method == "surgeon"
    plan = fxprune.make_plan(analysis, scores, 0.4, allocation="cost")
    info = plan.info
    assert abs(info["achieved_ratio"] - 0.4) < 0.03
    by_kind = info["by_kind"]
    assert {"channels", "hidden", "kv_heads", "head_repeat"} <= set(by_kind)
    assert sum(e["params"] for e in by_kind.values()) >= info["removed_params"] * 0.99
    assert "head_dim" not in {analysis.by_id[g].kind for g in plan}  # opt-in for the cost allocation
    only = fxprune.make_plan(analysis, scores, 0.4, allocation="cost",
                             kinds={"channels": True, "hidden": False, "kv_heads": False, "head_repeat": False})
    assert {analysis.by_id[g].kind for g in only} == {"channels"}
    hidden = fxprune.make_plan(analysis, scores, 0.2, allocation="cost", kinds={"hidden": 0.25})
    (gid,) = [g.id for g in analysis.groups if g.kind == "hidden"]
    assert len(hidden[gid]) == round(0.25 * analysis.by_id[gid].size)


def test_one_shot_prune_is_the_passes_composed_and_every_shot_is_verified():
    model, _, analysis = traced("llama_gqa")
    batches = _lm_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = fxprune.prune(analysis, 0.3, calib=batches, importance="obs", shots=1, progress=False)
        scores = fxprune.score(model, analysis, batches, importance="obs", progress=False)
        # prune's default round_to="auto" keeps widths a multiple of 8 elements on CPU
        plan = fxprune.make_plan(analysis, scores, 0.3, allocation="cost",
                                 round_to=fxprune.api.device_round_to(analysis, "cpu"))
        weights = update(model, analysis, plan, scores, method="obs")
        assert one.plan.as_dict() == plan.as_dict()
        assert set(one.weights.changed) == set(weights.changed)
        for k, v in weights.changed.items():
            torch.testing.assert_close(one.weights.changed[k], v)
        two = fxprune.prune(model, 0.3, calib=batches, example_inputs={k: v for k, v in batches[0].items()},
                            importance="obs", shots=2, progress=False)
    rep = two.report
    assert len(rep.shots) == 2 and all("zeroed original" in s["verification"] for s in rep.shots)
    assert rep.shots[0]["target_total"] == 0.15 and rep.shots[1]["target_total"] == 0.3
    assert abs(rep.ratio_achieved - 0.3) < 0.03 and rep.params_before == one.report.params_before
    out = two.model(**batches[0]).logits
    assert torch.isfinite(out).all()


def test_default_prune_uses_the_curvature_criterion_with_its_update():
    _, _, analysis = traced("llama_gqa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxprune.prune(analysis, 0.2, calib=_lm_batches(), progress=False)
    rep = res.report
    assert rep.importance == fxprune.api.DEFAULT_IMPORTANCE and rep.allocation == "cost"
    assert rep.update == rep.importance and not res.weights.is_identity
    assert rep.by_kind and any("costs per member" in n for n in rep.notes)
    assert "cost/param" in rep.table()


def test_auto_shots_is_one_per_fifth_removed_for_curvature_criteria_only():
    from fxprune.api import auto_shots

    calib = ["text"]
    assert [auto_shots(r, "surgeon", calib) for r in (0.1, 0.2, 0.3, 0.5, 0.6)] == [1, 1, 2, 3, 3]
    model, _, _ = traced("llama_gqa")
    assert auto_shots(0.5, None, calib, model) == 3  # a causal LM's default is surgeon
    assert auto_shots(0.5, "taylor", calib) == 1 and auto_shots(0.5, None, None) == 1
    assert auto_shots(0.5, "obs", calib) == 1


def test_default_criterion_is_surgeon_with_a_loss_and_obs_without():
    from fxprune.api import default_importance

    lm, _, _ = traced("llama_gqa")
    enc = torch.nn.Linear(3, 3)
    assert default_importance(lm, None, ["x"]) == "surgeon"
    assert default_importance(enc, None, ["x"]) == "obs"
    assert default_importance(enc, lambda out, b: out.sum(), ["x"]) == "surgeon"
    assert default_importance(lm, None, None) == "l2"


# one model per mechanism the curvature path must read: a module called twice per forward
# (Gemma3n's routers), HF Conv1D (GPT-2), fused qkv (Falcon, Phi-3), full-width q/k norms (OLMo-2),
# experts (Mixtral), an encoder with no loss (BERT: obs)
@pytest.mark.parametrize("name", ["gemma3n", "gpt2", "falcon", "phi3", "olmo2", "mixtral", "bert"])
def test_the_default_criterion_prunes_and_verifies_across_architectures(name):
    from fxprune.api import default_importance

    zm = zoo.ZOO[name]
    model = zm.build()
    calib = [zm.make_inputs(2, 16) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxprune.prune(model, 0.2, calib=calib, example_inputs=zm.make_inputs(2, 8), progress=False)
    rep = res.report
    width, _, experts = rep.importance.partition("+")  # a mixture of experts also loses experts (reap)
    assert width == default_importance(model, None, calib) and experts == ("reap" if res.analysis.experts else "")
    assert rep.update == width and (not res.weights.is_identity or name == "mixtral")
    v = res.rewrite.verification
    exact = all(res.analysis.by_id[g].exact for g in res.plan)  # LayerNorm's hidden width is not
    assert v.finite and v.output_shapes_ok and v.exact_checked == exact  # exact: = the updated model, zeroed
    assert not any("not scored: no linear contraction" in n for n in rep.notes), rep.notes
    assert 0.05 < rep.ratio_achieved < 0.35, (rep.ratio_achieved, rep.notes)
    with torch.no_grad():
        out = res.model(**zm.make_inputs(2, 8))
    logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", None)
    logits = logits if logits is not None else out.last_hidden_state
    assert torch.isfinite(logits).all()


def _mixtral_with_dead_and_loud_channel(zm):
    """The zoo Mixtral with channel 5 of every expert of layer 0 dead and channel 7 loud (x3)."""
    model = zm.build()
    ex = model.model.layers[0].mlp.experts
    inter = ex.down_proj.shape[-1]
    with torch.no_grad():
        for c, k in ((5, 0.0), (7, 3.0)):
            ex.gate_up_proj[:, c].mul_(k)
            ex.gate_up_proj[:, inter + c].mul_(k)
            ex.down_proj[:, :, c].mul_(k)
    return model


def test_fused_expert_weights_get_a_diagonal_fisher_cost_that_ranks_a_dead_channel_first():
    """HF 5.x experts are 3-D parameters indexed in the forward: no module hook sees their tokens,
    so they are costed from per-batch gradients instead of being left free (cost 0)."""
    zm = zoo.ZOO["mixtral"]
    model = _mixtral_with_dead_and_loud_channel(zm)
    calib = [zm.make_inputs(2, 16) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxprune.prune(model, 0.1, calib=calib, example_inputs=zm.make_inputs(2, 8), progress=False)
    assert any("diagonal Fisher" in n for n in res.report.notes), res.report.notes
    cost = np.asarray(res.scores["model.layers.0.mlp.experts:channels"])
    assert cost[5] == 0.0 and np.argmin(cost) == 5 and (np.delete(cost, 5) > 0).all()
    assert cost[7] > np.median(cost)
    assert 5 in res.plan.get("model.layers.0.mlp.experts:channels", ())


@pytest.mark.parametrize("importance,allocation,outcome", [
    ("obs", "cost", "kept"),  # forward-only curvature: no cost, and a norm ranking is not one
    ("flap", "cost", "kept"),
    ("flap", "uniform", "by norm"),  # every channel group loses the same share, ranked by weight norm
    ("obs", "uniform", "by norm"),
])
def test_a_group_the_criterion_cannot_score_is_never_taken_as_free(importance, allocation, outcome):
    """Forward hooks cannot see the per-expert inputs of fused 3-D experts: those channel groups
    score nothing.  They are not cut first as "free": a uniform allocation ranks their units by
    weight norm, any other keeps them whole; a warning says which."""
    zm = zoo.ZOO["mixtral"]
    model = _mixtral_with_dead_and_loud_channel(zm)
    gid = "model.layers.0.mlp.experts:channels"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxprune.prune(model, 0.3, calib=[zm.make_inputs(2, 16) for _ in range(2)], importance=importance,
                            example_inputs=zm.make_inputs(2, 8), progress=False, allocation=allocation,
                            kinds={"experts": False})
    said = [str(w.message) for w in caught if f"cannot score any member of group '{gid}'" in str(w.message)]
    assert said, [str(w.message) for w in caught]
    if outcome == "kept":
        assert gid not in res.plan and gid in res.plan.info["skipped"], res.plan.info["skipped"]
    else:
        assert gid in res.scores.fallback and "weight norm" in said[0]
        removed = res.plan[gid]
        assert 5 in removed and 7 not in removed  # the planted dead channel goes first, the loud one stays
