"""Depth: residual branches found from the graph, removed exactly, planned under one budget."""

from __future__ import annotations

import functools
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.passes.block_scoring import BLOCK_COSTS, register_block_cost, score_blocks
from fxprune.passes.plan import count_params_after, make_plan
from fxprune.passes.rewrite import compare_outputs, zeroed_copy
from tests import zoo
from tests.conftest import traced

# (branches found, removable units): two per pre-norm layer, one per parallel (GPT-NeoX, Falcon)
# or convolutional block; projection shortcuts are found but frozen.
EXPECTED = {
    "llama_gqa": (4, 4), "gemma2": (4, 4), "phi3": (4, 4), "gpt2": (4, 4), "opt": (4, 4),
    "gpt_neox": (2, 2), "falcon": (2, 2), "mixtral": (4, 4), "qwen2_moe": (4, 4),
    "bert": (4, 4), "distilbert": (4, 4), "vit": (4, 4),
    "hf_resnet": (3, 1), "hf_convnext": (3, 3), "hf_mobilenet_v2": (10, 10), "resnet_tiny": (2, 1),
    "gqa_sdpa_attn": (2, 2), "torch_mha": (2, 2), "concat_cnn": (0, 0), "mlp": (0, 0),
}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _units(analysis) -> int:
    return analysis.blocks[0].size if analysis.blocks else 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_branch_detection_counts_on_the_zoo(name):
    _, _, analysis = traced(name)
    found, units = EXPECTED[name]
    assert (len(analysis.branches), _units(analysis)) == (found, units), [b.id for b in analysis.branches]
    for b in analysis.branches:
        assert b.frozen is None or len(b.frozen) > 20, "a frozen branch says why"
        assert b.removable or b.unit == -1


def test_branches_are_named_after_their_modules_and_layers():
    _, _, analysis = traced("llama_gqa")
    ids = [b.id for b in analysis.branches]
    assert ids == ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    attn = analysis.branches[0]
    assert attn.layer == "model.layers.0"
    assert "model.layers.0.input_layernorm.weight" in attn.params  # the pre-norm belongs to its branch
    assert all(p.startswith("model.layers.0.") for p in attn.params)
    _, _, neox = traced("gpt_neox")
    assert [b.id for b in neox.branches] == ["gpt_neox.layers.0", "gpt_neox.layers.1"]  # attn + mlp in parallel


def test_projection_shortcuts_are_frozen_with_the_reason():
    _, _, analysis = traced("resnet_tiny")
    frozen = [b for b in analysis.branches if not b.removable]
    assert len(frozen) == 1 and "shortcut is not the identity" in frozen[0].frozen
    assert "conv" in frozen[0].frozen


class _Scaled(nn.Module):
    """A scaled residual ``0.5 * x + f(x)`` and an identity one ``x + g(x)``."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2 = nn.Linear(16, 24), nn.Linear(24, 16)
        self.g1, self.g2 = nn.Linear(16, 24), nn.Linear(24, 16)

    def forward(self, x):
        x = 0.5 * x + self.f2(torch.relu(self.f1(x)))
        return x + self.g2(torch.relu(self.g1(x)))


class _Escaping(nn.Module):
    """A branch whose intermediate value is also returned: it cannot be removed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return x + self.b(h), h


def test_scaled_and_escaping_residuals_are_frozen():
    x = torch.randn(3, 16)
    scaled = _quiet(fxprune.analyze, _quiet(fxprune.trace, _Scaled().eval(), (x,)))
    states = {b.id: b.frozen for b in scaled.branches}
    assert states["g1"] is None and "not the identity" in states["f1"]
    esc = _quiet(fxprune.analyze, _quiet(fxprune.trace, _Escaping().eval(), (x,)))
    assert len(esc.branches) == 1 and "escapes" in esc.branches[0].frozen and not esc.blocks


