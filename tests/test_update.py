"""Weight updates (surgeon, obs, flap): what a user relies on when fxprune compensates a removal.

The update must change nothing when the removed units were dead already, must reconstruct a
layer's output when the removed unit was redundant, must leave the rewrite's oracle intact
(updated-and-pruned == updated-and-zeroed), and must say so clearly when statistics are missing
or broken.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import ScoringError
from fxprune.passes import curvature
from fxprune.passes.rewrite import zeroed_copy
from fxprune.passes.stats import StatSpec, gather_stats
from fxprune.passes.update import update

D_IN, D_H, D_OUT = 5, 6, 3


class MLP(nn.Module):
    """x -> fc1 -> relu -> fc2: the hidden channels are one group (rows of fc1, columns of fc2)."""

    def __init__(self, bias2: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(D_IN, D_H)
        self.fc2 = nn.Linear(D_H, D_OUT, bias=bias2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _batches(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, D_IN, generator=g) for _ in range(n)]


def _loss(out, batch):
    return out.pow(2).mean()


def _prepare(model: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = fxprune.trace(model, args=(torch.randn(4, D_IN),))
        analysis = fxprune.analyze(graph)
    (group,) = [g for g in analysis.groups if g.size == D_H]
    return analysis, group


def _update_for(model, analysis, group, units, importance, **options):
    scores = fxprune.score(model, analysis, _batches(), importance=importance, loss_fn=_loss, progress=False,
                           importance_options=options or None)
    plan = {group.id: units}
    return scores, update(model, analysis, plan, scores, method=scores.update_method)


@pytest.mark.parametrize("importance", ["obs", "surgeon"])
def test_update_is_a_no_op_when_the_removed_unit_has_zero_weights(importance):
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[2].zero_()
        model.fc1.bias[2] = 0.0
        model.fc2.weight[:, 2].zero_()
    analysis, group = _prepare(model)
    _, weights = _update_for(model, analysis, group, [2], importance)
    assert weights.changed, "the update ran"
    keep = [i for i in range(D_H) if i != 2]
    torch.testing.assert_close(weights.changed["fc2.weight"][:, keep], model.fc2.weight[:, keep].detach(),
                               atol=1e-6, rtol=1e-6)
    if "fc1.weight" in weights.changed:
        torch.testing.assert_close(weights.changed["fc1.weight"][keep], model.fc1.weight[keep].detach(),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("importance", ["obs", "surgeon"])
def test_update_is_a_no_op_when_the_removed_unit_never_activates(importance):
    model = MLP()
    with torch.no_grad():
        model.fc1.bias[4] = -1e3  # relu(fc1(x))[4] == 0 on every input
    analysis, group = _prepare(model)
    _, weights = _update_for(model, analysis, group, [4], importance)
    keep = [i for i in range(D_H) if i != 4]
    torch.testing.assert_close(weights.changed["fc2.weight"][:, keep], model.fc2.weight[:, keep].detach(),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights.changed["fc2.bias"], model.fc2.bias.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("importance", ["obs", "surgeon"])
def test_removing_a_redundant_unit_with_the_update_reproduces_the_output(importance):
    """Unit 5 duplicates unit 0 (same fc1 row): its output is a linear combination of the others."""
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[5] = model.fc1.weight[0]
        model.fc1.bias[5] = model.fc1.bias[0]
    analysis, group = _prepare(model)
    scores, weights = _update_for(model, analysis, group, [5], importance, damping=1e-7)
    assert int(scores.raw[group.id].argmin()) in (0, 5), "a redundant unit is the cheapest to remove"
    res = fxprune.rewrite(model, analysis, {group.id: [5]}, weights)
    x = torch.cat(_batches(2, seed=7))
    with torch.no_grad():
        want, got = model(x), res.model(x)
        plain = fxprune.rewrite(model, analysis, {group.id: [5]}).model(x)
    assert res.model.fc2.in_features == D_H - 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (plain - want).abs().max() > 100 * (got - want).abs().max(), "without the update the output moves"


@pytest.mark.parametrize("importance", ["obs", "surgeon"])
def test_costs_rank_a_planted_unimportant_unit_cheapest(importance):
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[:, 3] *= 1e-3
        model.fc1.weight[3] *= 1e-3
    analysis, group = _prepare(model)
    scores = fxprune.score(model, analysis, _batches(), importance=importance, loss_fn=_loss, progress=False)
    assert int(scores.raw[group.id].argmin()) == 3
    plan = fxprune.make_plan(analysis, scores, 0.1, allocation="cost")
    assert plan[group.id][0] == 3, "the cost allocation removes it first"


@pytest.mark.parametrize("importance", ["obs", "surgeon", "flap"])
def test_updated_and_pruned_equals_updated_and_zeroed(importance):
    model = MLP(bias2=False)  # flap must add fc2's bias
    analysis, group = _prepare(model)
    scores = fxprune.score(model, analysis, _batches(), importance=importance, loss_fn=_loss, progress=False)
    plan = {group.id: [1, 4]}
    weights = update(model, analysis, plan, scores, method=scores.update_method)
    assert not weights.is_identity
    if importance == "flap":
        assert set(weights.added) == {"fc2.bias"}
    res = fxprune.rewrite(model, analysis, plan, weights)
    assert res.returned == "module" and "zeroed original" in str(res.verification)
    x = torch.cat(_batches(2, seed=3))
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), zeroed_copy(model, analysis, plan, weights)(x))
        torch.testing.assert_close(res.graph_module(x) if hasattr(res, "graph_module") else res.model(x),
                                   res.model(x))


def test_flap_bias_compensation_restores_a_constant_channel():
    model = MLP(bias2=False)
    with torch.no_grad():
        model.fc1.weight[0].zero_()
        model.fc1.bias[0] = 2.0  # channel 0 is the constant 2 after relu
    analysis, group = _prepare(model)
    scores = fxprune.score(model, analysis, _batches(), importance="flap", progress=False)
    weights = update(model, analysis, {group.id: [0]}, scores, method="flap")
    res = fxprune.rewrite(model, analysis, {group.id: [0]}, weights)
    x = torch.cat(_batches(2, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), atol=1e-5, rtol=1e-5)
    assert res.model.fc2.bias is not None


def test_a_layer_no_data_reaches_gets_damped_statistics_and_a_warning():
    model = MLP()
    analysis, group = _prepare(model)
    only_fc1 = gather_stats(model, _batches(), StatSpec(input_cov=True, bias_column=True), layers=["fc1"],
                            progress=False)
    source = curvature.CurvatureSource(model, [])
    source.kept = only_fc1  # fc2 has no statistics: as if no calibration data reached it
    with pytest.warns(UserWarning, match="no calibration data reached layer 'fc2'"):
        gc = curvature.group_costs(model, [group], source, "obs")
    costs = gc.costs[group.id]
    assert costs.shape == (D_H,) and (costs >= 0).all() and costs.sum() > 0
    assert "[no calibration data: damped]" in gc.how["fc2.weight:1"]


def test_nan_in_a_weight_is_a_clear_error_naming_the_layer():
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    analysis, _ = _prepare(model)
    with pytest.raises(ScoringError, match="fc2"):
        fxprune.score(model, analysis, _batches(), importance="obs", progress=False)


def test_nan_in_the_calibration_data_is_a_clear_error():
    model = MLP()
    analysis, _ = _prepare(model)
    bad = _batches()
    bad[1][0, 0] = float("nan")
    with pytest.raises(ScoringError, match="fc2.*NaN"):  # obs gathers the consumer's inputs
        fxprune.score(model, analysis, bad, importance="obs", progress=False)
    with pytest.raises(ScoringError, match="batch 1"):
        fxprune.score(model, analysis, bad, importance="surgeon", loss_fn=_loss, progress=False)
