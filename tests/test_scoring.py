"""Scoring pass: criteria rank a planted unimportant unit last, hooks stay clean, errors are clear."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.errors import DataError, ScoringError
from fxprune.graph import Group, Member
from fxprune.passes import scoring
from fxprune.types import Atom, Concat
from fxprune.passes.scoring import (
    AGGREGATES,
    IMPORTANCE,
    Importance,
    register_importance,
    score,
    unit_sums,
)

HIDDEN = 16
PLANTED = 5
DATA_FREE = {"l1", "l2", "random"}


def _atom(cls: int, size: int) -> tuple:
    return (Atom(cls, size),)


def _mlp_group(prefix: str = "") -> Group:
    """Hidden channels of fc1 -> act -> fc2: fc1 rows, fc1 bias, fc2 columns."""
    lay = _atom(0, HIDDEN)
    members = [
        Member(f"{prefix}0.weight", 0, "fc1", lay, 0),
        Member(f"{prefix}0.bias", 0, "fc1", lay, 0),
        Member(f"{prefix}2.weight", 1, "fc2", lay, 0),
    ]
    return Group("hidden", "channels", HIDDEN, True, members, 0)


def _mlp(planted: int | None = PLANTED, scale: float = 1e-3) -> nn.Sequential:
    """A 2-layer MLP whose channel ``planted`` is scaled down in every weight it owns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 4))
    if planted is not None:
        with torch.no_grad():
            model[0].weight[planted] *= scale
            model[0].bias[planted] *= scale
            model[2].weight[:, planted] *= scale
    return model


