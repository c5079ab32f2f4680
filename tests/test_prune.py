"""The one-call API: ratio targets, bad input, graph input, and the report a user reads."""

from __future__ import annotations

import pytest
import torch

import fxprune
from tests import zoo
from tests.conftest import traced


def test_prune_hits_ratio_and_verifies():
    model, graph, _ = traced("llama_gqa")
    res = fxprune.prune(graph, 0.2, importance="l2", progress=False)
    assert abs(res.report.ratio_achieved - 0.2) < 0.05
    assert res.report.returned == "module"
    assert "zeroed original" in res.report.verification
    assert res.report.flops_after < res.report.flops_before
    assert "parameters" in res.report.table()
    kinds = res.report.kept_by_kind_and_block
    assert "channels" in kinds and all(0 < v <= 1 for v in kinds["channels"].values())


def test_prune_from_module_with_taylor_and_calibration_batches():
    zm = zoo.ZOO["llama_gqa"]
    model = zm.build()
    batches = [zm.make_inputs(2, 16) for _ in range(2)]
    res = fxprune.prune(model, 0.15, calib=batches, importance="taylor", progress=False)
    assert res.plan and res.report.params_after < res.report.params_before
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), zm.build().state_dict().values()))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half"])
def test_ratio_out_of_range_is_refused(ratio):
    _, graph, _ = traced("mlp")
    with pytest.raises(fxprune.PlanError, match="ratio"):
        fxprune.prune(graph, ratio, importance="l2", progress=False)


def test_unknown_criterion_is_refused_before_any_work():
    _, graph, _ = traced("mlp")
    with pytest.raises(fxprune.PlanError, match="unknown importance"):
        fxprune.prune(graph, 0.2, importance="vibes", progress=False)


def test_empty_calibration_data_is_refused():
    _, graph, _ = traced("mlp")
    with pytest.raises(fxprune.DataError):
        fxprune.prune(graph, 0.2, calib=[], progress=False)
