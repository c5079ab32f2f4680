"""Property tests: random stacks of ops, every exact group pruned at random, equal to zeroing.

The models are drawn from a small vocabulary of the ops real networks are made of (linear maps,
activations, gating, residual adds, norms, head reshapes with attention, concatenation, chunking,
convolutions with BatchNorm), so the analysis meets combinations no hand-written test covers.
"""

from __future__ import annotations

import random
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune

ACTS = [torch.nn.functional.gelu, torch.nn.functional.silu, torch.relu, torch.tanh, torch.sigmoid]


class RandomStack(torch.nn.Module):
    """A residual stack whose blocks are chosen by ``spec``: (kind, act index, width mult)."""

    def __init__(self, width: int, spec: list[tuple[str, int, int]], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.spec = spec
        self.inp = torch.nn.Linear(7, width)
        self.blocks = torch.nn.ModuleList()
        for kind, _, mult in spec:
            inner = width * mult
            if kind == "mlp":
                self.blocks.append(torch.nn.ModuleDict({"up": torch.nn.Linear(width, inner), "down": torch.nn.Linear(inner, width)}))
            elif kind == "glu":
                self.blocks.append(torch.nn.ModuleDict({
                    "gate": torch.nn.Linear(width, inner, bias=False), "up": torch.nn.Linear(width, inner, bias=False),
                    "down": torch.nn.Linear(inner, width, bias=False), "norm": torch.nn.LayerNorm(width)}))
            elif kind == "attn":
                self.blocks.append(torch.nn.ModuleDict({"qkv": torch.nn.Linear(width, 3 * 2 * 4 * mult), "o": torch.nn.Linear(2 * 4 * mult, width)}))
            elif kind == "cat":
                self.blocks.append(torch.nn.ModuleDict({"a": torch.nn.Linear(width, inner), "b": torch.nn.Linear(width, mult + 1),
                                                        "out": torch.nn.Linear(inner + mult + 1, width)}))
            elif kind == "chunk":
                self.blocks.append(torch.nn.ModuleDict({"up": torch.nn.Linear(width, 2 * inner), "down": torch.nn.Linear(inner, width)}))
        self.head = torch.nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for (kind, act_i, mult), blk in zip(self.spec, self.blocks):
            act = ACTS[act_i]
            if kind == "mlp":
                h = h + blk["down"](act(blk["up"](h)))
            elif kind == "glu":
                z = blk["norm"](h)
                h = h + blk["down"](act(blk["gate"](z)) * blk["up"](z))
            elif kind == "attn":
                b, s, _ = h.shape
                q, k, v = blk["qkv"](h).split(2 * 4 * mult, dim=-1)
                q, k, v = (t.view(b, s, 2, 4 * mult).transpose(1, 2) for t in (q, k, v))
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                h = h + blk["o"](o.transpose(1, 2).reshape(b, s, -1))
            elif kind == "cat":
                h = h + blk["out"](act(torch.cat([blk["a"](h), blk["b"](h)], dim=-1)))
            elif kind == "chunk":
                u, g = blk["up"](h).chunk(2, dim=-1)
                h = h + blk["down"](u * act(g))
        return self.head(h)


block = st.tuples(st.sampled_from(["mlp", "glu", "attn", "cat", "chunk"]), st.integers(0, len(ACTS) - 1), st.integers(1, 3))


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(width=st.integers(3, 9), spec=st.lists(block, min_size=1, max_size=3), seed=st.integers(0, 10_000))
def test_random_stacks_prune_exactly(width, spec, seed):
    model = RandomStack(width, spec, seed).eval()
    x = torch.randn(2, 6, 7, generator=torch.Generator().manual_seed(seed))
    graph = fxprune.trace(model, (x,))
    groups = fxprune.analyze(graph)
    assert not groups.unsupported
    rng = random.Random(seed)
    plan = {g.id: sorted(rng.sample(range(g.size), rng.randint(1, g.size - 1))) for g in groups if g.exact}
    if not plan:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxprune.rewrite(model, groups, plan)  # raises if not equal to the zeroed original
    assert res.verification.exact_checked


class ConvStack(torch.nn.Module):
    def __init__(self, chans: list[int], groups: list[int], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers = []
        cin = 3
        for c, g in zip(chans, groups):
            g = g if (cin % g == 0 and c % g == 0) else 1
            layers += [torch.nn.Conv2d(cin, c, 3, padding=1, groups=g), torch.nn.BatchNorm2d(c), torch.nn.ReLU()]
            cin = c
        self.body = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(cin, 4)
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(chans=st.lists(st.sampled_from([4, 6, 8, 12]), min_size=1, max_size=3),
       groups=st.lists(st.sampled_from([1, 2, 4]), min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_random_conv_stacks_prune_exactly(chans, groups, seed):
    model = ConvStack(chans, groups, seed).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    graph = fxprune.trace(model, (x,))
    groups_ = fxprune.analyze(graph)
    rng = random.Random(seed)
    plan = {g.id: sorted(rng.sample(range(g.size), rng.randint(1, g.size - 1))) for g in groups_ if g.exact}
    if plan:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fxprune.rewrite(model, groups_, plan)