def _batches(n: int = 3, rows: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("criterion", sorted(set(IMPORTANCE) - {"random"}))
def test_each_criterion_ranks_planted_unit_last(criterion: str) -> None:
    model = _mlp()
    scores = score(model, [_mlp_group()], _batches(), importance=criterion, progress=False)
    s = scores["hidden"]
    assert s.dtype == np.float64 and s.shape == (HIDDEN,)
    assert int(np.argmin(s)) == PLANTED
    assert np.sort(s)[1] > 10 * s[PLANTED]


@pytest.mark.parametrize("aggregate", sorted(AGGREGATES))
def test_each_aggregate_keeps_planted_unit_last(aggregate: str) -> None:
    s = score(_mlp(), [_mlp_group()], _batches(), aggregate=aggregate, progress=False)["hidden"]
    assert int(np.argmin(s)) == PLANTED


def test_planted_unit_last_with_custom_loss() -> None:
    target = torch.zeros(6, 4)
    s = score(
        _mlp(),
        [_mlp_group()],
        _batches(),
        loss_fn=lambda out, batch: ((out - target) ** 2).mean(),
        progress=False,
    )["hidden"]
    assert int(np.argmin(s)) == PLANTED


@pytest.mark.parametrize(
    "normalize,check",
    [
        ("mean", lambda s: np.isclose(s.mean(), 1.0)),
        ("max", lambda s: np.isclose(s.max(), 1.0)),
        ("sum", lambda s: np.isclose(s.sum(), 1.0)),
    ],
)
def test_normalizers(normalize, check) -> None:
    s = score(_mlp(), [_mlp_group()], None, importance="l2", normalize=normalize)["hidden"]
    assert check(s)


def test_no_normalization_gives_raw_l1() -> None:
    model = _mlp()
    s = score(model, [_mlp_group()], None, importance="l1", normalize=None)["hidden"]
    expected = (
        model[0].weight.abs().sum(1) + model[0].bias.abs() + model[2].weight.abs().sum(0)
    ).detach().double().numpy()
    np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_taylor_is_vectorwise_abs_of_summed_w_times_g() -> None:
    """Check the definition against a plain autograd computation."""
    model = _mlp(planted=None)
    batches = _batches()
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for b in batches:
        model.zero_grad()
        (model(b) ** 2).sum().backward()
        for acc, p in zip(grads, model.parameters()):
            acc += p.grad / len(batches)
    w1, b1, w2, _ = [p.detach() for p in model.parameters()]
    g1, gb1, g2, _ = grads
    expected = ((w1 * g1).sum(1)).abs() + (b1 * gb1).abs() + ((w2 * g2).sum(0)).abs()
    model.zero_grad(set_to_none=True)
    s = score(model, [_mlp_group()], batches, normalize=None, progress=False)["hidden"]
    np.testing.assert_allclose(s, expected.double().numpy(), rtol=1e-4, atol=1e-9)


def test_gradients_are_freed_after_each_backward_and_hooks_removed() -> None:
    model = _mlp()
    group = _mlp_group()
    member_params = [model[0].weight, model[0].bias, model[2].weight]
    seen_grads: list[bool] = []
    seen_flags: list[bool] = []

    def loss_fn(out, batch):
        # runs before this batch's backward, i.e. after the previous batch's backward
        seen_grads.append(all(p.grad is None for p in member_params))
        seen_flags.append(model[2].bias.requires_grad)
        return (out**2).sum()

    model[0].weight.requires_grad_(False)  # a frozen member: scored anyway, flag restored
    old_grad = torch.ones_like(model[2].bias)
    model[2].bias.grad = old_grad  # a pre-existing grad on a non-member: left as it was
    score(model, [group], _batches(4), loss_fn=loss_fn, progress=False)

    assert seen_grads == [True] * 4
    assert seen_flags == [False] * 4  # non-members do not require grad during the pass
    assert all(p.grad is None for p in member_params)
    assert model[2].bias.grad is old_grad
    assert model[0].weight.requires_grad is False
    assert all(p.requires_grad for p in [model[0].bias, model[2].weight, model[2].bias])
    _assert_no_hooks(model)


def _assert_no_hooks(model: nn.Module) -> None:
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_activation_hooks_removed_and_flap_means_exposed() -> None:
    model = _mlp()
    batches = _batches()
    result = score(model, [_mlp_group()], batches, importance="flap", progress=False)
    _assert_no_hooks(model)
    with torch.no_grad():
        hidden = torch.cat([torch.tanh(model[0](b)) for b in batches])
    np.testing.assert_allclose(result.input_mean["2.weight"], hidden.mean(0).double(), atol=1e-6)
    assert result.input_count["2.weight"] == hidden.shape[0]
    assert result.n_batches == 3 and result.n_tokens == 18


def test_nan_loss_names_the_batch_and_restores_state() -> None:
    model = _mlp()
    batches = _batches(4)
    batches[2] = batches[2].clone()
    batches[2][0, 0] = float("nan")
    with pytest.raises(ScoringError, match="batch 2"):
        score(model, [_mlp_group()], batches, progress=False)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    _assert_no_hooks(model)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_nan_gradient_names_batch_and_parameter() -> None:
    model = _mlp()

    class Poisoned(nn.Module):
        def forward(self, x):
            return _NanGrad.apply(x)

    model.insert(1, Poisoned())  # fc1 -> poison -> tanh -> fc2 ; fc2 is now index 3
    group = _mlp_group()
    members = list(group.members)
    members[2] = Member("3.weight", 1, "fc2", group.members[2].layout, 0)
    group = dataclasses.replace(group, members=members)
    with pytest.raises(ScoringError, match=r"batch 0: non-finite gradient for parameter '0\.(weight|bias)'"):
        score(model, [group], _batches(), progress=False)
    _assert_no_hooks(model)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ScoringError, match="unknown importance criterion 'nope'.*taylor"):
        score(_mlp(), [_mlp_group()], _batches(), importance="nope")
    with pytest.raises(ScoringError, match="unknown aggregate"):
        score(_mlp(), [_mlp_group()], _batches(), aggregate="median")
    with pytest.raises(ScoringError, match="unknown normalize"):
        score(_mlp(), [_mlp_group()], _batches(), normalize="zscore")


def test_data_criterion_without_batches_is_a_data_error() -> None:
    with pytest.raises(DataError, match="needs calibration batches"):
        score(_mlp(), [_mlp_group()], None, importance="taylor")
    with pytest.raises(DataError, match="empty"):
        score(_mlp(), [_mlp_group()], [], importance="taylor", progress=False)


def test_groups_not_matching_the_model_are_rejected() -> None:
    bad = Group("g", "channels", 3, True, [Member("0.weight", 0, "n", _atom(0, 3), 0)], 0)
    with pytest.raises(ScoringError, match="has size 3 in the group"):
        score(_mlp(), [bad], None, importance="l1")
    missing = Group("g", "channels", 16, True, [Member("9.weight", 0, "n", _atom(0, 16), 0)], 0)
    with pytest.raises(ScoringError, match="not a parameter"):
        score(_mlp(), [missing], None, importance="l1")


