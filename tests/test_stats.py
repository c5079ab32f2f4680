"""The statistics pass sums exactly what curvature criteria need, and leaves the model untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxprune.passes.stats import Collector, StatSpec, gather_stats


class TwoHead(nn.Module):
    """q and k read the same input (one shared slot); o reads their product."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(6, 5)
        self.k = nn.Linear(6, 5, bias=False)
        self.o = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)) * self.k(x))


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 4, 6, generator=g) for _ in range(n)]


def test_input_moments_and_covariance_are_exact_sums_with_shared_slots():
    model = TwoHead().eval()
    batches = _batches()
    stats = gather_stats(model, batches, StatSpec(input_moments=True, input_cov=True, bias_column=True),
                         progress=False, dtype=torch.float64)
    X = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    q, k = stats["q"], stats["k"]
    assert q.slot == k.slot == "q" and q.xxT is k.xxT  # stored once
    assert q.count == X.shape[0] == 24
    torch.testing.assert_close(q.x_sum, X.sum(0))
    torch.testing.assert_close(q.x_sq, (X * X).sum(0))
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)  # q has a bias: the 1 column
    torch.testing.assert_close(q.xxT, Xb.t() @ Xb)
    assert q.bias_column and not k.bias_column


def test_output_gradient_covariance_is_the_per_token_fisher():
    model = TwoHead().eval()
    batches = _batches(2)
    stats = gather_stats(model, batches, StatSpec(grad_cov=True), loss_fn=lambda out, b: out.pow(2).mean(),
                         progress=False, dtype=torch.float64)
    want = torch.zeros(3, 3, dtype=torch.float64)
    for b in batches:
        y = model(b).detach().requires_grad_(True)
        loss = y.pow(2).mean()
        (g,) = torch.autograd.grad(loss, y)
        rows = g.reshape(-1, 3).double() * b.shape[0]  # scaled by the batch's count (rows of a float input)
        want += rows.t() @ rows
    torch.testing.assert_close(stats["o"].ggT, want)
    assert stats["o"].grad_count == 2 * 8
    assert all(p.grad is None and p.requires_grad for p in model.parameters()), "the model must be left as it was"


def test_conv_columns_follow_the_weight_layout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 5, 5)
    with Collector({"0": model[0]}, StatSpec(input_cov=True, input_moments=True), dtype=torch.float64) as col:
        col.next_batch()
        with torch.no_grad():
            model(x)
    st = col.result()["0"]
    cols = torch.nn.functional.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(st.xxT, cols.t() @ cols)
    # the weight as [out, C*k*k] times a column reproduces the conv output at that position
    w = model[0].weight.reshape(4, -1).double()
    y = copy.deepcopy(model[0]).double()(x.double())  # in float64: the float32 kernel rounds by ~1e-7
    torch.testing.assert_close((cols @ w.t() + model[0].bias.double()).reshape(2, 25, 4).transpose(1, 2).reshape(2, 4, 5, 5), y)
    torch.testing.assert_close(st.x_sum, x.double().sum(dim=(0, 2, 3)))  # moments are per channel


def test_shards_merge_to_the_whole():
    model = TwoHead().eval()
    batches = _batches(4)
    spec = StatSpec(input_moments=True, input_cov=True)
    whole = gather_stats(model, batches, spec, progress=False, dtype=torch.float64)
    a = gather_stats(model, batches[:2], spec, progress=False, dtype=torch.float64)
    b = gather_stats(model, batches[2:], spec, progress=False, dtype=torch.float64)
    merged = a.merge(b)
    for name in whole:
        torch.testing.assert_close(merged[name].xxT, whole[name].xxT)
        torch.testing.assert_close(merged[name].xspread, whole[name].xspread)  # per-batch spread sums too
        assert merged[name].count == whole[name].count
    assert merged["q"].xxT is merged["k"].xxT
    # q and k share one slot: counted once (sums, squares, A and the 2 spread sums per slot)
    assert whole.nbytes == (6 + 6 + 36 + 2 + 5 + 5 + 25 + 2) * 8