@pytest.mark.parametrize("name", ["llama_gqa", "bert", "vit", "gpt_neox", "gemma2", "hf_convnext", "gqa_sdpa_attn"])
def test_removing_any_subset_of_branches_equals_zeroing_their_outputs(name):
    model, graph, analysis = traced(name)
    n = _units(analysis)
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    rng = np.random.default_rng(0)
    chosen = [subsets[i] for i in sorted(rng.choice(len(subsets), size=min(2, len(subsets)), replace=False))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = {**zoo.ZOO[name].make_inputs(3, 5), **graph.constant_kwargs}
    for units in chosen:
        plan = {"blocks": list(units)}
        res = _quiet(fxprune.rewrite, model, analysis, plan)  # raises on any mismatch with the oracle
        assert res.returned == "module" and res.verification.exact_checked
        with torch.no_grad():
            ok, diff, why = compare_outputs(zeroed_copy(model, analysis, plan)(**inputs), res.model(**inputs))
        assert ok, (units, why)
        shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
        assert sum(p.numel() for p in res.model.parameters()) == count_params_after(analysis.blocks, plan, shapes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model is untouched"


def test_graph_rewrite_bypasses_the_branch_and_drops_its_tensors():
    model, graph, analysis = traced("llama_gqa")
    program = _quiet(fxprune.rewrite_graph, analysis, {"blocks": [1]}, reexport=True)
    names = {k for k, _ in program.graph_module.named_parameters()}
    assert not any(k.startswith("model.layers.0.mlp.") or k == "model.layers.0.post_attention_layernorm.weight"
                   for k in names)
    assert not any(n.name == "add_9" for n in program.graph_module.graph.nodes)  # the residual add is gone
    assert program.exported_program is not None


def _generate_and_check_cache(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    with torch.no_grad():
        full = model(out, use_cache=False).logits
        first = model(out[:, :6], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        step = model(out[:, 6:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(full[:, 6:], step, atol=1e-5), "the KV-cache path agrees with a full forward"


def test_removed_layer_is_gone_and_config_cache_generate_and_from_pretrained_work(tmp_path):
    model, graph, analysis = traced("llama_gqa")
    res = _quiet(fxprune.rewrite, model, analysis, {"blocks": [0, 1]})  # both branches of layer 0
    pruned = res.model
    assert len(pruned.model.layers) == 1 and res.depth.deleted == {"model.layers": (2, [0])}
    assert pruned.config.num_hidden_layers == 1 and res.config_updated
    assert pruned.model.layers[0].self_attn.layer_idx == 0  # the KV-cache slot follows
    assert not any(k.startswith("model.layers.1.") for k in pruned.state_dict())
    _generate_and_check_cache(pruned)
    fxprune.save(res, str(tmp_path / "m"))
    x = zoo.ZOO["llama_gqa"].make_inputs(2, 6)
    with torch.no_grad():
        ref = pruned(**x, use_cache=False).logits
        back = fxprune.load(str(tmp_path / "m"))
        hf = _quiet(type(model).from_pretrained, str(tmp_path / "m"))
        assert torch.allclose(back(**x, use_cache=False).logits, ref, atol=1e-6)
        assert torch.allclose(hf(**x, use_cache=False).logits, ref, atol=1e-6)


def test_parallel_block_written_as_two_adds_is_one_branch_and_its_layer_goes():
    """GPT-J computes ``attn + mlp + x`` as two adds: one branch per layer, whose removal deletes it."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    model = GPTJForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 6))
    analysis = _quiet(fxprune.analyze, _quiet(fxprune.trace, model, kwargs={"input_ids": ids}))
    assert [b.id for b in analysis.branches] == ["transformer.h.0", "transformer.h.1"]
    assert all(b.removable and len(b.terms) == 2 for b in analysis.branches)
    plan = {"blocks": [1]}
    res = _quiet(fxprune.rewrite, model, analysis, plan)
    assert res.returned == "module" and len(res.model.transformer.h) == 1 and res.model.config.n_layer == 1
    with torch.no_grad():
        ok, _, why = compare_outputs(zeroed_copy(model, analysis, plan)(input_ids=ids), res.model(input_ids=ids))
    assert ok, why


def test_attention_only_removal_replaces_it_by_zeros_and_keeps_the_cache_contiguous(tmp_path):
    model, graph, analysis = traced("llama_gqa")
    res = _quiet(fxprune.rewrite, model, analysis, {"blocks": [0]})  # layer 0's attention only
    pruned = res.model
    from fxprune.passes.depth import ZeroBranch

    assert isinstance(pruned.model.layers[0].self_attn, ZeroBranch)
    assert pruned.model.layers[1].self_attn.layer_idx == 0  # the first remaining attention uses slot 0
    assert not res.config_updated  # the config cannot say "layer 0 has no attention"
    _generate_and_check_cache(pruned)
    fxprune.save(res, str(tmp_path / "m"))
    x = zoo.ZOO["llama_gqa"].make_inputs(2, 6)
    with torch.no_grad():
        assert torch.allclose(fxprune.load(str(tmp_path / "m"))(**x, use_cache=False).logits,
                              pruned(**x, use_cache=False).logits, atol=1e-6)


def test_post_norm_encoder_layers_keep_their_norms():
    model, graph, analysis = traced("bert")
    res = _quiet(fxprune.rewrite, model, analysis, {"blocks": [0, 1]})
    layer = res.model.encoder.layer[0]
    assert len(res.model.encoder.layer) == 2  # LayerNorm(x) is not the identity: the layer stays
    assert {type(layer.attention.self).__name__, type(layer.output.dense).__name__} == {"ZeroBranch"}
    assert layer.attention.output.LayerNorm.weight.shape == (zoo.HIDDEN,)


@pytest.mark.parametrize("kinds", [
    {"blocks": True, "channels": False, "heads": False, "kv_heads": False},
    {"blocks": True},
    {"blocks": 0.25},
])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_depth_and_width_under_one_budget_hit_the_parameter_target(kinds, allocation):
    model, graph, analysis = traced("llama_gqa")
    numel = {k: v.numel() for k, v in model.named_parameters()}
    rng = np.random.default_rng(0)
    scores = {g.id: rng.random(g.size) + 0.5 for g in list(analysis.groups) + list(analysis.blocks)}
    plan = _quiet(make_plan, analysis, scores, 0.3, numel=numel, allocation=allocation, kinds=kinds)
    info = plan.info
    total = sum(numel.values())
    assert abs(info["removed_params"] - 0.3 * total) <= max(info["max_step_params"], 1)
    res = _quiet(fxprune.rewrite, model, analysis, plan)
    assert total - sum(p.numel() for p in res.model.parameters()) == info["removed_params"]  # exact accounting
    if kinds.get("channels") is False:
        assert set(plan) == {"blocks"}
    assert info["removed_blocks"] == [analysis.blocks[0].branches[u].id for u in plan.get("blocks", ())]


def test_keep_blocks_first_last_spare_their_branches():
    model, graph, analysis = traced("llama_gqa")
    numel = {k: v.numel() for k, v in model.named_parameters()}
    scores = {"blocks": np.array([0.1, 0.2, 5.0, 5.0])}
    kinds = {"blocks": True, "channels": False, "heads": False, "kv_heads": False}
    plan = _quiet(make_plan, analysis, scores, 0.2, numel=numel, kinds=kinds, keep_blocks_first=1)
    assert all(analysis.blocks[0].branches[u].layer != "model.layers.0" for u in plan.get("blocks", ()))


@functools.lru_cache(maxsize=None)
def _with_dead_branch(name):
    """The zoo model with branch 1's output projection zeroed (it adds nothing to the stream)."""
    model, graph, analysis = traced(name)
    dead = analysis.blocks[0].branches[1]
    zeroed = zeroed_copy(model, analysis, {"blocks": [1]})
    g2 = _quiet(fxprune.trace, zeroed, kwargs=zoo.ZOO[name].make_inputs(2, 8))
    return zeroed, fxprune.analyze(g2), dead


@pytest.mark.parametrize("name,importance", [("llama_gqa", "shortgpt"), ("llama_gqa", "taylor+"),
                                             ("llama_gqa", "curvature"), ("bert", "sleb"), ("bert", "ppl")])
def test_block_criteria_rank_a_branch_that_does_nothing_lowest(name, importance):
    # an untrained LM's loss can fall when a branch goes, so the loss-based criteria are checked on
    # an encoder, whose loss is the distance to the dense output (zero for the dead branch)
    model, analysis, dead = _with_dead_branch(name)
    batches = [zoo.ZOO[name].make_inputs(2, 12) for _ in range(2)]
    s = score_blocks(model, analysis, batches, importance=importance, progress=False)["blocks"]
    assert s.shape == (4,) and np.all(np.isfinite(s))
    assert int(np.argmin(s)) == 1, s


def test_curvature_scores_come_from_a_registered_cost_model():
    model, graph, analysis = traced("llama_gqa")

    @register_block_cost("test-cost")
    def _cost(model, analysis, group, batches, **kw):
        return np.arange(group.size, dtype=float) + 1.0

    try:
        with pytest.raises(fxprune.ScoringError, match="cost=NAME"):  # two registered: say which
            score_blocks(model, analysis, [graph.example_kwargs], importance="curvature", progress=False)
        s = score_blocks(model, analysis, [graph.example_kwargs], importance="curvature", cost="test-cost",
                         normalize=None, progress=False)
        assert s["blocks"].tolist() == [1.0, 2.0, 3.0, 4.0]
    finally:
        BLOCK_COSTS.pop("test-cost")


def test_prune_depth_only_reports_the_removed_blocks():
    model, graph, analysis = traced("llama_gqa")
    batches = [zoo.ZOO["llama_gqa"].make_inputs(2, 12)]
    res = _quiet(fxprune.prune, analysis, 0.2, calib=batches, block_importance="shortgpt", progress=False,
                 kinds={"blocks": True, "channels": False, "heads": False, "kv_heads": False})
    assert set(res.plan) == {"blocks"} and res.report.removed_blocks
    assert "removed blocks" in res.report.table()
    assert res.report.ratio_achieved > 0.1


def test_cli_depth_flags():
    from fxprune.cli import _depth_kinds, build_parser

    args = build_parser().parse_args(["prune", "m", "--ratio", "0.2", "--depth-only", "--block-importance", "sleb"])
    assert _depth_kinds(args) == {"blocks": True, "channels": False, "heads": False, "kv_heads": False}
    assert args.block_importance == "sleb"
    assert _depth_kinds(build_parser().parse_args(["prune", "m", "--ratio", "0.2", "--depth"])) == {"blocks": True}
    assert _depth_kinds(build_parser().parse_args(["prune", "m", "--ratio", "0.2"])) is None