def test_deterministic_under_seed() -> None:
    a = score(_mlp(), [_mlp_group()], _batches(), progress=False, seed=3)["hidden"]
    b = score(_mlp(), [_mlp_group()], _batches(), progress=False, seed=3)["hidden"]
    np.testing.assert_array_equal(a, b)
    r1 = score(_mlp(), [_mlp_group()], None, importance="random", seed=1)["hidden"]
    r2 = score(_mlp(), [_mlp_group()], None, importance="random", seed=1)["hidden"]
    r3 = score(_mlp(), [_mlp_group()], None, importance="random", seed=2)["hidden"]
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, r3)


def test_registry_accepts_new_criteria() -> None:
    @register_importance("test-ones")
    class Ones(Importance):
        def index_scores(self, target, dim, ctx):
            return torch.ones(target.param.shape[dim], dtype=torch.float64)

    try:
        s = score(_mlp(), [_mlp_group()], None, importance="test-ones", normalize=None)["hidden"]
        np.testing.assert_array_equal(s, np.full(HIDDEN, 3.0))  # three members, one index each
    finally:
        del IMPORTANCE["test-ones"]


def test_duplicate_and_tied_members_count_once() -> None:
    group = _mlp_group()
    group = dataclasses.replace(group, members=[*group.members, group.members[0]])
    dup = score(_mlp(), [group], None, importance="l1", normalize=None)["hidden"]
    ref = score(_mlp(), [_mlp_group()], None, importance="l1", normalize=None)["hidden"]
    np.testing.assert_array_equal(dup, ref)


def test_unit_sums_matches_member_indices_for_heads_and_rope_layouts() -> None:
    heads = Member("w", 0, "n", (Atom(7, 3), Atom(8, 4)), 7)  # 3 heads x head_dim 4
    rope = Member("w", 0, "n", (Concat((_atom(9, 2), _atom(9, 2))),), 9)  # same class twice
    for member, size in [(heads, 3), (rope, 2)]:
        values = np.arange(member.dim_size, dtype=np.float64) ** 2
        expected = [values[member.indices([u])].sum() for u in range(size)]
        np.testing.assert_allclose(unit_sums(member, values, size), expected)


def test_conv_channels_activation_and_flap() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        model[0].weight[2] *= 1e-3
        model[0].bias[2] *= 1e-3
        model[2].weight[:, 2] *= 1e-3
    lay = _atom(0, 6)
    group = Group(
        "c", "channels", 6, True,
        [Member("0.weight", 0, "a", lay, 0), Member("0.bias", 0, "a", lay, 0),
         Member("2.weight", 1, "b", lay, 0)], 0,
    )
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    for criterion in ["activation", "flap", "taylor"]:
        s = score(model, [group], batches, importance=criterion, progress=False)["c"]
        assert int(np.argmin(s)) == 2, criterion


def test_hf_causal_lm_uses_labels_loss() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=50,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    pre = "model.layers.0.mlp."
    lay = _atom(0, 24)
    group = Group(
        "mlp", "channels", 24, True,
        [Member(pre + "gate_proj.weight", 0, "g", lay, 0), Member(pre + "up_proj.weight", 0, "u", lay, 0),
         Member(pre + "down_proj.weight", 1, "d", lay, 0)], 0, block="model.layers.0",
    )
    ids = torch.randint(0, 50, (2, 1, 12))
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
    implicit = score(model, [group], batches, progress=False)["mlp"]
    explicit = score(
        model, [group], [{**b, "labels": b["input_ids"]} for b in batches],
        loss_fn=lambda out, batch: out.loss, progress=False,
    )["mlp"]
    np.testing.assert_allclose(implicit, explicit, rtol=1e-5)
    assert model.training  # mode restored (a fresh HF model is in training mode)


def test_bfloat16_compute_leaves_weights_untouched() -> None:
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    s = score(model, [_mlp_group()], _batches(), dtype=torch.bfloat16, progress=False)["hidden"]
    assert int(np.argmin(s)) == PLANTED
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.float32 and torch.equal(p, b)


def test_default_loss_collects_nested_outputs() -> None:
    out = {"a": torch.ones(2), "b": (torch.full((1,), 2.0), torch.tensor([1, 2]))}
    assert scoring.default_loss(out).item() == pytest.approx(6.0)
