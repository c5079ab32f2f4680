"""Removing units of exact groups gives the same outputs as zeroing them, on every architecture."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import fxprune
from fxprune.passes.rewrite import compare_outputs, verify
from tests import zoo
from tests.conftest import EXPORTABLE, traced


def _random_plan(groups, seed=0, exact_only=True, kinds=None):
    rng = random.Random(seed)
    plan = {}
    for g in groups:
        if (exact_only and not g.exact) or (kinds and g.kind not in kinds):
            continue
        plan[g.id] = sorted(rng.sample(range(g.size), max(1, g.size // 3)))
    return plan


def _rewrite(model, analysis, plan):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.rewrite(model, analysis, plan)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_exact_groups_match_zeroed_original(name):
    model, graph, groups = traced(name)
    plan = _random_plan(groups)
    if not plan:
        pytest.skip("no exact groups")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = _rewrite(model, groups, plan)  # raises VerificationError on any mismatch
    pruned = res.model
    assert res.verification.exact_checked
    # also at a batch/sequence length not used for tracing
    inputs = zoo.ZOO[name].make_inputs(3, 5)
    report = verify(model, pruned, plan, groups, inputs)  # the same judge (float64 where float32 cannot tell)
    assert report.exact_checked
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model must be untouched"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "bert", "vit", "resnet_tiny", "grouped_cnn", "qwen3", "hf_convnext"])
def test_all_groups_give_finite_outputs_of_the_right_shape(name):
    model, graph, groups = traced(name)
    res = _rewrite(model, groups, _random_plan(groups, seed=1, exact_only=False))
    assert res.verification.finite and res.verification.output_shapes_ok


def test_pruned_llama_generates_with_kv_cache_and_updates_config():
    model, graph, groups = traced("llama_gqa")
    plan = {g.id: [0] for g in groups if g.kind in ("kv_heads", "channels")}
    res = _rewrite(model, groups, plan)
    pruned = res.model
    assert type(pruned) is type(model)
    assert res.config_updated
    assert pruned.config.num_key_value_heads == model.config.num_key_value_heads - 1
    assert pruned.config.intermediate_size == model.config.intermediate_size - 1
    assert pruned.config.head_dim == model.config.head_dim  # scale and head_dim unchanged
    ids = torch.tensor([[1, 2, 3, 4]])
    out = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
    # the KV-cache path agrees with a full forward pass
    with torch.no_grad():
        full = pruned(out[:, :-1]).logits[:, -1].argmax(-1)
    assert int(full) == int(out[0, -1])


def test_non_uniform_llama_keeps_its_class_and_per_layer_sizes():
    model, graph, groups = traced("llama_gqa")
    mlp = [g for g in groups if g.kind == "channels"]
    plan = {g.id: list(range(1 + i % 2)) for i, g in enumerate(mlp)}
    res = _rewrite(model, groups, plan)
    pruned = res.model
    sizes = [layer.mlp.gate_proj.out_features for layer in pruned.model.layers]
    assert len(set(sizes)) == 2
    assert not res.config_updated


def test_peft_sees_consistent_linear_sizes():
    model, graph, groups = traced("llama_gqa")
    plan = {g.id: [0, 1] for g in groups if g.kind == "channels"}
    res = _rewrite(model, groups, plan)
    pruned = res.model
    for mod in pruned.modules():
        if isinstance(mod, torch.nn.Linear):
            assert (mod.out_features, mod.in_features) == tuple(mod.weight.shape)


@pytest.mark.parametrize(
    "plan, match",
    [({"no.such:group": [0]}, "unknown group"), (None, "out of range"), ("all", "all")],
)
def test_bad_plans_get_clear_errors(plan, match):
    model, graph, groups = traced("mlp")
    g = groups[0]
    if plan is None:
        plan = {g.id: [g.size + 3]}
    elif plan == "all":
        plan = {g.id: list(range(g.size))}
    with pytest.raises(fxprune.PlanError, match=match):
        fxprune.rewrite(model, groups, plan)


def test_rewritten_program_reexports_with_dynamic_shapes():
    model, graph, groups = traced("llama_gqa")
    plan = _random_plan(groups, kinds={"kv_heads", "channels"})
    program = fxprune.rewrite_graph(groups, plan, reexport=True)
    ep = program.exported_program
    gm = ep.module()
    inputs = zoo.ZOO["llama_gqa"].make_inputs(4, 7)
    out = gm(**inputs, **graph.constant_kwargs)
    assert out[0].shape[:2] == (4, 7)


def test_save_and_load_round_trip(tmp_path):
    for name, kinds in [("llama_gqa", {"kv_heads", "channels"}), ("resnet_tiny", None), ("bert", {"heads", "channels"})]:
        model, graph, groups = traced(name)
        plan = _random_plan(groups, kinds=kinds)
        res = _rewrite(model, groups, plan)
        pruned = res.model
        out = tmp_path / name
        fxprune.save(res, str(out))
        cls = type(pruned)
        loaded = fxprune.load(str(out), cls if hasattr(cls, "config_class") else zoo.ZOO[name].build().__class__)
        inputs = zoo.ZOO[name].make_inputs(2, 6)
        with torch.no_grad():
            ok, _, why = compare_outputs(pruned(**inputs), loaded(**inputs))
        assert ok, f"{name}: {why}"
        with pytest.raises(fxprune.OutputExistsError):
            fxprune.save(res, str(out))


def test_uniform_hf_model_round_trips_through_from_pretrained(tmp_path):
    model, graph, groups = traced("llama_gqa")
    plan = {g.id: [0] for g in groups if g.kind in ("kv_heads", "channels")}
    res = _rewrite(model, groups, plan)
    pruned = res.model
    pruned.save_pretrained(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, again(ids).logits)
