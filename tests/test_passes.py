"""Pass structure: typed frozen results handed on explicitly, contracts, one source of weights."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch

import fxprune
from fxprune.passes.update import UPDATES, UpdateOutput, register_update
from tests.conftest import traced


def test_every_pass_is_registered_with_its_contracts():
    assert {"trace", "analyze", "score", "make_plan", "update", "rewrite", "gather_stats"} <= set(fxprune.PASSES)
    assert fxprune.PASSES["rewrite"].requires is not None and fxprune.PASSES["rewrite"].ensures is not None


def test_results_are_frozen():
    model, graph, analysis = traced("mlp")
    with pytest.raises(dataclasses.FrozenInstanceError):
        analysis.groups = ()
    g = analysis.groups[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.size = 3
    scores = fxprune.score(model, analysis, None, importance="l2", progress=False)
    with pytest.raises((TypeError, ValueError)):
        scores[g.id][0] = 1.0  # read-only arrays
    plan = fxprune.make_plan(analysis, scores, 0.2)
    with pytest.raises(TypeError):
        plan[g.id] = [0]


def test_a_plan_is_validated_once_and_belongs_to_its_analysis():
    model, graph, analysis = traced("mlp")
    with pytest.raises(fxprune.PlanError, match="unknown group"):
        fxprune.Plan.of(analysis, {"nope:channels": [0]})
    other = traced("llama_gqa")[2]
    plan = fxprune.Plan.of(analysis, {analysis.groups[0].id: [1, 0, 1]})
    assert plan[analysis.groups[0].id] == (0, 1)
    with pytest.raises(fxprune.PlanError, match="another analysis"):
        fxprune.rewrite(other.graph.module, other, plan)


def test_rewrite_needs_the_analysis_not_the_graph():
    model, graph, analysis = traced("mlp")
    with pytest.raises(fxprune.BadInputError, match="Analysis"):
        fxprune.rewrite(model, graph, {analysis.groups[0].id: [0]})


def test_no_side_channels_on_the_graph_or_the_module():
    model, graph, analysis = traced("mlp")
    before_graph = set(vars(graph))
    res = fxprune.rewrite(model, analysis, {analysis.groups[0].id: [0]})
    assert set(vars(graph)) == before_graph
    assert not hasattr(res.model, "fxprune") and not hasattr(model, "fxprune")
    assert res.verification.exact_checked and res.returned == "module"


def test_the_update_is_the_one_source_of_weights_for_both_rewrites():
    """A registered update changes a surviving weight: graph and module both see it, and verify
    compares with the updated-and-zeroed original."""
    model, graph, analysis = traced("mlp")
    group = analysis.groups[0]
    consumer = next(m for m in group.params if m.dim == 1)  # a layer reading the pruned units

    @register_update("test-double")
    def _double(model_, analysis_, plan_, stats_):
        w = dict(model_.named_parameters())[consumer.name]
        return UpdateOutput(changed={consumer.name: w.detach() * 2.0}, notes=("doubled",))

    before = dict(model.named_parameters())[consumer.name].detach().clone()
    try:
        plan = fxprune.Plan.of(analysis, {group.id: [0, 1]})
        weights = fxprune.update(model, analysis, plan, method="test-double")
        assert not weights.is_identity and weights.notes == ("doubled",)
        res = fxprune.rewrite(model, analysis, plan, weights)
        assert res.verification.exact_checked and "doubled" in res.notes
        x = graph.example_args or ()
        kw = {**graph.example_kwargs, **graph.constant_kwargs}
        with torch.no_grad():
            torch.testing.assert_close(res.model(*x, **kw), res.program(*x, **graph.example_kwargs))
            zeroed = fxprune.zeroed_copy(model, analysis, plan, weights)
            torch.testing.assert_close(res.model(*x, **kw), zeroed(*x, **kw))
            plain = fxprune.rewrite(model, analysis, plan).model
            assert not torch.allclose(plain(*x, **kw), res.model(*x, **kw))
        assert torch.equal(dict(model.named_parameters())[consumer.name], before), "the input model is untouched"
    finally:
        del UPDATES["test-double"]


def test_prune_is_the_composition_of_the_passes():
    model, graph, analysis = traced("llama_gqa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxprune.prune(analysis, 0.2, importance="l2", progress=False)
    assert res.analysis is analysis and res.graph is graph
    assert isinstance(res.scores, fxprune.Scores) and isinstance(res.plan, fxprune.Plan)
    assert isinstance(res.rewrite, fxprune.RewriteResult) and res.model is res.rewrite.model
    assert res.report.params_after < res.report.params_before


def test_no_import_cycle():
    # One fresh interpreter; fxprune's modules are dropped from sys.modules before each import, so
    # each module is imported first (a cycle would fail there) while torch is loaded only once.
    mods = ("fxprune.passes.rules", "fxprune.passes.op_rules", "fxprune.passes.analysis", "fxprune.passes.rewrite")
    code = (
        "import importlib, sys\n"
        f"for mod in {mods!r}:\n"
        "    for name in [k for k in sys.modules if k == 'fxprune' or k.startswith('fxprune.')]:\n"
        "        del sys.modules[name]\n"
        "    importlib.import_module(mod)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