class Looped(nn.Module):
    """One linear applied twice in a forward (a shared router, a looped block), q/k sharing a slot."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(6, 6)
        self.k = nn.Linear(6, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q(x)) * self.k(x)
        return self.q(h) + self.k(h)


def test_a_layer_called_twice_in_one_forward_sums_both_calls():
    model = Looped().eval()
    batches = _batches(2)
    stats = gather_stats(model, batches, StatSpec(input_cov=True), progress=False, dtype=torch.float64)
    X = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    with torch.no_grad():
        H = torch.cat([(torch.tanh(model.q(b)) * model.k(b)).reshape(-1, 6) for b in batches]).double()
    both = torch.cat([X, H])
    q, k = stats["q"], stats["k"]
    assert q.xxT is k.xxT and q.cov_count == len(both)
    torch.testing.assert_close(q.xxT, both.t() @ both)


class FusedExperts(nn.Module):
    """A 3-D weight indexed inside the forward (HF 5.x fused experts): no module sees its tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(2, 5, 6) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w[0].t()) + x @ self.w[1].t()


def test_param_fisher_sums_squared_per_batch_gradients_of_the_summed_loss():
    model = FusedExperts().eval()
    batches = _batches(3)
    loss_fn = lambda out, b: out.pow(2).mean()  # noqa: E731
    stats = gather_stats(model, batches, {"": StatSpec(param_fisher=("w",))}, loss_fn=loss_fn,
                         progress=False, dtype=torch.float64)
    want = torch.zeros_like(model.w, dtype=torch.float64)
    for b in batches:
        (g,) = torch.autograd.grad(loss_fn(model(b), b), model.w)
        want += (g.double() * b.shape[0]) ** 2  # the batch's mean loss times its count: the summed loss
    ls = stats[""]
    assert ls.pg_count == 3 * 2
    torch.testing.assert_close(ls.param_fisher("w", {"w": model.w}, ("w",)), want / 6)
    assert model.w.grad is None and model.w.requires_grad, "the model must be left as it was"


def test_the_shrinkage_of_A_follows_how_well_the_batches_agree():
    """Ledoit-Wolf between batches: none from one batch, little from many batches of one
    distribution, much from few batches of a wide layer; and the value is the textbook one."""
    from fxprune.passes.curvature import shrinkage

    def gathered(batches):
        cs = [x.t() @ x for x in batches]
        n = sum(x.shape[0] for x in batches)
        spread = torch.tensor([sum(float((c * c).sum()) for c in cs), sum(float(x.shape[0]) ** 2 for x in batches)], dtype=torch.float64)
        return sum(cs), spread, n

    g = torch.Generator().manual_seed(0)
    assert shrinkage(*gathered([torch.randn(64, 8, generator=g, dtype=torch.float64)])) == 0.0
    assert shrinkage(torch.eye(4), None, 10) == 0.0  # statistics without the spread: no shrinkage
    mix = torch.randn(32, 32, generator=g, dtype=torch.float64)
    many = shrinkage(*gathered([torch.randn(256, 32, generator=g, dtype=torch.float64) @ mix for _ in range(64)]))
    few = shrinkage(*gathered([torch.randn(8, 32, generator=g, dtype=torch.float64) @ mix for _ in range(4)]))
    assert 0.0 < many < 0.05 < few
    xs = [torch.randn(16, 6, generator=g, dtype=torch.float64) for _ in range(5)]
    xxT, spread, n = gathered(xs)
    a, mu = xxT / n, float(torch.trace(xxT / n)) / 6
    b2 = sum(float(((x.t() @ x / n - a * x.shape[0] / n) ** 2).sum()) for x in xs)  # equal batches
    d2 = float(((a - mu * torch.eye(6, dtype=torch.float64)) ** 2).sum())
    alpha = min(b2, d2) / d2
    assert abs(shrinkage(xxT, spread, n) - alpha / (1 - alpha)) < 1e-9
